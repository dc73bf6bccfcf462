"""Train an experiment: python -m lm.main --config=experiments/quickstart.py --workdir=runs/qs.

Override any config value with --config.group.key=value. Re-running the same command resumes
from the workdir's latest checkpoint.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
import ml_collections
from ml_collections import config_flags

from lm.config import CHECKS, ConfigError, unknown_key_message, validate

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file (a get_config() module).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics, tokenizer and samples.')
_STOP_AFTER = flags.DEFINE_integer(
    'stop_after', None, 'Stop (with a checkpoint) once this step is reached, as a job with a time '
    'limit would; the next run resumes from there.')


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with every mistake reported in one line instead of a traceback."""
  for arg in argv[1:]:
    if arg.startswith('--config='):
      path = arg.split('=', 1)[1].split(':', 1)[0]
      if not os.path.isfile(path):
        sys.exit(f'error: --config: no such file {path!r}')
    elif arg.startswith('--config.'):
      key = arg[len('--config.'):].split('=', 1)[0]
      if key not in CHECKS:
        sys.exit(f'error: --config.{key}: {unknown_key_message(key)}')
  try:
    argv = flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  (a flag, or the user's config file, is broken)
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    sys.exit(f'error: {lines[-1].strip() if lines else type(e).__name__}')
  if not isinstance(_CONFIG.value, ml_collections.ConfigDict):
    sys.exit(f'error: --config: get_config() must return an ml_collections.ConfigDict, '
             f'not {type(_CONFIG.value).__name__}')
  return argv


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  if _CONFIG.value is None or _WORKDIR.value is None:
    sys.exit('error: --config and --workdir are required, e.g. '
             'python -m lm.main --config=experiments/quickstart.py --workdir=runs/qs')
  logging.set_verbosity(logging.WARNING)
  from lm import metrics, train  # pylint: disable=import-outside-toplevel  (jax etc.: only once flags are good)
  try:
    config = validate(_CONFIG.value)
    trainer = train.Trainer(config, _WORKDIR.value)
  except (ConfigError, OSError) as e:  # OSError: an unusable workdir or data directory.
    sys.exit(f'error: {e}')
  try:
    result = trainer.run(stop_after=_STOP_AFTER.value)
  except ConfigError as e:
    sys.exit(f'error: {e}')
  if result:
    metrics.say(f'done: validation loss {result["loss"]:.4f}, perplexity {result["perplexity"]:.2f}, '
                f'bits per byte {result["bits_per_byte"]:.4f}; outputs in {_WORKDIR.value}/')


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
