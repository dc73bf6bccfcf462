"""Mixture of experts: top-k routing with capacity, the load-balancing loss, the experts layer.

Shape suffixes as in lm/nn/layers.py (E experts, C expert capacity).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lm.nn import mup
from lm.nn.layers import activation, dtype_of, hidden_std, mlp_width, param_init, residual_out_std, zeros_init


def route(router_probs_BLE: jax.Array, top_k: int, capacity: int) -> tuple[jax.Array, jax.Array]:
  """Top-k routing with `capacity` slots per expert and sequence.

  Returns dispatch_BLEC (bool: token l goes to slot c of expert e) and combine_BLEC (dispatch
  times the token's gate for that expert: its router probability, renormalised over its top k when
  k > 1; with k = 1 the raw probability, as in Switch, so the router still gets the task's gradient).
  Slots fill in sequence order (a token's choices in rank order); a choice that finds its expert
  full is dropped. Filling by position keeps a decoder causal: whether token l keeps a slot
  depends only on tokens up to l.
  """
  num_experts = router_probs_BLE.shape[-1]
  gates_BLk, experts_BLk = jax.lax.top_k(router_probs_BLE, top_k)
  if top_k > 1:
    gates_BLk = gates_BLk / jnp.sum(gates_BLk, axis=-1, keepdims=True)
  batch, length = experts_BLk.shape[:2]
  chosen_BLkE = jax.nn.one_hot(experts_BLk, num_experts, dtype=jnp.int32)
  # Slot of each choice in its expert: the choices that came before it.
  slot_BLkE = jnp.cumsum(chosen_BLkE.reshape(batch, length * top_k, num_experts), axis=1).reshape(chosen_BLkE.shape) - 1
  kept_BLkE = chosen_BLkE * (slot_BLkE < capacity)
  slots_BLkEC = jax.nn.one_hot(slot_BLkE, capacity, dtype=jnp.float32) * kept_BLkE[..., None]
  dispatch_BLEC = jnp.sum(slots_BLkEC, axis=2)
  combine_BLEC = jnp.einsum('BLkEC,BLk->BLEC', slots_BLkEC, gates_BLk)
  return dispatch_BLEC.astype(bool), combine_BLEC


def balance_loss(router_probs_BLE: jax.Array, top_k: int) -> jax.Array:
  """Switch Transformer's load-balancing loss E * sum_e f_e * p_e: f_e the share of top-k choices
  that pick expert e, p_e its mean router probability. It is 1 for a uniform router (its minimum
  there) and grows as the router concentrates on a few experts."""
  num_experts = router_probs_BLE.shape[-1]
  _, experts_BLk = jax.lax.top_k(router_probs_BLE, top_k)
  share_E = jnp.mean(jnp.sum(jax.nn.one_hot(experts_BLk, num_experts), axis=2), axis=(0, 1)) / top_k
  return num_experts * jnp.sum(share_E * jnp.mean(router_probs_BLE, axis=(0, 1)))


def expert_capacity(config, length: int) -> int:
  """Slots per expert in a sequence of `length`: capacity_factor * top_k * max_len / experts (0: all
  tokens fit). Sized by max_len, not the length at hand, so a token kept in training is kept when
  sampling from a shorter sequence too."""
  if not config.moe_capacity_factor:
    return length
  return min(length, math.ceil(config.moe_capacity_factor * config.moe_top_k * config.max_len / config.moe_experts))


class MoeMlp(nn.Module):
  """A mixture of experts, each an MLP like `Mlp`: a linear router picks moe_top_k experts per token
  and the output is their gate-weighted sum. Sows the load-balancing loss into 'aux_loss'."""

  config: ml_collections.FrozenConfigDict
  train: bool = False

  @nn.compact
  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    c = self.config
    width, num_experts, dtype = mlp_width(c), c.moe_experts, dtype_of(c)
    router_DE = self.param('router_kernel', param_init(c.init_std, ('embed', None)), (c.d_model, num_experts))
    router_logits_BLE = jnp.einsum('BLD,DE->BLE', x_BLD.astype(jnp.float32), router_DE)
    if c.parametrization == 'mup':  # A readout: from the width to a fixed number of experts.
      router_logits_BLE = router_logits_BLE * mup.readout_multiplier(c)
    probs_BLE = jax.nn.softmax(router_logits_BLE, axis=-1)
    self.sow('aux_loss', 'moe_balance', balance_loss(probs_BLE, c.moe_top_k))
    dispatch_BLEC, combine_BLEC = route(probs_BLE, c.moe_top_k, expert_capacity(c, x_BLD.shape[1]))
    x_EBCD = jnp.einsum('BLEC,BLD->EBCD', dispatch_BLEC.astype(dtype), x_BLD.astype(dtype))
    x_EBCD = nn.with_logical_constraint(x_EBCD, ('expert', 'batch', None, 'embed'))

    def expert_in(name):
      kernel = self.param(f'{name}_kernel', param_init(hidden_std(c), ('expert', 'embed', 'mlp')),
                          (num_experts, c.d_model, width))
      h_EBCF = jnp.einsum('EBCD,EDF->EBCF', x_EBCD, kernel.astype(dtype))
      if c.use_bias:
        bias = self.param(f'{name}_bias', zeros_init(('expert', 'mlp')), (num_experts, width))
        h_EBCF += bias.astype(dtype)[:, None, None]
      return h_EBCF

    h_EBCF = activation(c)(expert_in('gate' if c.mlp == 'swiglu' else 'up'))
    if c.mlp == 'swiglu':
      h_EBCF = h_EBCF * expert_in('up')
    h_EBCF = nn.with_logical_constraint(h_EBCF, ('expert', 'batch', None, 'mlp'))
    down_EFD = self.param('down_kernel', param_init(residual_out_std(c), ('expert', 'mlp', 'embed')),
                          (num_experts, width, c.d_model))
    y_EBCD = jnp.einsum('EBCF,EFD->EBCD', h_EBCF, down_EFD.astype(dtype))
    if c.use_bias:
      down_bias = self.param('down_bias', zeros_init(('expert', 'embed')), (num_experts, c.d_model))
      y_EBCD += down_bias.astype(dtype)[:, None, None]
    return jnp.einsum('BLEC,EBCD->BLD', combine_BLEC.astype(dtype), y_EBCD)
