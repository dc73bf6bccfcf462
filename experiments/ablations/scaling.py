"""Width x depth: six model sizes, for the scaling-law notebook, which fits loss against parameters
and tokens from their eval curves. Heads widen with the model, so each head stays as wide.

  python -m lm.sweep --config=experiments/ablations/scaling.py --workdir=runs/ablations/scaling
  python -m lm.main --config=experiments/ablations/scaling.py:64,2,4 --workdir=runs/one_point
  notebooks/scaling.ipynb draws the comparison. Add ':gpu' (or ',gpu') for the larger preset.
"""

import pathlib

import ml_collections

from lm import sweep
from lm.config import load_module

base = load_module(pathlib.Path(__file__).with_name('base.py'))


def points(scale: str) -> list[dict]:
  if scale != 'gpu':  # cpu, and smoke (which shrinks the cpu baseline, and keeps its two narrower widths).
    keep = 2 if scale == 'smoke' else 3
    widths = sweep.zip(sweep.axis('model.d_model', [32, 64, 96][:keep]),
                       sweep.axis('model.num_heads', [1, 2, 3][:keep]))
    return sweep.product(widths, sweep.axis('model.num_layers', [2, 4]))
  widths = sweep.zip(sweep.axis('model.d_model', [384, 768, 1152]), sweep.axis('model.num_heads', [6, 12, 18]))
  return sweep.product(widths, sweep.axis('model.num_layers', [6, 12]))


def get_config(arg: str = 'cpu') -> ml_collections.ConfigDict:
  """The baseline at a scale ('cpu' or 'gpu'), or one point of the sweep: '64,2,4', '64,2,4,gpu'."""
  return base.ablation_config(arg, points)


def get_sweep(arg: str = 'cpu') -> list[dict]:
  return base.ablation_sweep(arg, points)
