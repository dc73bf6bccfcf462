"""Positions: a learned table (GPT-2) vs rotary embeddings (RoPE) vs none at all (NoPE: causal
attention alone must infer order).

  python -m lm.sweep --config=experiments/ablations/positions.py --workdir=runs/ablations/positions
  python -m lm.main --config=experiments/ablations/positions.py:rope --workdir=runs/one_point
  notebooks/positions.ipynb draws the comparison. Add ':gpu' (or ',gpu') for the larger preset.
"""

import pathlib

import ml_collections

from lm import sweep
from lm.config import load_module

base = load_module(pathlib.Path(__file__).with_name('base.py'))
POINTS = sweep.axis('model.positions', ['learned', 'rope', 'none'])


def get_config(arg: str = 'cpu') -> ml_collections.ConfigDict:
  """The baseline at a scale ('cpu' or 'gpu'), or one point of the sweep: 'rope', 'rope,gpu'."""
  return base.ablation_config(arg, POINTS)


def get_sweep(arg: str = 'cpu') -> list[dict]:
  return base.ablation_sweep(arg, POINTS)  # The same points at either scale.
