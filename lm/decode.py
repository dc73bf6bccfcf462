"""Text generation by temperature sampling (full forward pass per token; no KV cache yet), from a
decoder or an encoder-decoder."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm import sharding


@functools.partial(jax.jit, static_argnames=('model',))
def _sample_tokens(params, tokens_NL: jax.Array, start: jax.Array, rng: jax.Array, temperature: jax.Array,
                   inputs_NS: jax.Array | None, *, model: nn.Module) -> jax.Array:
  """Fills tokens_NL[:, start:] one position at a time, each drawn from the model's prediction
  (an encoder-decoder's given the inputs too)."""
  inputs = () if inputs_NS is None else (inputs_NS,)

  def body(pos, tokens_NL):
    logits_NV = model.apply({'params': params}, *inputs, tokens_NL)[:, pos - 1]
    next_N = jax.random.categorical(jax.random.fold_in(rng, pos), logits_NV / temperature)
    return tokens_NL.at[:, pos].set(next_N.astype(tokens_NL.dtype))

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
  length = min(len(prompt_ids) + num_tokens, max_len)
  tokens_NL = np.zeros((num_samples, length), np.int32)
  tokens_NL[:, :len(prompt_ids)] = prompt_ids
  inputs_NS = None if input_ids is None else np.tile(np.asarray(input_ids, np.int32), (num_samples, 1))
  inputs = (tokens_NL, jnp.int32(len(prompt_ids)), rng, jnp.float32(temperature), inputs_NS)
  if mesh is not None:  # Replicated over the mesh of sharded params (the same on every process).
    inputs = jax.device_put(inputs, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  out_NL = _sample_tokens(params, *inputs, model=model)
  return sharding.to_host(out_NL)[:, len(prompt_ids):]
