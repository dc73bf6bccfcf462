"""Dropless experts over an expert mesh axis: each device sorts its tokens' token-expert pairs by the
device that holds their expert, sends them there (an all-to-all inside shard_map), the experts' MLPs run
on the rows each device received, and the results travel back to be combined with the gates.

Static shapes need a send buffer of fixed rows per pair of devices: by default the worst case, where
every token sends min(top_k, experts per device) pairs to one device (nothing is ever dropped), or
model.moe_ep_capacity_factor times the mean, the rows beyond it dropped and counted. XLA:CPU has no
ragged_all_to_all, so the exchange is the dense `jax.lax.all_to_all` of those buffers everywhere.

Shape suffixes: T local tokens, N their pairs, S expert shards, C rows per shard pair (capacity), R rows
sent or received (S * C), G rows of the grouped layout, D model width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lm.nn import grouped


@dataclasses.dataclass(frozen=True)
class ExpertPlan:
  """Where the exchange runs: the mesh axes splitting the experts (and their size), the tokens' batch and
  length axes, and the axes splitting each expert's hidden units (partial products summed over them)."""
  expert_axes: tuple[str, ...]
  shards: int
  batch_axes: tuple[str, ...]
  length_axes: tuple[str, ...]
  mlp_axes: tuple[str, ...]


def _axes(logical: str, rules, mesh) -> tuple[str, ...]:
  axes = nn.logical_to_mesh_axes((logical,), rules)[0]
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return tuple(a for a in axes if mesh.shape.get(a, 1) > 1)


def plan_of(config) -> ExpertPlan | None:
  """Where the experts run for the mesh and logical axis rules in context (lm.parallel.sharding.activate),
  or None without a mesh (or on one device). Without an expert axis (shards=1) each device still sorts
  only its own tokens' pairs, with nothing to exchange: a global sort would gather the batch."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  rules = nn.get_logical_axis_rules()
  plan = ExpertPlan(_axes('expert', rules, mesh), 1, _axes('batch', rules, mesh), _axes('length', rules, mesh),
                    _axes('mlp', rules, mesh))
  if not (plan.expert_axes or plan.batch_axes or plan.length_axes or plan.mlp_axes):
    return None
  return dataclasses.replace(plan, shards=math.prod(mesh.shape[a] for a in plan.expert_axes))


def exchange_rows(tokens: int, top_k: int, experts: int, shards: int, capacity_factor: float) -> int:
  """Rows a device sends to each expert shard: the worst case tokens * min(top_k, experts per shard), or
  capacity_factor (> 0) times the mean tokens * top_k / shards, rounded up, at most the worst case."""
  worst = tokens * min(top_k, experts // shards)
  return worst if not capacity_factor else max(1, min(worst, math.ceil(capacity_factor * tokens * top_k / shards)))


def _named(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes


def dropless(x_BLD: jax.Array, gates_BLk: jax.Array, experts_BLk: jax.Array, weights: dict[str, jax.Array],
             expert_rows: Callable, implementation: str, plan: ExpertPlan,
             capacity_factor: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """(y_BLD, dropped): each token's gate-weighted sum over its top_k experts, computed on the devices that
  hold them, and how many token-expert pairs the exchange's buffers dropped (none at the worst-case size,
  capacity_factor=0: see exchange_rows).
  expert_rows(x_RD, grouping, weights) is the experts' MLP on rows laid out by grouped.group_rows, without
  the down projection's bias; `implementation` the grouped products'."""
  config_k, num_experts = experts_BLk.shape[-1], weights['down_kernel'].shape[0]
  tokens_spec = P(_named(plan.batch_axes), _named(plan.length_axes), None)
  expert, mlp = _named(plan.expert_axes), _named(plan.mlp_axes)
  weight_specs = {name: P(expert, None, mlp) if name in ('gate_kernel', 'up_kernel') else
                  P(expert, mlp, None) if name == 'down_kernel' else
                  P(expert, mlp) if name in ('gate_bias', 'up_bias') else P(expert, None)
                  for name in weights}
  down_bias = weights.get('down_bias')

  def local(x_BLD, gates_BLk, experts_BLk, weights):
    batch, length, d_model = x_BLD.shape
    tokens, local_experts = batch * length, num_experts // plan.shards
    capacity = exchange_rows(tokens, config_k, num_experts, plan.shards, capacity_factor if expert else 0.0)
    order_N = jnp.argsort(experts_BLk.reshape(-1), stable=True)
    expert_N = experts_BLk.reshape(-1)[order_N]
    token_N = order_N // config_k
    # Each pair's slot in the send buffer: its destination's block, at its rank among the pairs going there.
    shard_N = expert_N // local_experts
    sizes_S = jnp.bincount(shard_N, length=plan.shards)
    rank_N = jnp.arange(expert_N.shape[0]) - (jnp.cumsum(sizes_S) - sizes_S)[shard_N]
    kept_N = rank_N < capacity
    slot_N = jnp.where(kept_N, shard_N * capacity + rank_N, plan.shards * capacity)  # Out of range: dropped.
    x_TD = x_BLD.reshape(tokens, d_model)
    send_RD = jnp.zeros((plan.shards * capacity, d_model), x_TD.dtype).at[slot_N].set(x_TD[token_N], mode='drop')
    # Each row's expert on the receiving shard; empty rows get local_experts (then ride with the last one).
    send_R = jnp.full((plan.shards * capacity,), local_experts, jnp.int32).at[slot_N].set(
        (expert_N % local_experts).astype(jnp.int32), mode='drop')
    exchange = (lambda a: jax.lax.all_to_all(a, expert, 0, 0, tiled=True)) if expert else (lambda a: a)
    received_RD, received_R = exchange(send_RD), exchange(send_R)
    grouping = grouped.group_rows(jnp.minimum(received_R, local_experts - 1), local_experts, implementation)
    y_GD = expert_rows(received_RD[grouping.item_R], grouping, weights)
    if mlp is not None:  # Each device holds a slice of the hidden units: sum the partial products.
      y_GD = jax.lax.psum(y_GD, mlp)
    if down_bias is not None:
      y_GD += weights['down_bias'][grouping.group_R]
    # Back in the order received (padding rows of the layout add nothing), and home.
    y_RD = jnp.zeros_like(received_RD).at[grouping.item_R].add(
        y_GD * grouping.valid_R[:, None].astype(y_GD.dtype))
    returned_RD = exchange(y_RD)
    y_ND = returned_RD[jnp.minimum(slot_N, plan.shards * capacity - 1)] * kept_N[:, None].astype(y_RD.dtype)
    gate_N = gates_BLk.reshape(-1)[order_N].astype(y_ND.dtype)
    y_TD = jnp.zeros((tokens, d_model), y_ND.dtype).at[token_N].add(y_ND * gate_N[:, None])
    dropped = jnp.sum(~kept_N, dtype=jnp.float32)
    all_axes = tuple(dict.fromkeys(plan.batch_axes + plan.length_axes + plan.expert_axes))
    return y_TD.reshape(batch, length, d_model), jax.lax.psum(dropped, all_axes) if all_axes else dropped

  return jax.shard_map(local, in_specs=(tokens_spec, tokens_spec, tokens_spec, weight_specs),
                       out_specs=(tokens_spec, P()))(x_BLD, gates_BLk, experts_BLk, weights)
