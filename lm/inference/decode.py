"""Token generation: a model reads its (left-padded) prompts once into a KV cache, then draws one
token per step, in jitted chunks that take the cache donated. An encoder-decoder encodes its input
once; its decoder then reads its own tokens through the cache (lm.kinds: each kind's decode_step).
Draws are greedy or sampled with temperature, top-k, top-p (nucleus) and a repetition penalty, all
traced values: changing them never recompiles (greedy and sampled decoding compile once each).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm import kinds
from lm.config import ConfigError
from lm.nn.layers import LowPrecisionKernel
from lm.nn.model import resize_cache
from lm.parallel import sharding

CHUNK = 32  # Tokens per jitted decoding call: stop strings are checked between calls.
WEIGHTS_DTYPES = ('float32', 'bfloat16', 'int8')


class Sampling(NamedTuple):
  """How each next token is drawn from the logits (the defaults: plain sampling at temperature 1)."""
  temperature: float = 1.0  # 0: greedy (the argmax).
  top_k: int = 0  # Keep only the k most likely tokens (0: all).
  top_p: float = 1.0  # Keep the fewest most likely tokens whose probabilities sum to >= top_p.
  repetition_penalty: float = 1.0  # > 1 makes tokens already in the prompt or output less likely.


def check_sampling(s: Sampling) -> None:
  """A ConfigError in one line for the first value out of range."""
  if not s.temperature >= 0:
    raise ConfigError(f'temperature={s.temperature}: must be >= 0 (0 is greedy)')
  if not (isinstance(s.top_k, (int, np.integer)) and s.top_k >= 0):
    raise ConfigError(f'top_k={s.top_k}: must be an integer >= 0 (0 keeps every token)')
  if not 0 < s.top_p <= 1:
    raise ConfigError(f'top_p={s.top_p}: must be in (0, 1] (1 keeps every token)')
  if not s.repetition_penalty > 0:
    raise ConfigError(f'repetition_penalty={s.repetition_penalty}: must be > 0 (1 is none)')


def filter_logits(logits_NV: jax.Array, seen_NV: jax.Array, s: Sampling) -> jax.Array:
  """Logits after the repetition penalty, the temperature, then top-k and top-p (dropped: -inf).

  The penalty divides positive logits of seen tokens and multiplies negative ones (as in CTRL);
  top-p then keeps the most likely tokens until the mass before the next one reaches top_p.
  """
  logits_NV = _penalised(logits_NV, seen_NV, s) / jnp.maximum(s.temperature, 1e-6)
  vocab = logits_NV.shape[-1]

  def restrict(logits_NV):
    sorted_NV = -jnp.sort(-logits_NV, axis=-1)  # Most likely first.
    k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, vocab), vocab)
    sorted_NV = jnp.where(jnp.arange(vocab) < k, sorted_NV, -jnp.inf)
    probs_NV = jax.nn.softmax(sorted_NV, axis=-1)
    mass_before_NV = jnp.cumsum(probs_NV, axis=-1) - probs_NV
    kept_N = jnp.sum((mass_before_NV < s.top_p) & (jnp.arange(vocab) < k), axis=-1)  # >= 1: the first is kept.
    threshold_N = jnp.take_along_axis(sorted_NV, kept_N[:, None] - 1, axis=-1)
    return jnp.where(logits_NV >= threshold_N, logits_NV, -jnp.inf)

  return jax.lax.cond((s.top_k > 0) | (s.top_p < 1), restrict, lambda x: x, logits_NV)


def _penalised(logits_NV: jax.Array, seen_NV: jax.Array, s: Sampling) -> jax.Array:
  def penalise(logits_NV):
    penalised = jnp.where(logits_NV > 0, logits_NV / s.repetition_penalty, logits_NV * s.repetition_penalty)
    return jnp.where(seen_NV, penalised, logits_NV)

  return jax.lax.cond(s.repetition_penalty != 1, penalise, lambda x: x, logits_NV)


def _categorical(rng: jax.Array, logits_NV: jax.Array) -> jax.Array:
  """A draw per row from softmax(logits) by inverting its CDF: one uniform number per row, where
  jax.random.categorical's Gumbel trick needs one per vocabulary entry (slow on CPU)."""
  cdf_NV = jnp.cumsum(jax.nn.softmax(logits_NV, axis=-1), axis=-1)
  u_N1 = jax.random.uniform(rng, (logits_NV.shape[0], 1)) * cdf_NV[:, -1:]
  return jnp.argmax(cdf_NV > u_N1, axis=-1)  # The first token whose CDF passes u (never a zero-probability one).


