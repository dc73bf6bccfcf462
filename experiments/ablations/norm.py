"""Normalisation: LayerNorm vs RMSNorm, each before the sublayer (pre-norm, with a final norm)
or after the residual add (post-norm, as in the original Transformer).

  python -m lm.sweep --config=experiments/ablations/norm.py --workdir=runs/ablations/norm
  python -m lm.main --config=experiments/ablations/norm.py:rmsnorm,post --workdir=runs/one_point
  notebooks/norm.ipynb draws the comparison. Add ':gpu' (or ',gpu') for the larger preset.
"""

import pathlib

import ml_collections

from lm import sweep
from lm.config import load_module

base = load_module(pathlib.Path(__file__).with_name('base.py'))
POINTS = sweep.product(sweep.axis('model.norm', ['layernorm', 'rmsnorm']),
                       sweep.axis('model.norm_position', ['pre', 'post']))


def get_config(arg: str = 'cpu') -> ml_collections.ConfigDict:
  """The baseline at a scale ('cpu' or 'gpu'), or one point of the sweep: 'rmsnorm,post', 'rmsnorm,post,gpu'."""
  return base.ablation_config(arg, POINTS)


def get_sweep(arg: str = 'cpu') -> list[dict]:
  return base.ablation_sweep(arg, POINTS)  # The same points at either scale.
