"""Attention: masks (causal, sliding window, documents), the blocked XLA attention and its KV-cache
form, the splash (TPU) and cuDNN (GPU) kernels and which one applies, and the attention layer.

Shape suffixes as in lm/nn/layers.py.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
import jax.numpy as jnp
import ml_collections
import numpy as np

from lm.config import ConfigError, splash_length_misfit
from lm.nn import mup
from lm.nn.layers import (
  Projection,
  compile_platform,
  dropout,
  dtype_of,
  head_width,
  hidden_std,
  ones_init,
  residual_out_std,
  rope_attention_scale,
  rope_frequencies,
  rotary,
)

ATTENTION_BLOCK = 128  # Queries per block of causal attention (see `attention`).



def causal_mask(length: int, window: int = 0) -> jax.Array:
  """[L, L] bool: query i may see key j iff j <= i (and, with a window w > 0, i - w < j)."""
  mask_LL = jnp.tril(jnp.ones((length, length), dtype=bool))
  if window:
    mask_LL &= ~jnp.tril(jnp.ones((length, length), dtype=bool), k=-window)
  return mask_LL


def segment_positions(segments_BL: jax.Array) -> jax.Array:
  """Each token's position within its run of equal segment ids (0 at each document's first token)."""
  index_BL = jnp.broadcast_to(jnp.arange(segments_BL.shape[1]), segments_BL.shape)
  starts_BL = jnp.concatenate([jnp.ones_like(segments_BL[:, :1], bool), segments_BL[:, 1:] != segments_BL[:, :-1]], 1)
  return index_BL - jax.lax.cummax(jnp.where(starts_BL, index_BL, 0), axis=1)


def same_segment(q_segments_BL: jax.Array, k_segments_BS: jax.Array) -> jax.Array:
  """[B, L, S] bool: query i and key j belong to the same document."""
  return q_segments_BL[:, :, None] == k_segments_BS[:, None, :]


def attention(q_BLHK: jax.Array, k_BGSK: jax.Array, v_BGSK: jax.Array, mask: jax.Array | None,
              probs_dropout=lambda p: p, causal_block: int = 0, window: int = 0,
              divisor: float | None = None) -> jax.Array:
  """softmax(Q K^T / divisor) V where `mask` (broadcastable to [B, L, S]) is True; divisor defaults to
  sqrt(d_k) (see mup.attention_divisor); scores and softmax in float32. Keys and values come
  heads-major (the KV cache's layout, so decoding reads it without transposing); each of their G heads
  serves H / G query heads (grouped-query attention).

  causal_block > 0 promises a causal mask over keys at the queries' positions (and, with window > 0,
  one that drops keys `window` or more positions back): queries then go in blocks of that many, each
  scored against only the keys its mask can keep. The same result, without computing the (up to
  half) of the scores that the mask would discard.
  """
  batch, length, heads, head_dim = q_BLHK.shape
  groups, keys = k_BGSK.shape[1], k_BGSK.shape[2]
  if mask is not None:
    mask = jnp.broadcast_to(mask, (batch, length, keys))
  if causal_block and length > causal_block:
    outs = []
    for start in range(0, length, causal_block):
      stop = min(start + causal_block, length)
      first = max(0, start - window + 1) if window else 0
      outs.append(attention(q_BLHK[:, start:stop], k_BGSK[:, :, first:stop], v_BGSK[:, :, first:stop],
                            None if mask is None else mask[:, start:stop, first:stop], probs_dropout,
                            divisor=divisor))
    return jnp.concatenate(outs, axis=1)
  q_BGRLK = q_BLHK.reshape(batch, length, groups, heads // groups, head_dim).transpose(0, 2, 3, 1, 4)
  scores_BGRLS = jnp.einsum('bgrlk,bgsk->bgrls', q_BGRLK, k_BGSK).astype(jnp.float32) / (divisor or math.sqrt(head_dim))
  if mask is not None:
    scores_BGRLS = jnp.where(mask[:, None, None], scores_BGRLS, jnp.finfo(jnp.float32).min)
  probs_BGRLS = probs_dropout(jax.nn.softmax(scores_BGRLS, axis=-1)).astype(v_BGSK.dtype)
  out_BGRLK = jnp.einsum('bgrls,bgsk->bgrlk', probs_BGRLS, v_BGSK)
  return out_BGRLK.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim)


def attention_with_cache(q_BLHK: jax.Array, k_BGKS: jax.Array, v_BGSK: jax.Array, cached_BLS: jax.Array,
                         k_BGLK: jax.Array, v_BGLK: jax.Array, own_BLL: jax.Array,
                         divisor: float | None = None) -> jax.Array:
  """`attention` over cached keys [B, G, K, S] and values [B, G, S, K] where cached_BLS, and over the
  queries' own keys and values [B, G, L, K] where own_BLL: one softmax over both, without joining
  them into one array (which would copy the cache)."""
  batch, length, heads, head_dim = q_BLHK.shape
  groups = k_BGKS.shape[1]
  scale = divisor or math.sqrt(head_dim)
  q_BGRLK = q_BLHK.reshape(batch, length, groups, heads // groups, head_dim).transpose(0, 2, 3, 1, 4)
  lowest = jnp.finfo(jnp.float32).min
  cached_BGRLS = jnp.where(cached_BLS[:, None, None], jnp.einsum('bgrlk,bgks->bgrls', q_BGRLK, k_BGKS).astype(
      jnp.float32) / scale, lowest)
  own_BGRLM = jnp.where(own_BLL[:, None, None], jnp.einsum('bgrlk,bgmk->bgrlm', q_BGRLK, k_BGLK).astype(
      jnp.float32) / scale, lowest)
  top_BGRL1 = jnp.maximum(cached_BGRLS.max(-1, keepdims=True), own_BGRLM.max(-1, keepdims=True))
  cached_BGRLS, own_BGRLM = jnp.exp(cached_BGRLS - top_BGRL1), jnp.exp(own_BGRLM - top_BGRL1)
  total_BGRL1 = cached_BGRLS.sum(-1, keepdims=True) + own_BGRLM.sum(-1, keepdims=True)
  out_BGRLK = (jnp.einsum('bgrls,bgsk->bgrlk', cached_BGRLS.astype(v_BGSK.dtype), v_BGSK)
               + jnp.einsum('bgrlm,bgmk->bgrlk', own_BGRLM.astype(v_BGLK.dtype), v_BGLK)) / total_BGRL1
  return out_BGRLK.astype(q_BLHK.dtype).transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim)


def attention_implementation(config) -> str:
  """model.attention_impl resolved: 'auto' is 'cudnn' (cuDNN's flash attention) on a GPU in bfloat16
  and 'splash' (Pallas splash attention) on a TPU, both without attention dropout, else 'xla'
  (`attention`). Splash then serves causal self-attention of lengths it takes (`splash_applies`)."""
  backend = compile_platform()
  if config.attention_impl == 'cudnn' and backend != 'gpu':
    raise ConfigError(f"model.attention_impl='cudnn' needs a GPU (this backend: {backend}); use 'auto' or 'xla'")
  if config.attention_impl != 'auto':
    return config.attention_impl
  if config.attention_dropout:
    return 'xla'
  return 'cudnn' if backend == 'gpu' and config.dtype == 'bfloat16' else 'splash' if backend == 'tpu' else 'xla'


def splash_applies(config, length: int) -> bool:
  """Whether splash attention takes `length` tokens on the mesh in context (lm.config's one rule,
  `splash_length_misfit`). Others (the harness's length buckets, a prompt) go through `attention`."""
  return splash_length_misfit(config, length, jax.sharding.get_abstract_mesh().shape.get('context', 1)) is None


def _splash_kernel(length: int, group: int, window: int, block_q: int, block_kv: int, q_shards: int,
                   interpret: bool):
  """The splash kernel of one key-value head and its `group` query heads: causal over `length`
  tokens, within `window` (0: all earlier tokens), its mask tables cut into `q_shards` stretches of
  queries (one per device along 'context')."""
  shape = (length, length)
  mask = splash_mask.LocalMask(shape, (window - 1, 0), 0) if window else splash_mask.CausalMask(shape)
  q, kv = min(block_q, length // q_shards), min(block_kv, length)
  sizes = splash_kernel.BlockSizes(block_q=q, block_kv=kv, block_kv_compute=kv, block_q_dkv=q, block_kv_dkv=kv,
                                   block_kv_dkv_compute=kv, block_q_dq=q, block_kv_dq=kv)
  # Made afresh in each trace (its mask tables become that trace's constants), never cached across traces.
  return splash_kernel.make_splash_mqa(splash_mask.MultiHeadMask([mask] * group), block_sizes=sizes,
                                       head_shards=1, q_seq_shards=q_shards, interpret=interpret)


def splash_attention(q_BLHK: jax.Array, k_BSGK: jax.Array, v_BSGK: jax.Array, segments_BL: jax.Array | None,
                     window: int, block_q: int, block_kv: int, divisor: float | None = None) -> jax.Array:
  """Causal self-attention (within `window`, and within each document of segments_BL) by Pallas
  splash attention: compiled for a TPU, interpreted elsewhere (the same numbers, slowly). Each
  key-value head with its query heads is one MQA kernel call, mapped over heads and rows. Under a
  mesh the call goes through shard_map, rows split as 'batch' and key-value heads as 'kv_heads' are
  (where they divide), since a TPU kernel cannot be partitioned by XLA."""
  batch, length, heads, head_dim = q_BLHK.shape
  groups = k_BSGK.shape[2]
  q_BGRLK = (q_BLHK / (divisor or math.sqrt(head_dim))).astype(q_BLHK.dtype).reshape(
      batch, length, groups, heads // groups, head_dim).transpose(0, 2, 3, 1, 4)
  k_BGSK, v_BGSK = k_BSGK.transpose(0, 2, 1, 3), v_BSGK.transpose(0, 2, 1, 3)
  if segments_BL is None:
    segments_BL = jnp.zeros((batch, length), jnp.int32)
  segments_BL = segments_BL.astype(jnp.int32)
  mesh = jax.sharding.get_abstract_mesh()
  context = 'context' if not mesh.empty and mesh.shape.get('context', 1) > 1 else None
  kernel = _splash_kernel(length, heads // groups, window, block_q, block_kv, mesh.shape[context] if context else 1,
                          compile_platform() != 'tpu')

  def attend(kernel, q_BGRLK, k_BGSK, v_BGSK, q_segments_BL, kv_segments_BS):
    one = lambda q, k, v, qs, ks: kernel(q, k, v, segment_ids=splash_kernel.SegmentIds(qs, ks))
    return jax.vmap(jax.vmap(one, (0, 0, 0, None, None)))(q_BGRLK, k_BGSK, v_BGSK, q_segments_BL, kv_segments_BS)

  if not mesh.empty and mesh.size > 1:
    # Each device attends its rows and key-value heads; under context parallelism also its stretch of
    # queries (with its part of the kernel's mask tables) to all the keys and values.
    rows, kv_heads = (_divides(nn.logical_to_mesh_axes((name,))[0], size, mesh)
                      for name, size in (('batch', batch), ('kv_heads', groups)))
    P = jax.sharding.PartitionSpec
    kernel_spec = kernel.manual_sharding_spec(jax.sharding.NamedSharding(mesh, P(None, context)))
    queries = P(rows, kv_heads, None, context)
    attend = jax.shard_map(attend, mesh=mesh, in_specs=(kernel_spec, queries, P(rows, kv_heads), P(rows, kv_heads),
                                                        P(rows, context), P(rows)),
                           out_specs=queries, check_vma=False)
  out_BGRLK = attend(kernel, q_BGRLK, k_BGSK, v_BGSK, segments_BL, segments_BL)
  return out_BGRLK.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim)


def _divides(axes, size: int, mesh) -> str | tuple[str, ...] | None:
  """The mesh axes (as the logical rules give them) if their devices split `size` evenly, else None."""
  if axes is None:
    return None
  names = (axes,) if isinstance(axes, str) else tuple(axes)
  return axes if size % int(np.prod([mesh.shape[n] for n in names])) == 0 else None


def fused_attention(q_BLHK: jax.Array, k_BSGK: jax.Array, v_BSGK: jax.Array, mask: jax.Array | None, causal: bool,
                    window: int = 0, implementation: str = 'cudnn', divisor: float | None = None) -> jax.Array:
  """`attention` by jax.nn.dot_product_attention (keys and values sequence-major): a causal mask, with
  its window, passed as such, so that cuDNN skips what it drops. Any other mask goes as a boolean
  array: with `causal`, a per-row [B, L, S] mask (documents) is applied on top, while the shared
  [L, L] causal mask itself is left to is_causal."""
  scale = None if divisor is None else 1.0 / divisor
  if causal and (mask is None or mask.ndim == 2):
    mask = None
  if mask is not None:
    mask = jnp.broadcast_to(mask, (q_BLHK.shape[0], q_BLHK.shape[1], k_BSGK.shape[1]))[:, None]
  return jax.nn.dot_product_attention(q_BLHK, k_BSGK, v_BSGK, mask=mask, is_causal=causal, scale=scale,
                                      implementation=implementation,
                                      local_window_size=(window - 1, 0) if causal and window else None)


class Attention(nn.Module):
  """Multi-head attention of x over itself, or (cross-attention) over a context sequence."""

  config: ml_collections.FrozenConfigDict
  train: bool = False
  decode: bool = False  # Self-attention over a KV cache (see `cached_keys`).
  causal: bool = False  # Self-attention under the causal mask (see `attention`'s causal_block).

  def cached_attention(self, q_BLHK: jax.Array, k_BGLK: jax.Array, v_BGLK: jax.Array, positions_BL: jax.Array,
                       valid_BL: jax.Array) -> jax.Array:
    """Attention of this call's queries over the 'cache' collection's keys and values (those of earlier
    calls) and this call's own, which are then written into it after the earlier ones.

    The cache holds keys [B, G, K, S] (slot-minor, as the scores' matmul reads them) and values
    [B, G, S, K]; S is max_len as created here, or shorter (lm.kinds.init_cache), so that decoding
    attends over the slots in use, not all max_len. A query sees the cached slots that are written,
    valid (not padding) and within the window, and this call's tokens up to itself."""
    c = self.config
    batch, groups, length, head_dim = k_BGLK.shape
    initialised = self.has_variable('cache', 'cached_key')
    key = self.variable('cache', 'cached_key', jnp.zeros, (batch, groups, head_dim, c.max_len), k_BGLK.dtype)
    value = self.variable('cache', 'cached_value', jnp.zeros, (batch, groups, c.max_len, head_dim), v_BGLK.dtype)
    slot_positions = self.variable('cache', 'cached_positions', jnp.zeros, (batch, c.max_len), jnp.int32)
    slot_valid = self.variable('cache', 'cached_valid', jnp.zeros, (batch, c.max_len), bool)
    index = self.variable('cache', 'cache_index', lambda: jnp.zeros((), jnp.int32))
    start = index.value
    cached_BLS = slot_valid.value[:, None, :] & (jnp.arange(key.value.shape[3]) < start)[None, None, :]
    own_BLL = valid_BL[:, None, :] & jnp.tril(jnp.ones((length, length), bool))[None]
    if c.sliding_window:
      cached_BLS &= positions_BL[:, :, None] - slot_positions.value[:, None, :] < c.sliding_window
      own_BLL &= positions_BL[:, :, None] - positions_BL[:, None, :] < c.sliding_window
    out_BLHK = attention_with_cache(q_BLHK, key.value, value.value, cached_BLS, k_BGLK, v_BGLK, own_BLL,
                                    _score_divisor(c, head_dim))
    # What is written depends on what was read (plus 0 times it), so XLA orders the writes after the
    # reads and updates the cache in place; otherwise its CPU backend copied each cache twice a step.
    anchor_B1L1 = 0.0 * out_BLHK[:, :, :1, :1].transpose(0, 2, 1, 3).astype(k_BGLK.dtype)
    k_BGLK, v_BGLK = k_BGLK + anchor_B1L1, v_BGLK + anchor_B1L1
    if initialised:  # (At init the cache is only being created.)
      key.value = jax.lax.dynamic_update_slice(key.value, k_BGLK.transpose(0, 1, 3, 2), (0, 0, 0, start))
      value.value = jax.lax.dynamic_update_slice(value.value, v_BGLK, (0, 0, start, 0))
      slot_positions.value = jax.lax.dynamic_update_slice(slot_positions.value, positions_BL.astype(jnp.int32),
                                                          (0, start))
      slot_valid.value = jax.lax.dynamic_update_slice(slot_valid.value, valid_BL, (0, start))
      index.value = start + length
    return out_BLHK

  @nn.compact
  def __call__(self, x_BLD: jax.Array, mask: jax.Array | None, context_BSD: jax.Array | None = None,
               positions_BL: jax.Array | None = None, valid_BL: jax.Array | None = None,
               segments_BL: jax.Array | None = None) -> jax.Array:
    """positions_BL (default 0 .. L-1) place the tokens for RoPE and the cache; valid_BL marks the
    tokens that are not padding (decode only: `mask` covers the rest). segments_BL (document masking)
    is what splash attention reads instead of `mask`, which says the same."""
    c = self.config
    head_dim = head_width(c)
    kv_heads = c.num_kv_heads or c.num_heads
    source_BSD = x_BLD if context_BSD is None else context_BSD

    # A key bias b adds q.b to all scores of a query, which softmax ignores: its gradient is zero but
    # for rounding noise that Adam would amplify into a random walk, so it is frozen (GPT-2 has one,
    # hence it exists). Rotated (RoPE) or normalised (QK-norm) keys make it matter: then it learns.
    frozen_key_bias = not c.qk_norm and (c.positions != 'rope' or context_BSD is not None)

    def project(name, x, heads, heads_axis):
      return Projection('BLD,DHK->BLHK', (c.d_model, heads, head_dim), ('embed', heads_axis, 'kv'), hidden_std(c),
                        dtype_of(c), use_bias=c.use_bias or c.qkv_bias,
                        frozen_bias=name == 'key' and frozen_key_bias, name=name)(x)

    q_BLHK = project('query', x_BLD, c.num_heads, 'heads')
    k_BSGK = project('key', source_BSD, kv_heads, 'kv_heads')
    v_BSGK = project('value', source_BSD, kv_heads, 'kv_heads')
    if jax.sharding.get_abstract_mesh().shape.get('context', 1) > 1:
      # Context parallelism: each device's queries (a stretch of the sequence) attend to every key and
      # value, gathered from the devices along 'context' (as MaxText's all-gather context parallelism).
      k_BSGK, v_BSGK = (nn.with_logical_constraint(t, ('batch', None, 'kv_heads', 'kv')) for t in (k_BSGK, v_BSGK))
    if c.qk_norm:  # RMS-normalise each head's query and key (bounds the attention logits).
      head_norm = lambda name: nn.RMSNorm(c.qk_norm_eps, dtype_of(c), scale_init=ones_init(('kv',)), name=name)
      q_BLHK, k_BSGK = head_norm('query_norm')(q_BLHK), head_norm('key_norm')(k_BSGK)
    if c.positions == 'rope' and context_BSD is None:  # Cross-attention compares no positions.
      if positions_BL is None:
        positions_BL = jnp.arange(x_BLD.shape[1])[None, :]
      inv_freq_k = rope_frequencies(c, head_dim, positions_BL)
      scale = rope_attention_scale(c)
      q_BLHK, k_BSGK = rotary(q_BLHK, inv_freq_k, positions_BL, scale), rotary(k_BSGK, inv_freq_k, positions_BL, scale)
    dropout_on = self.train and c.attention_dropout
    implementation = attention_implementation(c)
    if (implementation == 'splash' and self.causal and context_BSD is None and not self.decode and not dropout_on
        and splash_applies(c, x_BLD.shape[1])):
      out_BLHK = splash_attention(q_BLHK, k_BSGK, v_BSGK, segments_BL, c.sliding_window, c.splash_block_q,
                                  c.splash_block_kv, _score_divisor(c, head_dim))
    elif implementation == 'cudnn' and not self.decode and not dropout_on:
      out_BLHK = fused_attention(q_BLHK, k_BSGK, v_BSGK, mask, self.causal, c.sliding_window, 'cudnn',
                                 _score_divisor(c, head_dim))
    else:
      out_BLHK = self._attend(q_BLHK, k_BSGK, v_BSGK, mask, positions_BL, valid_BL)
    out_BLHK = nn.with_logical_constraint(out_BLHK, ('batch', 'length', 'heads', 'kv'))
    return Projection('BLHK,HKD->BLD', (c.num_heads, head_dim, c.d_model), ('heads', 'kv', 'embed'),
                      residual_out_std(c), dtype_of(c), use_bias=c.use_bias, name='out')(out_BLHK)

  def _attend(self, q_BLHK, k_BSGK, v_BSGK, mask, positions_BL, valid_BL) -> jax.Array:
    """`attention`, over the KV cache when decoding."""
    c = self.config
    k_BGSK, v_BGSK = k_BSGK.transpose(0, 2, 1, 3), v_BSGK.transpose(0, 2, 1, 3)
    if self.decode:
      if positions_BL is None or valid_BL is None:
        raise ValueError('decoding with a KV cache needs positions_BL and valid_BL')
      return self.cached_attention(q_BLHK, k_BGSK, v_BGSK, positions_BL, valid_BL)
    # Causal self-attention skips the scores its mask drops; not with attention dropout, whose masks
    # are drawn at the shape of all the scores.
    blocked = self.causal and not (self.train and c.attention_dropout)
    return attention(q_BLHK, k_BGSK, v_BGSK, mask, lambda p: dropout(self, p, c.attention_dropout, self.train),
                     causal_block=ATTENTION_BLOCK if blocked else 0, window=c.sliding_window,
                     divisor=_score_divisor(c, q_BLHK.shape[-1]))


def _score_divisor(config, head_dim: int) -> float | None:
  """mup.attention_divisor, or None (each implementation's own 1 / sqrt(head_dim)) under SP."""
  return mup.attention_divisor(config, head_dim) if config.parametrization == 'mup' else None
