"""Dropless experts on any mesh (each device groups only its own tokens' pairs) or on none
(local_dropless). Over an expert mesh axis each device sorts its tokens' token-expert pairs by the device
that holds their expert, sends them there (an all-to-all inside shard_map), the experts' MLPs run on the
rows each device received, and the results travel back to be combined with the gates.

Static shapes need a send buffer of fixed rows per pair of devices: by default the worst case, where
every token sends min(top_k, experts per device) pairs to one device (nothing is ever dropped), or
model.moe_ep_capacity_factor times the mean, the rows beyond it dropped and counted. XLA:CPU has no
ragged_all_to_all, so the exchange is the dense `jax.lax.all_to_all` of those buffers everywhere.

Shape suffixes: T local tokens, N their pairs, S expert shards, C rows per shard pair (capacity), R rows
sent or received (S * C), D model width.
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


def local_dropless(x_TD: jax.Array, gates_Tk: jax.Array, experts_Tk: jax.Array, num_experts: int,
                   mlp_rows: Callable, implementation: str) -> jax.Array:
  """y_TD: each token's gate-weighted sum over its top_k experts, all of them here. mlp_rows(x_RD,
  grouping) is the experts' MLP on rows laid out by grouped.group_rows."""
  tokens, top_k = experts_Tk.shape
  grouping = grouped.group_rows(experts_Tk, num_experts, implementation)
  y_RD = mlp_rows(grouped.rows_of_tokens(x_TD, grouping), grouping)
  y_TkD = grouped.items_of_rows(y_RD, grouping).reshape(tokens, top_k, -1)
  return jnp.einsum('TkD,Tk->TD', y_TkD, gates_Tk.astype(y_TkD.dtype))


def dropless(x_BLD: jax.Array, gates_BLk: jax.Array, experts_BLk: jax.Array, weights: dict[str, jax.Array],
             expert_rows: Callable, implementation: str, plan: ExpertPlan,
             capacity_factor: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """(y_BLD, dropped): each token's gate-weighted sum over its top_k experts, computed on the devices that
  hold them, and how many token-expert pairs the exchange's buffers dropped (none at the worst-case size,
  capacity_factor=0: see exchange_rows).
  expert_rows(x_RD, grouping, weights) is the experts' MLP on rows laid out by grouped.group_rows, without
  the down projection's bias; `implementation` the grouped products'."""
  top_k, num_experts = experts_BLk.shape[-1], weights['down_kernel'].shape[0]
  tokens_spec = P(_named(plan.batch_axes), _named(plan.length_axes), None)
  expert, mlp = _named(plan.expert_axes), _named(plan.mlp_axes)
  weight_specs = {name: P(expert, None, mlp) if name in ('gate_kernel', 'up_kernel') else
                  P(expert, mlp, None) if name == 'down_kernel' else
                  P(expert, mlp) if name in ('gate_bias', 'up_bias') else P(expert, None)
                  for name in weights}
  all_axes = tuple(dict.fromkeys(plan.batch_axes + plan.length_axes + plan.expert_axes))

  def local(x_BLD, gates_BLk, experts_BLk, weights):
    batch, length, d_model = x_BLD.shape
    tokens, local_experts = batch * length, num_experts // plan.shards
    x_TD, gates_Tk = x_BLD.reshape(tokens, d_model), gates_BLk.reshape(tokens, top_k)

    def mlp_rows(x_RD, grouping):
      y_RD = expert_rows(x_RD, grouping, weights)
      if mlp is not None:  # Each device holds a slice of the hidden units: sum the partial products.
        y_RD = jax.lax.psum(y_RD, mlp)
      if 'down_bias' in weights:
        y_RD += weights['down_bias'][grouping.group_R]
      return y_RD

    if expert is None:  # Every expert here: nothing to exchange.
      y_TD = local_dropless(x_TD, gates_Tk, experts_BLk.reshape(tokens, top_k), num_experts, mlp_rows,
                            implementation)
      return y_TD.reshape(batch, length, d_model), jnp.zeros((), jnp.float32)
    capacity = exchange_rows(tokens, top_k, num_experts, plan.shards, capacity_factor)
    rows = plan.shards * capacity
    # Each pair's slot in the send buffer: its destination's block, at its rank among the pairs going there.
    expert_N = experts_BLk.reshape(-1).astype(jnp.int32)
    shard_N = expert_N // local_experts
    order_N = jnp.argsort(shard_N, stable=True)
    sizes_S = jnp.bincount(shard_N, length=plan.shards)
    sorted_rank_N = jnp.arange(expert_N.shape[0]) - (jnp.cumsum(sizes_S) - sizes_S)[shard_N[order_N]]
    rank_N = jnp.zeros_like(shard_N).at[order_N].set(sorted_rank_N.astype(jnp.int32))
    kept_N = rank_N < capacity
    slot_N = jnp.where(kept_N, shard_N * capacity + rank_N, 0)
    pair_R = jnp.zeros(rows, jnp.int32).at[jnp.where(kept_N, slot_N, rows)].set(
        jnp.arange(expert_N.shape[0], dtype=jnp.int32), mode='drop')
    filled_R = jnp.zeros(rows, bool).at[jnp.where(kept_N, slot_N, rows)].set(True, mode='drop')
    send_RD = grouped.take_rows(x_TD, pair_R // top_k, filled_R, slot_N.reshape(tokens, top_k),
                                kept_N.reshape(tokens, top_k))
    # Each row's expert on the receiving shard; empty rows get the last one (their rows are zero).
    send_R = jnp.where(filled_R, expert_N[pair_R] % local_experts, local_experts - 1)
    exchange = lambda a: jax.lax.all_to_all(a, expert, 0, 0, tiled=True)  # noqa: E731
    received_RD, received_R = exchange(send_RD), exchange(send_R)
    grouping = grouped.group_rows(received_R, local_experts, implementation)
    # Through the experts and back in the order received, then home.
    y_RD = grouped.items_of_rows(mlp_rows(grouped.rows_of_tokens(received_RD, grouping), grouping), grouping)
    returned_RD = exchange(y_RD)
    y_ND = grouped.take_rows(returned_RD, slot_N, kept_N, pair_R[:, None], filled_R[:, None])
    y_TD = jnp.einsum('TkD,Tk->TD', y_ND.reshape(tokens, top_k, d_model), gates_Tk.astype(y_ND.dtype))
    dropped = jnp.sum(~kept_N, dtype=jnp.float32)
    return y_TD.reshape(batch, length, d_model), jax.lax.psum(dropped, all_axes)

  return jax.shard_map(local, in_specs=(tokens_spec, tokens_spec, tokens_spec, weight_specs),
                       out_specs=(tokens_spec, P()))(x_BLD, gates_BLk, experts_BLk, weights)
