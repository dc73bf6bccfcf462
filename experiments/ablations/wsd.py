"""WSD against cosine: warmup-stable-decay and warmup-cosine on the same token budget, and cooldowns
branched from the one stable WSD run at several steps (a loss at every budget from one run).

  python -m lm.sweep --config=experiments/ablations/wsd.py --workdir=runs/ablations/wsd
  notebooks/wsd.ipynb draws the comparison. Add ':gpu' (or ',gpu') for the larger preset.

The points, in order: cosine and WSD at train.steps; then, from the WSD run's checkpoint at each
multiple of BRANCH_EVERY in its stable phase, a cooldown with its whole state (init_mode='full'):
from step N to the budget T whose last decay_fraction starts at N (N=100: T=125); then cosine runs
at those budgets, trained from scratch, to compare. The cooldowns cost T - N steps each.
"""

import pathlib

import ml_collections

from lm import sweep
from lm.config import load_module, override
from lm.config.run import decay_start

base = load_module(pathlib.Path(__file__).with_name('base.py'))

DECAY_FRACTION = {'cpu': 0.2, 'gpu': 0.2, 'smoke': 0.5}  # smoke: 4 steps need a long decay to branch once.
BRANCH_EVERY = {'cpu': 100, 'gpu': 4000, 'smoke': 1}  # Also the checkpoint interval.


def budget(stable_steps: int, optimizer: ml_collections.ConfigDict) -> int:
  """The train.steps whose WSD decay (its last optimizer.decay_fraction) starts at step stable_steps."""
  steps = round(stable_steps / (1 - optimizer.decay_fraction))
  if decay_start(optimizer, steps) != stable_steps:
    raise ValueError(f'no train.steps decays from step {stable_steps} over a fraction {optimizer.decay_fraction}')
  return steps


def points(scale: str) -> list[dict]:
  config = base.get_config(scale)
  config.optimizer.decay_fraction, every = DECAY_FRACTION[scale], BRANCH_EVERY[scale]
  branches = range(every, decay_start(config.optimizer, config.train.steps), every)
  cooldowns = [{'optimizer.schedule': 'wsd', 'train.steps': budget(n, config.optimizer),
                'checkpoint.init_from': f'{sweep.SWEEP_DIR}/schedule=wsd', 'checkpoint.init_step': n,
                'checkpoint.init_mode': 'full'} for n in branches]
  cosines = [{'optimizer.schedule': 'cosine', 'train.steps': budget(n, config.optimizer)} for n in branches]
  return sweep.axis('optimizer.schedule', ['cosine', 'wsd']) + cooldowns + cosines


def get_config(arg: str = 'cpu') -> ml_collections.ConfigDict:
  """The baseline at a scale ('cpu', 'gpu' or 'smoke'), or one point of the sweep: 'wsd', 'wsd,gpu'."""
  scale = base.scale_of(arg)
  config = base.ablation_config(arg, points)
  return override(config, {'optimizer.decay_fraction': DECAY_FRACTION[scale],
                           'checkpoint.every': BRANCH_EVERY[scale], 'checkpoint.max_to_keep': 100})


def get_sweep(arg: str = 'cpu') -> list[dict]:
  return base.ablation_sweep(arg, points)
