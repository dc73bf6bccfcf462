"""Attention: multi-head vs grouped-query vs multi-query, as key/value heads shrink from one per
query head to half as many to one. Fewer key/value heads shrink the KV cache (and the
parameters a little); this asks what they cost in loss.

  python -m lm.sweep --config=experiments/ablations/attention.py --workdir=runs/ablations/attention
  python -m lm.main --config=experiments/ablations/attention.py:num_kv_heads=1 --workdir=runs/one_point
  notebooks/attention.ipynb draws the comparison. Add ':gpu' (or ',gpu') for the larger preset.
"""

import pathlib

import ml_collections

from lm import sweep
from lm.config import load_module

base = load_module(pathlib.Path(__file__).with_name('base.py'))


def points(scale: str) -> list[dict]:
  if scale != 'gpu':  # cpu, and smoke (which shrinks the cpu baseline).
    return sweep.axis('model.num_kv_heads', [4, 2, 1])  # 4 query heads.
  return sweep.axis('model.num_kv_heads', [12, 4, 1])  # 12 query heads.


def get_config(arg: str = 'cpu') -> ml_collections.ConfigDict:
  """The baseline at a scale ('cpu' or 'gpu'), or one point of the sweep: 'num_kv_heads=1', 'num_kv_heads=1,gpu'."""
  return base.ablation_config(arg, points)


def get_sweep(arg: str = 'cpu') -> list[dict]:
  return base.ablation_sweep(arg, points)