def next_token(logits_NV: jax.Array, seen_NV: jax.Array, rng: jax.Array, s: Sampling,
               greedy: bool | None = None) -> jax.Array:
  """A token per row: the argmax of the filtered logits at temperature 0, else a draw from them.
  greedy=True (False) traces only the argmax (the draw); None decides by s.temperature when run.
  The argmax skips the temperature, top-k and top-p, which never move it."""
  if greedy is None:
    return jax.lax.cond(s.temperature > 0, lambda: next_token(logits_NV, seen_NV, rng, s, False),
                        lambda: next_token(logits_NV, seen_NV, rng, s, True))
  if greedy:
    return jnp.argmax(_penalised(logits_NV, seen_NV, s), axis=-1).astype(jnp.int32)
  return _categorical(rng, filter_logits(logits_NV, seen_NV, s)).astype(jnp.int32)


class DecodeState(NamedTuple):
  cache: Any  # The model's 'cache' collection.
  context: Any  # What every step reads besides (an encoder-decoder: the encoder output and inputs).
  logits_NV: jax.Array  # Predicting the next token of each row.
  position_N: jax.Array  # Where that token sits in its sequence.
  seen_NV: jax.Array  # Tokens in each row's prompt or output so far (for the repetition penalty).
  done_N: jax.Array  # Rows that have drawn the end token.
  step: jax.Array  # Tokens drawn so far (the draw of step t uses fold_in(rng, t)).


def _seen(tokens_NL: jax.Array, valid_NL: jax.Array, vocab: int) -> jax.Array:
  rows_NL = jnp.broadcast_to(jnp.arange(tokens_NL.shape[0])[:, None], tokens_NL.shape)
  return jnp.zeros((tokens_NL.shape[0], vocab), bool).at[rows_NL, tokens_NL].max(valid_NL)


@functools.partial(jax.jit, static_argnames=('model', 'cache_len'))
def prefill(params, prompt_NP: jax.Array, valid_NP: jax.Array, inputs_NS: jax.Array | None = None, *,
            model: nn.Module, cache_len: int) -> DecodeState:
  """Reads left-padded prompts (valid_NP False on the padding) into a fresh cache of cache_len slots;
  an encoder-decoder first encodes inputs_NS."""
  kind = kinds.of_model(model)
  positions_NP = jnp.maximum(jnp.cumsum(valid_NP, axis=1) - 1, 0)
  context = kind.decoding_context(model, params, inputs_NS)
  cache = kind.init_cache(model, prompt_NP.shape[0], cache_len)
  logits_NPV, cache = kind.decode_step(model, params, cache, prompt_NP, positions_NP, valid_NP, context)
  vocab = logits_NPV.shape[-1]
  return DecodeState(cache, context, logits_NPV[:, -1], positions_NP[:, -1] + 1, _seen(prompt_NP, valid_NP, vocab),
                     jnp.zeros(prompt_NP.shape[0], bool), jnp.int32(0))


