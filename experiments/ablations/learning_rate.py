"""Learning rate: the peak of the warmup-cosine schedule, in factors of two from a quarter of the
baseline's 3e-3 to 16 times it (the first five points left the optimum above 1.2e-2).

  python -m lm.sweep --config=experiments/ablations/learning_rate.py --workdir=runs/ablations/learning_rate
  python -m lm.main --config=experiments/ablations/learning_rate.py:0.006 --workdir=runs/one_point
  notebooks/learning_rate.ipynb draws the comparison. Add ':gpu' (or ',gpu') for the larger preset.
"""

import pathlib

import ml_collections

from lm import sweep
from lm.config import load_module

base = load_module(pathlib.Path(__file__).with_name('base.py'))
POINTS = sweep.axis('optimizer.learning_rate', [7.5e-4, 1.5e-3, 3e-3, 6e-3, 1.2e-2, 2.4e-2, 4.8e-2])


def get_config(arg: str = 'cpu') -> ml_collections.ConfigDict:
  """The baseline at a scale ('cpu' or 'gpu'), or one point of the sweep: '0.006', '0.006,gpu'."""
  return base.ablation_config(arg, points)


def get_sweep(arg: str = 'cpu') -> list[dict]:
  return base.ablation_sweep(arg, points)


def points(scale: str) -> list[dict]:
  """The same points at cpu and gpu; smoke keeps every third (each rate is a program to compile)."""
  return POINTS[::3] if scale == 'smoke' else POINTS
