"""MLP: GELU (two matrices, 4 x d_model wide) vs SwiGLU (three matrices, 2/3 as wide: the same
parameters).

  python -m lm.sweep --config=experiments/ablations/mlp.py --workdir=runs/ablations/mlp
  python -m lm.main --config=experiments/ablations/mlp.py:swiglu --workdir=runs/one_point
  notebooks/mlp.ipynb draws the comparison. Add ':gpu' (or ',gpu') for the larger preset.
"""

import pathlib

import ml_collections

from lm import sweep
from lm.config import load_module

base = load_module(pathlib.Path(__file__).with_name('base.py'))
POINTS = sweep.axis('model.mlp', ['gelu', 'swiglu'])


def get_config(arg: str = 'cpu') -> ml_collections.ConfigDict:
  """The baseline at a scale ('cpu' or 'gpu'), or one point of the sweep: 'swiglu', 'swiglu,gpu'."""
  return base.ablation_config(arg, POINTS)


def get_sweep(arg: str = 'cpu') -> list[dict]:
  return base.ablation_sweep(arg, POINTS)  # The same points at either scale.
