"""What every command-line entry point shares: XLA's CPU flags, the --config flag, and flag errors
in one line. Each command ends with `cli.run(main)`."""

from __future__ import annotations

import importlib
from importlib import metadata
import os
import sys
from typing import Any, Callable

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

from lm.config import KEYS, base_config, unknown_key_message

_config_flag = None
_mesh_only = False  # mesh_flag() defined --config.


def config_flag() -> flags.FlagHolder:
  """The --config flag, defined by the commands that take an experiment (once per process)."""
  global _config_flag
  if _config_flag is None:
    _config_flag = config_flags.DEFINE_config_file('config', None, 'Experiment config file (a get_config() module); '
                                                   'path:arg passes arg to get_config.')
  return _config_flag


def mesh_flag() -> flags.FlagHolder:
  """--config.mesh.* for the commands that take no experiment (python -m lm.hf): the mesh section of
  the defaults, overridden as in an experiment, e.g. --config.mesh.shape=1,8,1."""
  global _config_flag, _mesh_only
  for arg in sys.argv[1:]:  # config_flags reads its overrides as it is defined.
    key = arg.split('=', 1)[0][len('--config.'):]
    if arg.startswith('--config') and not arg.startswith('--config.mesh.'):
      sys.exit(f'error: {arg.split("=", 1)[0]}: this command takes only --config.mesh.* keys (the model is the '
               "checkpoint's)")
    if arg.startswith('--config.') and key not in KEYS:
      sys.exit(f'error: --config.{key}: {unknown_key_message(key)}')
  _config_flag, _mesh_only = config_flags.DEFINE_config_dict(
      'config', ml_collections.ConfigDict({'mesh': base_config().mesh.to_dict()})), True
  return _config_flag


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with every mistake reported in one line instead of a traceback."""
  for arg in argv[1:] if _config_flag is not None else ():
    if _mesh_only:
      continue
    if arg.startswith('--config='):
      path = arg.split('=', 1)[1].split(':', 1)[0]
      if not os.path.isfile(path):
        sys.exit(f'error: --config: no such file {path!r}')
    elif arg.startswith('--config.'):
      key = arg[len('--config.'):].split('=', 1)[0]
      if key not in KEYS:
        sys.exit(f'error: --config.{key}: {unknown_key_message(key)}')
  try:
    argv = flags.FLAGS(argv)
  except Exception as e:  # A flag, or the user's config file, is broken.
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    sys.exit(f'error: {lines[-1].strip() if lines else type(e).__name__}')
  value = _config_flag.value if _config_flag is not None else None
  if value is not None and not isinstance(value, ml_collections.ConfigDict):
    sys.exit(f'error: --config: get_config() must return an ml_collections.ConfigDict, not {type(value).__name__}')
  return argv


# XLA's CPU backend hands matmuls to YNNPACK by default; on this codebase's Transformer (attention's
# many small per-head products above all) its Eigen path trains 8-12% faster (python -m lm.bench, 2-core
# x86). GPUs and TPUs ignore the flag.
CPU_XLA_FLAGS = '--xla_cpu_experimental_ynn_fusion_type='


def set_default_xla_flags(environ: dict | None = None) -> None:
  """Adds CPU_XLA_FLAGS to XLA_FLAGS for the jaxlib line it was measured on, unless XLA_FLAGS already
  chooses or LM_DEFAULT_XLA_FLAGS=0. Call where a process starts, before JAX starts its backends."""
  environ = os.environ if environ is None else environ
  current = environ.get('XLA_FLAGS', '')
  if 'xla_cpu_experimental_ynn_fusion_type' in current or environ.get('LM_DEFAULT_XLA_FLAGS') == '0':
    return
  try:
    jaxlib = metadata.version('jaxlib')
  except metadata.PackageNotFoundError:
    return
  if jaxlib.startswith('0.10.'):
    environ['XLA_FLAGS'] = f'{current} {CPU_XLA_FLAGS}'.strip()


def start(argv: list[str], required: tuple[str, ...], example: str) -> None:
  """What a command checks first: no stray arguments, and the flags in `required` given (else one line
  with an example command line); then absl's logging is kept to warnings."""
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  if any(flags.FLAGS[name].value is None for name in required):
    names = ' and '.join(f'--{name}' for name in required)
    sys.exit(f'error: {names} {"is" if len(required) == 1 else "are"} required, e.g. {example}')
  logging.set_verbosity(logging.WARNING)


def call(target: str, *args, **kwargs) -> Any:
  """Calls 'module:function', importing the module now. Commands import their JAX-heavy half this
  way, once their flags and config are checked, so a mistake is reported at once rather than after
  the seconds that importing JAX, Flax and orbax takes."""
  module, _, function = target.partition(':')
  return getattr(importlib.import_module(module), function)(*args, **kwargs)


def run(main: Callable[[list[str]], None]) -> None:
  """A command's entry: lm's XLA flags, then absl's app.run with one-line flag errors."""
  set_default_xla_flags()
  app.run(main, flags_parser=parse_flags)
