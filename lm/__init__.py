"""lm: GPT-style language-model pretraining in JAX and Flax."""

import os

# XLA's CPU backend hands matmuls to YNNPACK by default; on this codebase's Transformer (attention's
# many small per-head products above all) its Eigen path trains 8-12% faster (python -m lm.bench, 2-core
# x86). Set for the jaxlib line it was measured on, unless XLA_FLAGS already chooses or
# LM_DEFAULT_XLA_FLAGS=0; it takes effect if JAX has not started its backends yet. GPUs and TPUs ignore it.
CPU_XLA_FLAGS = '--xla_cpu_experimental_ynn_fusion_type='


def _default_xla_flags() -> None:
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_cpu_experimental_ynn_fusion_type' in flags or os.environ.get('LM_DEFAULT_XLA_FLAGS') == '0':
    return
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  try:
    jaxlib = metadata.version('jaxlib')
  except metadata.PackageNotFoundError:
    return
  if jaxlib.startswith('0.10.'):
    os.environ['XLA_FLAGS'] = f'{flags} {CPU_XLA_FLAGS}'.strip()


_default_xla_flags()
