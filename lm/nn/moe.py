"""Mixture of experts: top-k routing with capacity, the load-balancing loss, the experts layer.

Shape suffixes as in lm/nn/layers.py (E experts, C expert capacity).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lm.nn import expert_parallel, grouped, mup
from lm.nn.layers import (
  Mlp,
  activation,
  compile_platform,
  dtype_of,
  expert_width,
  hidden_std,
  param_init,
  residual_out_std,
  zeros_init,
)


def route(router_probs_BLE: jax.Array, top_k: int, capacity: int) -> tuple[jax.Array, jax.Array]:
  """Top-k routing with `capacity` slots per expert and sequence: `dispatch` of `top_k_gates`."""
  return dispatch(*top_k_gates(router_probs_BLE, top_k), router_probs_BLE.shape[-1], capacity)


def dispatch(gates_BLk: jax.Array, experts_BLk: jax.Array, num_experts: int,
             capacity: int) -> tuple[jax.Array, jax.Array]:
  """Each token's chosen experts and gates into `capacity` slots per expert and sequence.

  Returns dispatch_BLEC (bool: token l goes to slot c of expert e) and combine_BLEC (dispatch
  times the token's gate for that expert). Slots fill in sequence order (a token's choices in rank
  order); a choice that finds its expert full is dropped. Filling by position keeps a decoder
  causal: whether token l keeps a slot depends only on tokens up to l.
  """
  batch, length, top_k = experts_BLk.shape
  chosen_BLkE = jax.nn.one_hot(experts_BLk, num_experts, dtype=jnp.int32)
  # Slot of each choice in its expert: the choices that came before it.
  slot_BLkE = jnp.cumsum(chosen_BLkE.reshape(batch, length * top_k, num_experts), axis=1).reshape(chosen_BLkE.shape) - 1
  kept_BLkE = chosen_BLkE * (slot_BLkE < capacity)
  slots_BLkEC = jax.nn.one_hot(slot_BLkE, capacity, dtype=jnp.float32) * kept_BLkE[..., None]
  dispatch_BLEC = jnp.sum(slots_BLkEC, axis=2)
  combine_BLEC = jnp.einsum('BLkEC,BLk->BLEC', slots_BLkEC, gates_BLk)
  return dispatch_BLEC.astype(bool), combine_BLEC


def balance_loss(router_probs_BLE: jax.Array, top_k: int, per_sequence: bool = False) -> jax.Array:
  """Switch Transformer's load-balancing loss E * sum_e f_e * p_e: f_e the share of top-k choices
  that pick expert e, p_e its mean router probability. It is 1 for a uniform router (its minimum
  there) and grows as the router concentrates on a few experts. per_sequence: f and p of each
  sequence, the loss averaged over sequences (DeepSeek-V3's), so no sequence may lean on a few experts
  even where the batch as a whole is balanced."""
  num_experts = router_probs_BLE.shape[-1]
  _, experts_BLk = jax.lax.top_k(router_probs_BLE, top_k)
  chosen_BLE = jnp.sum(jax.nn.one_hot(experts_BLk, num_experts), axis=2)
  axes = 1 if per_sequence else (0, 1)
  share_E, probs_E = jnp.mean(chosen_BLE, axis=axes) / top_k, jnp.mean(router_probs_BLE, axis=axes)
  return num_experts * jnp.mean(jnp.sum(share_E * probs_E, axis=-1))


def expert_capacity(config, length: int) -> int:
  """Slots per expert in a sequence of `length`: capacity_factor * top_k * max_len / experts (0: all
  tokens fit). Sized by max_len, not the length at hand, so a token kept in training is kept when
  sampling from a shorter sequence too."""
  if not config.moe_capacity_factor:
    return length
  return min(length, math.ceil(config.moe_capacity_factor * config.moe_top_k * config.max_len / config.moe_experts))


def top_k_gates(scores_BLE: jax.Array, top_k: int, normalize: bool = True, scale: float = 1.0, groups: int = 1,
                top_groups: int = 1, bias_E: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """(gates_BLk, experts_BLk): each token's top_k experts by score and their gates: the scores,
  renormalised over the k when k > 1 and `normalize` (a top-1 gate stays the raw score, as in Switch,
  so the router still gets the task's gradient), times `scale`. With groups > 1 the experts form that
  many groups, and a token chooses within its top_groups groups, ranked by their two best scores.
  A bias_E (DeepSeek-V3's balancing bias) is added to the scores for choosing only: the gates are the
  unbiased scores, and no gradient reaches the bias."""
  choice_BLE = scores_BLE if bias_E is None else scores_BLE + jax.lax.stop_gradient(bias_E)
  if groups > 1:
    batch, length, num_experts = scores_BLE.shape
    grouped_BLGe = choice_BLE.reshape(batch, length, groups, num_experts // groups)
    group_score_BLG = jnp.sum(jax.lax.top_k(grouped_BLGe, min(2, num_experts // groups))[0], axis=-1)
    _, top_BLg = jax.lax.top_k(group_score_BLG, top_groups)
    kept_BLG = jnp.sum(jax.nn.one_hot(top_BLg, groups, dtype=jnp.int32), axis=2) > 0
    choice_BLE = jnp.where(jnp.repeat(kept_BLG, num_experts // groups, axis=-1), choice_BLE, -jnp.inf)
  gates_BLk, experts_BLk = jax.lax.top_k(choice_BLE, top_k)
  if groups > 1 or bias_E is not None:
    gates_BLk = jnp.take_along_axis(scores_BLE, experts_BLk, axis=-1)
  if normalize and top_k > 1:
    gates_BLk = gates_BLk / jnp.sum(gates_BLk, axis=-1, keepdims=True)
  if scale != 1.0:
    gates_BLk = gates_BLk * scale
  return gates_BLk, experts_BLk


class MoeMlp(nn.Module):
  """A mixture of experts, each an MLP like `Mlp`: a linear router picks moe_top_k experts per token
  and the output is their gate-weighted sum. Sows the load-balancing loss into 'aux_loss', and the
  pairs each expert got (and, with capacity, how many were dropped) into 'moe_stats'.

  model.moe_impl='capacity': GShard's dispatch into moe_capacity_factor slots per expert (dense
  one-hot products; a token over capacity is dropped). 'dropless': the token-expert pairs sorted by
  expert and multiplied by grouped products (lm.nn.grouped), none dropped."""

  config: ml_collections.FrozenConfigDict
  train: bool = False

  @nn.compact
  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    c = self.config
    width, num_experts, dtype = expert_width(c), c.moe_experts, dtype_of(c)
    router_DE = self.param('router_kernel', param_init(c.init_std, ('embed', None)), (c.d_model, num_experts))
    router_logits_BLE = jnp.einsum('BLD,DE->BLE', x_BLD.astype(jnp.float32), router_DE)
    if c.parametrization == 'mup':  # A readout: from the width to a fixed number of experts.
      router_logits_BLE = router_logits_BLE * mup.readout_multiplier(c)
    if c.moe_router_score == 'sigmoid':  # Each expert's score on its own; the balance loss takes their shares.
      scores_BLE = jax.nn.sigmoid(router_logits_BLE)
      probs_BLE = scores_BLE / jnp.sum(scores_BLE, axis=-1, keepdims=True)
    else:
      scores_BLE = probs_BLE = jax.nn.softmax(router_logits_BLE, axis=-1)
    self.sow('aux_loss', 'moe_balance', balance_loss(probs_BLE, c.moe_top_k, c.moe_balance_per_sequence))
    bias_E = self.param('router_bias', zeros_init((None,)), (num_experts,)) if c.moe_router_bias else None
    gates_BLk, experts_BLk = top_k_gates(scores_BLE, c.moe_top_k, c.moe_norm_top_k, c.moe_routed_scale,
                                         c.moe_groups, c.moe_top_groups, bias_E)
    # What the loop logs of the routing: token-expert pairs per expert, and how many capacity drops.
    self.sow('moe_stats', 'load', jnp.bincount(experts_BLk.reshape(-1), length=num_experts).astype(jnp.float32))
    weights = self._weights(num_experts, width)
    if c.moe_impl == 'dropless':
      routed_BLD = self._dropless(x_BLD, gates_BLk, experts_BLk, weights, dtype)
    else:
      routed_BLD = self._capacity(x_BLD, gates_BLk, experts_BLk, weights, dtype)
    if not c.moe_shared_experts:
      return routed_BLD
    shared = c.as_configdict()
    shared.mlp_dim = c.moe_shared_experts * width
    return routed_BLD + Mlp(ml_collections.FrozenConfigDict(shared), self.train, name='shared')(x_BLD)

  def _capacity(self, x_BLD: jax.Array, gates_BLk: jax.Array, experts_BLk: jax.Array,
                weights: dict[str, jax.Array], dtype) -> jax.Array:
    """GShard's dispatch: moe_capacity_factor slots per expert and sequence, dense one-hot products."""
    c = self.config
    dispatch_BLEC, combine_BLEC = dispatch(gates_BLk, experts_BLk, c.moe_experts,
                                           expert_capacity(c, x_BLD.shape[1]))
    self.sow('moe_stats', 'dropped', experts_BLk.size - jnp.sum(dispatch_BLEC, dtype=jnp.float32))
    x_EBCD = jnp.einsum('BLEC,BLD->EBCD', dispatch_BLEC.astype(dtype), x_BLD.astype(dtype))
    x_EBCD = nn.with_logical_constraint(x_EBCD, ('expert', 'batch', None, 'embed'))

    def expert_in(name):
      h_EBCF = jnp.einsum('EBCD,EDF->EBCF', x_EBCD, weights[f'{name}_kernel'].astype(dtype))
      if c.use_bias:
        h_EBCF += weights[f'{name}_bias'].astype(dtype)[:, None, None]
      return h_EBCF

    h_EBCF = activation(c)(expert_in('gate' if c.mlp == 'swiglu' else 'up'))
    if c.mlp == 'swiglu':
      h_EBCF = h_EBCF * expert_in('up')
    h_EBCF = nn.with_logical_constraint(h_EBCF, ('expert', 'batch', None, 'mlp'))
    y_EBCD = jnp.einsum('EBCF,EFD->EBCD', h_EBCF, weights['down_kernel'].astype(dtype))
    if c.use_bias:
      y_EBCD += weights['down_bias'].astype(dtype)[:, None, None]
    return jnp.einsum('BLEC,EBCD->BLD', combine_BLEC.astype(dtype), y_EBCD)

  def _weights(self, num_experts: int, width: int) -> dict[str, jax.Array]:
    """The experts' kernels (and biases): [E, D, F] in, [E, F, D] down."""
    c, weights = self.config, {}
    for name in ('gate', 'up') if c.mlp == 'swiglu' else ('up',):
      weights[f'{name}_kernel'] = self.param(f'{name}_kernel', param_init(hidden_std(c), ('expert', 'embed', 'mlp')),
                                             (num_experts, c.d_model, width))
      if c.use_bias:
        weights[f'{name}_bias'] = self.param(f'{name}_bias', zeros_init(('expert', 'mlp')), (num_experts, width))
    weights['down_kernel'] = self.param('down_kernel', param_init(residual_out_std(c), ('expert', 'mlp', 'embed')),
                                        (num_experts, width, c.d_model))
    if c.use_bias:
      weights['down_bias'] = self.param('down_bias', zeros_init(('expert', 'embed')), (num_experts, c.d_model))
    return weights

  def _dropless(self, x_BLD: jax.Array, gates_BLk: jax.Array, experts_BLk: jax.Array,
                weights: dict[str, jax.Array], dtype) -> jax.Array:
    """Every token through each of its top_k experts: the token-expert pairs laid out by expert, grouped
    products; over an expert mesh axis, exchanged all-to-all with the devices holding their experts
    (expert_parallel)."""
    c = self.config
    weights = {name: w.astype(dtype) for name, w in weights.items()}
    implementation = c.moe_grouped_impl if c.moe_grouped_impl != 'auto' else grouped.default_implementation(
        compile_platform())
    plan = expert_parallel.plan_of(c)
    if plan is not None:
      y_BLD, dropped = expert_parallel.dropless(x_BLD.astype(dtype), gates_BLk, experts_BLk, weights,
                                                functools.partial(expert_rows, c), implementation, plan,
                                                c.moe_ep_capacity_factor)
      if c.moe_ep_capacity_factor:
        self.sow('moe_stats', 'dropped', dropped)
      return y_BLD
    batch, length, d_model = x_BLD.shape

    def mlp_rows(x_RD, grouping):
      y_RD = expert_rows(c, x_RD, grouping, weights)
      return y_RD + weights['down_bias'][grouping.group_R] if c.use_bias else y_RD

    tokens = batch * length
    y_TD = expert_parallel.local_dropless(x_BLD.reshape(tokens, d_model).astype(dtype), gates_BLk.reshape(tokens, -1),
                                          experts_BLk.reshape(tokens, -1), c.moe_experts, mlp_rows, implementation)
    return y_TD.reshape(batch, length, d_model)

def expert_rows(config, x_RD: jax.Array, grouping: grouped.Grouping, weights: dict[str, jax.Array]) -> jax.Array:
  """Rows laid out by expert (`grouping`) through their expert's MLP, all but the down projection's bias
  (which a caller summing partial products over a tensor axis adds once)."""
  def expert_in(name):
    h_RF = grouped.grouped_matmul(x_RD, weights[f'{name}_kernel'], grouping)
    if config.use_bias:
      h_RF += weights[f'{name}_bias'][grouping.group_R]
    return h_RF

  h_RF = activation(config)(expert_in('gate' if config.mlp == 'swiglu' else 'up'))
  if config.mlp == 'swiglu':
    h_RF = h_RF * expert_in('up')
  return grouped.grouped_matmul(h_RF, weights['down_kernel'], grouping)
