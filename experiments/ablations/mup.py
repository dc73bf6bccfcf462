"""muP against SP: the peak learning rate swept at three widths under each parametrization (4 heads
throughout, so head_dim widens with the model; muP's base width is the narrowest, where it equals SP,
so that width runs under SP only). Under SP the best rate falls as the model widens; under muP it
should stay where the narrow model has it. 250 steps, half the baseline's, to afford 30 points.

  python -m lm.sweep --config=experiments/ablations/mup.py --workdir=runs/ablations/mup
  python -m lm.main --config=experiments/ablations/mup.py:mup,128,0.024 --workdir=runs/one_point
  notebooks/mup.ipynb draws the transfer plot and the coordinate check. Add ':gpu' (or ',gpu') for
  the larger preset.
"""

import pathlib

import ml_collections

from lm import sweep
from lm.config import load_module, override

base = load_module(pathlib.Path(__file__).with_name('base.py'))

WIDTHS = {'cpu': [32, 64, 128], 'gpu': [384, 768, 1536], 'smoke': [32, 64]}
RATES = {'cpu': [1.5e-3, 3e-3, 6e-3, 1.2e-2, 2.4e-2, 4.8e-2], 'gpu': [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3],
         'smoke': [1e-2]}
STEPS = {'cpu': (250, 25), 'gpu': (10_000, 500)}  # (train.steps, optimizer.warmup_steps); smoke keeps its own.


def points(scale: str) -> list[dict]:
  widths, rates = WIDTHS[scale], sweep.axis('optimizer.learning_rate', RATES[scale])
  sp = sweep.product(sweep.axis('model.parametrization', ['sp']), sweep.axis('model.d_model', widths), rates)
  mup = sweep.product(sweep.axis('model.parametrization', ['mup']), sweep.axis('model.d_model', widths[1:]), rates)
  return sp + mup


def get_config(arg: str = 'cpu') -> ml_collections.ConfigDict:
  """The baseline at a scale ('cpu', 'gpu' or 'smoke'), or one point of the sweep: 'mup,128,0.024'."""
  scale = base.scale_of(arg)
  config = override(base.ablation_config(arg, points), {'model.num_heads': 4, 'model.mup_base_width': WIDTHS[scale][0]})
  if scale in STEPS:
    config = override(config, dict(zip(('train.steps', 'optimizer.warmup_steps'), STEPS[scale])))
  return config


def get_sweep(arg: str = 'cpu') -> list[dict]:
  return base.ablation_sweep(arg, points)
