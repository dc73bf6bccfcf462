"""What every command-line entry point shares: the --config flag, and flag errors in one line."""

from __future__ import annotations

import os
import sys

from absl import flags
import ml_collections
from ml_collections import config_flags

from lm.config import KEYS, unknown_key_message

CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (a get_config() module); '
                                         'path:arg passes arg to get_config.')


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with every mistake reported in one line instead of a traceback."""
  for arg in argv[1:]:
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
  except Exception as e:  # pylint: disable=broad-except  (a flag, or the user's config file, is broken)
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    sys.exit(f'error: {lines[-1].strip() if lines else type(e).__name__}')
  if CONFIG.value is not None and not isinstance(CONFIG.value, ml_collections.ConfigDict):
    sys.exit(f'error: --config: get_config() must return an ml_collections.ConfigDict, '
             f'not {type(CONFIG.value).__name__}')
  return argv