@functools.partial(jax.jit, static_argnames=('model', 'chunk', 'greedy'), donate_argnames=('state',))
def decode_chunk(params, state: DecodeState, rng: jax.Array, sampling: Sampling, end_id: jax.Array,
                 num_steps: jax.Array, *, model: nn.Module, chunk: int = CHUNK,
                 greedy: bool | None = None) -> tuple[DecodeState, jax.Array]:
  """Draws up to min(num_steps, chunk) tokens per row, stopping early once every row has drawn
  end_id (-1: none). Returns the new state and [N, chunk] tokens, -1 where none was drawn. greedy:
  as in `next_token` (a compile of its own: XLA's CPU backend ran both sides of a traced choice)."""

  def body(carry):
    i, state, out_NC = carry
    token_N = next_token(state.logits_NV, state.seen_NV, jax.random.fold_in(rng, state.step), sampling, greedy)
    token_N = jnp.where(state.done_N, jnp.maximum(end_id, 0), token_N)
    out_NC = out_NC.at[:, i].set(jnp.where(state.done_N, -1, token_N))
    logits_N1V, cache = kinds.of_model(model).decode_step(
        model, params, state.cache, token_N[:, None], state.position_N[:, None], jnp.ones_like(token_N, bool)[:, None],
        state.context)
    rows_N = jnp.arange(token_N.shape[0])
    state = DecodeState(cache, state.context, logits_N1V[:, 0], state.position_N + 1,
                        state.seen_NV.at[rows_N, token_N].set(True), state.done_N | (token_N == end_id), state.step + 1)
    return i + 1, state, out_NC

  out_NC = jnp.full((state.done_N.shape[0], chunk), -1, jnp.int32)
  cond = lambda carry: (carry[0] < jnp.minimum(num_steps, chunk)) & ~jnp.all(carry[1].done_N)
  _, state, out_NC = jax.lax.while_loop(cond, body, (jnp.int32(0), state, out_NC))
  return state, out_NC


def prompt_bucket(longest: int, num_new: int, max_len: int) -> int:
  """The padded prompt length: the next power of two (at least 8), so that prompts of similar
  lengths share one compiled prefill, but never so long that num_new tokens no longer fit."""
  return max(longest, min(max(8, 1 << (longest - 1).bit_length()), max_len - num_new))


def cache_bucket(tokens: int, max_len: int) -> int:
  """Cache slots for `tokens`: a power of two (at least 128), at most max_len. Attention reads every
  slot each step, so the cache grows by buckets as decoding goes on (one compile per bucket)."""
  return min(max_len, max(128, 1 << (tokens - 1).bit_length()))


def room_for(longest_prompt: int, max_new_tokens: int, max_len: int) -> int:
  """How many new tokens fit after the longest prompt; a ConfigError if the prompt fills the context."""
  if longest_prompt >= max_len:
    raise ConfigError(f'a prompt of {longest_prompt} tokens leaves no room in the context of '
                      f'model.max_len={max_len} tokens; shorten it to at most {max_len - 1}')
  return min(max_new_tokens, max_len - longest_prompt)


def generate_ids(model: nn.Module, params, prompts: Sequence[np.ndarray], *, max_new_tokens: int,
                 sampling: Sampling = Sampling(), rng: jax.Array, end_id: int = -1,
                 finished: Callable[[list[np.ndarray]], np.ndarray] | None = None,
                 mesh: jax.sharding.Mesh | None = None, inputs_NS: np.ndarray | None = None) -> list[np.ndarray]:
  """New token ids continuing each prompt, without the end token (an encoder-decoder's decoder
  prompts, one per row of its inputs_NS, padding included).

  Prompts may differ in length (they are left-padded). Generation stops at max_new_tokens (cut to
  the room left in model.max_len), once every row has drawn end_id, or once `finished` (given the
  ids so far, between chunks) says every row is done.
  """
  check_sampling(sampling)
  max_len = model.config.max_len
  longest = max(len(p) for p in prompts)
  if min(len(p) for p in prompts) == 0:
    raise ConfigError('an empty prompt: give at least one token (e.g. the tokenizer\'s document start)')
  num_new = room_for(longest, max_new_tokens, max_len)
  width = prompt_bucket(longest, num_new, max_len)
  prompt_NP = np.zeros((len(prompts), width), np.int32)
  valid_NP = np.zeros((len(prompts), width), bool)
  for row, prompt in enumerate(prompts):
    prompt_NP[row, width - len(prompt):], valid_NP[row, width - len(prompt):] = prompt, True
  cache_len = cache_bucket(width + min(CHUNK, num_new), max_len)
  state = prefill(params, *sharding.replicated(mesh, (prompt_NP, valid_NP, inputs_NS)), model=model,
                  cache_len=cache_len)
  greedy = sampling.temperature == 0
  rng, sampling_arrays, end = sharding.replicated(mesh, (rng, _as_arrays(sampling), np.int32(end_id)))
  chunks, drawn, ids = [], 0, [np.zeros(0, np.int32)] * len(prompts)
  while drawn < num_new:
    needed = cache_bucket(width + drawn + min(CHUNK, num_new - drawn), max_len)
    if needed > cache_len:
      cache_len = needed
      state = state._replace(cache=resize_cache(state.cache, cache_len))
    remaining = sharding.replicated(mesh, np.int32(num_new - drawn))
    state, out_NC = decode_chunk(params, state, rng, sampling_arrays, end, remaining, model=model, greedy=greedy)
    chunks.append(sharding.to_host(out_NC))
    drawn += CHUNK
    ids = _trim(np.concatenate(chunks, axis=1)[:, :num_new], end_id)
    if all(len(row) < min(drawn, num_new) for row in ids) or (finished is not None and np.all(finished(ids))):
      break
  return ids


