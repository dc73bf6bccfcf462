"""Positions: a learned table (GPT-2) vs rotary embeddings (RoPE) vs none at all (NoPE: causal
attention alone must infer order).

  python -m lm.sweep --config=experiments/ablations/positions.py --workdir=runs/ablations/positions
  python -m lm.main --config=experiments/ablations/positions.py:rope --workdir=runs/one_point
  notebooks/positions.ipynb draws the comparison. Add ':gpu' (or ',gpu') for the larger preset.
"""

import pathlib

import ml_collections

from lm import sweep
from lm.config import load_experiment, override

BASE = pathlib.Path(__file__).with_name('base.py')
POINTS = sweep.axis('model.positions', ['learned', 'rope', 'none'])


def get_config(arg: str = 'cpu') -> ml_collections.ConfigDict:
  """The baseline at a scale ('cpu' or 'gpu'), or one point of the sweep: 'rope', 'rope,gpu'."""
  scale, point = sweep.preset(arg, POINTS, scales=('cpu', 'gpu'))
  return override(load_experiment(f'{BASE}:{scale}'), point)


def get_sweep(arg: str = 'cpu') -> list[dict]:
  del arg  # The same points at either scale.
  return POINTS
