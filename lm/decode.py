"""Text generation by temperature sampling (greedy at temperature 0): a decoder reads the prompt once
into a KV cache, then one token per step; an encoder-decoder reruns its full forward pass per token."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm import sharding
from lm.model import init_cache


def _draw(logits_NV: jax.Array, rng: jax.Array, temperature: jax.Array) -> jax.Array:
  """A token per row: the argmax at temperature 0, else a draw from softmax(logits / temperature)."""
  drawn_N = jax.random.categorical(rng, logits_NV / jnp.maximum(temperature, 1e-6))
  return jnp.where(temperature > 0, drawn_N, jnp.argmax(logits_NV, axis=-1)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('model', 'num_new'))
def _sample_cached(params, prompt_NP: jax.Array, valid_NP: jax.Array, rng: jax.Array, temperature: jax.Array, *,
                   model: nn.Module, num_new: int) -> jax.Array:
  """[N, num_new] tokens continuing left-padded prompts (valid_NP False on the padding)."""
  positions_NP = jnp.maximum(jnp.cumsum(valid_NP, axis=1) - 1, 0)
  apply = lambda cache, tokens, positions, valid: model.apply(
      {'params': params, 'cache': cache}, tokens, False, True, positions, valid, mutable=['cache'])
  logits_NPV, variables = apply(init_cache(model, prompt_NP.shape[0]), prompt_NP, positions_NP, valid_NP)

  def step(i, carry):
    cache, logits_NV, position_N, out_NT = carry
    token_N = _draw(logits_NV, jax.random.fold_in(rng, i), temperature)
    logits_N1V, variables = apply(cache, token_N[:, None], position_N[:, None], jnp.ones_like(token_N, bool)[:, None])
    return variables['cache'], logits_N1V[:, 0], position_N + 1, out_NT.at[:, i].set(token_N)

  out_NT = jnp.zeros((prompt_NP.shape[0], num_new), jnp.int32)
  carry = (variables['cache'], logits_NPV[:, -1], positions_NP[:, -1] + 1, out_NT)
  return jax.lax.fori_loop(0, num_new, step, carry)[3]


@functools.partial(jax.jit, static_argnames=('model',))
def _sample_full(params, tokens_NL: jax.Array, start: jax.Array, rng: jax.Array, temperature: jax.Array,
                 inputs_NS: jax.Array | None, *, model: nn.Module) -> jax.Array:
  """Fills tokens_NL[:, start:] one position at a time, each from a full forward pass (an
  encoder-decoder's given the inputs too)."""
  inputs = () if inputs_NS is None else (inputs_NS,)

  def body(pos, tokens_NL):
    logits_NV = model.apply({'params': params}, *inputs, tokens_NL)[:, pos - 1]
    return tokens_NL.at[:, pos].set(_draw(logits_NV, jax.random.fold_in(rng, pos), temperature))

  return jax.lax.fori_loop(start, tokens_NL.shape[1], body, tokens_NL)


def sample(model: nn.Module, params, prompt_ids: np.ndarray, *, num_samples: int, num_tokens: int,
           temperature: float, rng: jax.Array, mesh: jax.sharding.Mesh | None = None,
           input_ids: np.ndarray | None = None) -> np.ndarray:
  """[num_samples, n] new token ids continuing prompt_ids, n = min(num_tokens, room left in max_len).

  An encoder-decoder reads input_ids (a 1-D array, padding included) in its encoder; prompt_ids
  then start the decoder.
  """
  max_len = model.config.max_len
  prompt_ids = np.asarray(prompt_ids, np.int32)[-(max_len - 1):]
  num_new = min(num_tokens, max_len - len(prompt_ids))
  replicated = lambda x: x if mesh is None else jax.device_put(  # The same on every process.
      x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  if input_ids is None:
    prompt_NP = np.tile(prompt_ids, (num_samples, 1))
    out = _sample_cached(params, *replicated((prompt_NP, np.ones_like(prompt_NP, bool), rng, jnp.float32(temperature))),
                         model=model, num_new=num_new)
    return sharding.to_host(out)
  tokens_NL = np.zeros((num_samples, len(prompt_ids) + num_new), np.int32)
  tokens_NL[:, :len(prompt_ids)] = prompt_ids
  inputs_NS = np.tile(np.asarray(input_ids, np.int32), (num_samples, 1))
  out_NL = _sample_full(params, *replicated((tokens_NL, jnp.int32(len(prompt_ids)), rng, jnp.float32(temperature),
                                             inputs_NS)), model=model)
  return sharding.to_host(out_NL)[:, len(prompt_ids):]
