"""What the train step does with the experts' routing statistics: sums over layers and microbatches,
the logged load metrics, and DeepSeek-V3's load-balancing bias update."""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp

ROUTER_BIAS = 'router_bias'  # The parameter (of each MoE layer) that balance_router_bias sets.


def moe_sums(stats: dict) -> dict:
  """The 'moe_stats' a model sowed as sums: 'load' [MoE layers, experts] (token-expert pairs per
  expert), 'dropped' and 'pairs' (over all layers), and 'layer_load' {MoE module path: its load, [E] or
  scanned [layers, E]}; {} for a model without experts."""
  flat = flax.traverse_util.flatten_dict(stats, sep='/')
  layer_load = {path.rsplit('/', 1)[0]: sum(value) for path, value in flat.items() if path.endswith('/load')}
  if not layer_load:
    return {}
  load = jnp.concatenate([x.reshape(-1, x.shape[-1]) for x in layer_load.values()])
  dropped = [jnp.sum(sum(value)) for path, value in flat.items() if path.endswith('/dropped')]
  return {'load': load, 'dropped': sum(dropped, jnp.float32(0)), 'pairs': jnp.sum(load), 'layer_load': layer_load}


def moe_metrics(sums: dict, drops: bool) -> dict[str, jax.Array]:
  """train/moe/imbalance (the most loaded expert over the mean, in the worst layer) and, where capacity
  drops (model.moe_impl='capacity'), train/moe/dropped (the share of token-expert pairs dropped)."""
  load = sums['load']
  metrics_ = {'moe/imbalance': jnp.max(jnp.max(load, axis=-1) / jnp.maximum(jnp.mean(load, axis=-1), 1e-9))}
  if drops:
    metrics_['moe/dropped'] = sums['dropped'] / jnp.maximum(sums['pairs'], 1.0)
  return metrics_


def balance_router_bias(params: dict, layer_load: dict[str, jax.Array], rate: float) -> dict:
  """params with each MoE layer's router_bias nudged toward balance after a step (DeepSeek-V3): up by
  `rate` for each expert that got fewer token-expert pairs than the layer's mean in the step's batch,
  down by `rate` for each that got more. The bias only steers the choice of experts (not the gates),
  so its gradient is zero and the optimizer leaves it where this rule puts it."""
  flat = flax.traverse_util.flatten_dict(params, sep='/')
  for path, bias in flat.items():
    if path.endswith(f'/{ROUTER_BIAS}'):
      load = layer_load[path.rsplit('/', 1)[0]]
      flat[path] = bias + rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load).astype(bias.dtype)
  return flax.traverse_util.unflatten_dict(flat, sep='/')
