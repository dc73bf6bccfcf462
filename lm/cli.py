"""What every command-line entry point shares: XLA's CPU flags, the --config flag, and flag errors
in one line. Each command ends with `cli.run(main)`."""

from __future__ import annotations

import glob
from importlib import metadata
import os
import pathlib
import sys
import traceback
from typing import Callable

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
      'config', ml_collections.ConfigDict({'mesh': base_config().mesh})), True
  return _config_flag


def _last_line(error: BaseException) -> str:
  lines = [line for line in str(error).strip().splitlines() if line.strip()]
  return lines[-1].strip() if lines else ''


def config_file_error(error: BaseException, path: str | None) -> str | None:
  """'--config: PATH line N in FUNCTION: Type: message' for an error the config file's own code raised
  (the deepest line of it in the traceback: where get_config, or a helper of it, failed), or a
  SyntaxError in it; None for any other error."""
  if path is None:
    return None
  real = os.path.realpath(path)
  if isinstance(error, SyntaxError) and error.filename and os.path.realpath(error.filename) == real:
    return f'--config: {path} line {error.lineno}: {type(error).__name__}: {error.msg}'
  chain = [error]  # config_flags re-raises a TypeError or ValueError as a new one: the first is the user's.
  while (chain[-1].__cause__ or chain[-1].__context__) and len(chain) < 16:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  for error in reversed(chain):
    frames = [f for f in traceback.extract_tb(error.__traceback__) if os.path.realpath(f.filename) == real]
    if frames:
      break
  else:
    return None
  where = f'{path} line {frames[-1].lineno}' + (f' in {frames[-1].name}' if frames[-1].name != '<module>' else '')
  message = _last_line(error)
  return f'--config: {where}: {type(error).__name__}' + (f': {message}' if message else '')


def _refusal(error: BaseException, config_path: str | None) -> str:
  return f'error: {config_file_error(error, config_path) or _last_line(error) or type(error).__name__}'


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with every mistake reported in one line instead of a traceback."""
  config_path = None
  for arg in argv[1:] if _config_flag is not None else ():
    if _mesh_only:
      continue
    if arg.startswith('--config='):
      path = config_path = arg.split('=', 1)[1].split(':', 1)[0]
      if not os.path.isfile(path):
        sys.exit(f'error: --config: no such file {path!r}')
    elif arg.startswith('--config.'):
      key = arg[len('--config.'):].split('=', 1)[0]
      if key not in KEYS:
        sys.exit(f'error: --config.{key}: {unknown_key_message(key)}')
  try:
    argv = flags.FLAGS(argv)
  except Exception as e:  # A flag, or the user's config file, is broken.
    sys.exit(_refusal(e, config_path))
  value = _config_flag.value if _config_flag is not None else None
  if type(value).__name__ == '_ErrorConfig':  # config_flags keeps get_config's OSError for later: report it now.
    sys.exit(_refusal(object.__getattribute__(value, '_error'), config_path))
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


# What shows an accelerator on a Linux host, as JAX's hardware_utils looks for one: TPU chips on the PCI
# bus (Google's vendor id), TPU device files (/dev/accel*; /dev/vfio groups on v5p and later), NVIDIA's
# and AMD's device files, and the variables that configure a TPU host by hand.
ACCELERATOR_FILES = ('dev/accel*', 'dev/vfio/[0-9]*', 'dev/nvidia[0-9]*', 'dev/nvidiactl', 'dev/dxg', 'dev/kfd')
TPU_VARIABLES = ('TPU_ACCELERATOR_TYPE', 'TPU_WORKER_HOSTNAMES', 'TPU_NAME')
GOOGLE_PCI_VENDOR = '0x1ae0'


def accelerator_present(root: str = '/', environ: dict | None = None) -> bool:
  """Whether this host shows a TPU or GPU (a glance at device files, microseconds; no JAX)."""
  environ = os.environ if environ is None else environ
  if any(environ.get(name) for name in TPU_VARIABLES):
    return True
  if any(glob.glob(os.path.join(root, pattern)) for pattern in ACCELERATOR_FILES):
    return True
  for vendor in glob.glob(os.path.join(root, 'sys/bus/pci/devices/*/vendor')):
    try:
      if pathlib.Path(vendor).read_text().strip() == GOOGLE_PCI_VENDOR:
        return True
    except OSError:
      continue
  return False


def cpu_without_accelerators() -> None:
  """Starts JAX on the CPU alone where it is imported, nothing chose its platforms (JAX_PLATFORMS,
  jax.config) and this Linux host has no accelerator. Else JAX tries each plugin it has, and libtpu (the
  tpu extra) prints that it could not determine the TPU type, and an INVALID_ARGUMENT error, before
  JAX falls back to the CPU. Set in this process's JAX config only, not in the environment: a job this
  command submits elsewhere (lm.sweep on Slurm) looks for its own accelerators."""
  jax = sys.modules.get('jax')
  if jax is None or jax.config.jax_platforms or sys.platform != 'linux' or accelerator_present():
    return
  jax.config.update('jax_platforms', 'cpu')


def start(argv: list[str], required: tuple[str, ...], example: str) -> None:
  """What a command checks first: no stray arguments, and the flags in `required` given (else one line
  with an example command line); then absl's logging is kept to warnings."""
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  if any(flags.FLAGS[name].value is None for name in required):
    names = ' and '.join(f'--{name}' for name in required)
    sys.exit(f'error: {names} {"is" if len(required) == 1 else "are"} required, e.g. {example}')
  logging.set_verbosity(logging.WARNING)


def run(main: Callable[[list[str]], None]) -> None:
  """A command's entry: lm's XLA flags, the CPU alone on a host without accelerators, then absl's app.run
  with one-line flag errors."""
  set_default_xla_flags()
  cpu_without_accelerators()
  app.run(main, flags_parser=parse_flags)
