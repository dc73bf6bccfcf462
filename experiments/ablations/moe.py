"""Mixture of experts: dense against MoE at the same active width, coarse experts (8, top-2) against
fine-grained ones (32, top-8: each coarse expert split in four, the same total and active parameters),
and the fine-grained experts balanced by the auxiliary loss, by DeepSeek-V3's bias, or not at all.

  python -m lm.sweep --config=experiments/ablations/moe.py --workdir=runs/ablations/moe
  python -m lm.main --config=experiments/ablations/moe.py:moe_experts=8 --workdir=runs/one_point
  notebooks/moe.ipynb draws the comparison. Add ':gpu' (or ',gpu') for the larger preset.
"""

import pathlib

import ml_collections

from lm.config import load_module, override

base = load_module(pathlib.Path(__file__).with_name('base.py'))

# The baseline's GELU MLP is 4 x d_model wide; each mixture's top-k experts together are as wide.
WIDTH = {'cpu': 256, 'gpu': 3072, 'smoke': 128}


def points(scale: str) -> list[dict]:
  """Dense; coarse and fine experts balanced by the auxiliary loss; fine ones by the bias, and by nothing."""
  width = WIDTH[scale]
  coarse = {'model.moe_experts': 8, 'model.moe_top_k': 2, 'model.moe_mlp_dim': width // 2}
  fine = {'model.moe_experts': 32, 'model.moe_top_k': 8, 'model.moe_mlp_dim': width // 8}
  bias = {'train.moe_balance_loss': 0.0, 'model.moe_router_bias': True, 'model.moe_bias_rate': 0.001}
  if scale == 'smoke':  # Each point is a program to compile: dense, and each way of balancing fine experts but none.
    return [{'model.moe_experts': 0}, fine, fine | bias]
  return [{'model.moe_experts': 0}, coarse, fine, fine | bias, fine | {'train.moe_balance_loss': 0.0}]


def get_config(arg: str = 'cpu') -> ml_collections.ConfigDict:
  """The baseline at a scale ('cpu' or 'gpu') with dropless experts wherever a point has them, or one
  point of the sweep: 'moe_experts=8,moe_top_k=2,moe_mlp_dim=128'."""
  config = base.ablation_config(arg, points)
  return override(config, {'model.moe_impl': 'dropless', 'model.moe_capacity_factor': 0.0})


def get_sweep(arg: str = 'cpu') -> list[dict]:
  return base.ablation_sweep(arg, points)