def cast_weights(params, weights_dtype: str):
  """The parameters to generate with: as stored ('float32'), or with every projection's kernel
  (attention, MLP, an untied output layer) in 'bfloat16' or 'int8' (lm.nn.layers.LowPrecisionKernel);
  embeddings, norms and biases stay as they are."""
  if weights_dtype not in WEIGHTS_DTYPES:
    raise ConfigError(f'weights_dtype={weights_dtype!r}: must be one of {", ".join(WEIGHTS_DTYPES)}')
  if weights_dtype == 'float32':
    return params

  def cast(tree):
    return {k: LowPrecisionKernel.of(v, weights_dtype) if k == 'kernel' and getattr(v, 'ndim', 0) >= 2
            else cast(v) if isinstance(v, dict) else v for k, v in tree.items()}

  return jax.jit(cast)(dict(params))


def _as_arrays(s: Sampling) -> Sampling:
  """As traced arguments: new values reuse the compiled code."""
  return Sampling(np.float32(s.temperature), np.int32(s.top_k), np.float32(s.top_p), np.float32(s.repetition_penalty))


def _trim(out_NT: np.ndarray, end_id: int) -> list[np.ndarray]:
  """Each row up to its first end token or unfilled (-1) slot."""
  rows = []
  for row in out_NT:
    stops = np.flatnonzero((row == end_id) | (row < 0))
    rows.append(row[:stops[0]] if len(stops) else row)
  return rows


def sample(model: nn.Module, params, prompt_ids: np.ndarray, *, num_samples: int, num_tokens: int,
           temperature: float, rng: jax.Array, mesh: jax.sharding.Mesh | None = None,
           input_ids: np.ndarray | None = None, sampling: Sampling | None = None) -> np.ndarray:
  """[num_samples, n] new token ids continuing prompt_ids, n = min(num_tokens, room left in max_len).

  The prompt keeps its last max_len - 1 tokens. An encoder-decoder reads input_ids (a 1-D array,
  padding included) in its encoder; prompt_ids then start the decoder.
  """
  sampling = Sampling(temperature=temperature) if sampling is None else sampling
  max_len = model.config.max_len
  prompt_ids = np.asarray(prompt_ids, np.int32)[-(max_len - 1):]
  num_new = min(num_tokens, max_len - len(prompt_ids))
  inputs_NS = None if input_ids is None else np.tile(np.asarray(input_ids, np.int32), (num_samples, 1))
  return np.stack(generate_ids(model, params, [prompt_ids] * num_samples, max_new_tokens=num_new, sampling=sampling,
                               rng=rng, mesh=mesh, inputs_NS=inputs_NS))
