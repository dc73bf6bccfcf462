"""The Transformer's layers in Flax linen: norms, rotary positions, attention, MLP, mixture of experts,
and the residual block that composes them. lm/model.py stacks blocks into the decoder and the
encoder-decoder.

Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv_heads`, `kv`, `mlp`,
`expert`) and activations are constrained to (`batch`, `length`, ...); the mapping of those names
onto a device mesh lives in the config, so sharding needs no change here.

Shape suffixes: B batch, L length (queries), S length (keys), D d_model, H heads, G kv heads, K head
dim, F mlp_dim, E experts, C expert capacity, V vocab.
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

from lm import mup
from lm.config import ConfigError


def _init(std: float, axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


def _zeros(axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _ones(axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def dtype_of(config) -> jnp.dtype:
  return jnp.dtype(config.dtype)


def mlp_width(config) -> int:
  """model.mlp_dim, or with mlp_dim=0 the usual rule: 4 * d_model, and for SwiGLU (three matrices
  instead of two, so the same parameters) 2/3 of that, rounded up to a multiple of mlp_multiple_of."""
  if config.mlp_dim:
    return config.mlp_dim
  if config.mlp != 'swiglu':
    return 4 * config.d_model
  width = int(2 * 4 * config.d_model / 3)
  return -(-width // config.mlp_multiple_of) * config.mlp_multiple_of


def head_width(config) -> int:
  """Width of one attention head: model.head_dim, or d_model / num_heads."""
  return config.head_dim or config.d_model // config.num_heads


def norm_layer(name: str, config) -> nn.Module:
  """model.norm: LayerNorm (x - mean) / std * scale + bias, or RMSNorm x / rms(x) * scale."""
  if config.norm == 'rmsnorm':
    return nn.RMSNorm(epsilon=config.norm_eps, dtype=dtype_of(config), scale_init=_ones(('embed',)), name=name)
  return nn.LayerNorm(epsilon=config.norm_eps, dtype=dtype_of(config), scale_init=_ones(('embed',)),
                      bias_init=_zeros(('embed',)), name=name)


def hidden_std(config) -> float:
  """Init std of the hidden matrices that read the residual stream (queries, keys, values, MLP in)."""
  return mup.hidden_init_std(config, config.init_std)


def residual_out_std(config) -> float:
  """Init std of the matrices that write into the residual stream (attention out, MLP down)."""
  if config.init == 'gpt2':  # Scaled by depth so the residual stream's variance stays put.
    return mup.hidden_init_std(config, config.init_std / math.sqrt(2 * config.num_layers))
  return hidden_std(config)


def dropout(module: nn.Module, x: jax.Array, rate: float, train: bool) -> jax.Array:
  """x with each entry zeroed with probability `rate` and the rest scaled by 1 / (1 - rate), drawn
  from the module's 'dropout' rng, when training; x itself in eval or at rate 0."""
  if not rate or not train:
    return x
  keep = jax.random.bernoulli(module.make_rng('dropout'), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x)).astype(x.dtype)


def rope_frequencies(config, head_dim: int, positions_BL: jax.Array) -> jax.Array:
  """[K/2] angular frequencies base^(-2i/K) of RoPE, stretched by model.rope_scaling as transformers
  does: 'linear' divides them by the factor; 'llama3' divides those of wavelengths over
  original_len / low_freq_factor, keeps those under original_len / high_freq_factor, and blends in
  between; 'dynamic' (NTK) raises the base once the sequence (the largest position + 1 in this call)
  outgrows original_len: base * (factor * length / original_len - factor + 1)^(K / (K - 2)); 'yarn'
  divides those making fewer than beta_slow turns over original_len, keeps those making more than
  beta_fast, and ramps linearly (by index) between (its score scale is `rope_attention_scale`)."""
  c, half = config, head_dim // 2
  exponents_k = jnp.arange(half, dtype=jnp.float32) / half
  factor, original = c.rope_scaling_factor, c.rope_original_max_len
  if c.rope_scaling == 'dynamic':
    length = jnp.maximum(jnp.max(positions_BL) + 1, original).astype(jnp.float32)
    base = c.rope_base * (factor * length / original - (factor - 1)) ** (head_dim / (head_dim - 2))
    return base ** -exponents_k
  inv_freq_k = c.rope_base ** -exponents_k  # As `rotary` computes it from a base: the same numbers as before.
  if c.rope_scaling == 'linear':
    return inv_freq_k / factor
  if c.rope_scaling == 'yarn':  # transformers' _compute_yarn_parameters (truncated correction range).
    turns_dim = lambda turns: head_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(c.rope_base))
    low = max(math.floor(turns_dim(c.rope_yarn_beta_fast)), 0)
    high = min(math.ceil(turns_dim(c.rope_yarn_beta_slow)), head_dim - 1)
    ramp_k = jnp.clip((jnp.arange(half, dtype=jnp.float32) - low) / (high - low if high != low else 0.001), 0, 1)
    return inv_freq_k / factor * ramp_k + inv_freq_k * (1 - ramp_k)
  if c.rope_scaling == 'llama3':
    wavelength_k = 2 * math.pi / inv_freq_k
    smooth_k = (original / wavelength_k - c.rope_low_freq_factor) / (c.rope_high_freq_factor - c.rope_low_freq_factor)
    blended_k = (1 - smooth_k) * inv_freq_k / factor + smooth_k * inv_freq_k
    long_k = wavelength_k > original / c.rope_low_freq_factor
    short_k = wavelength_k < original / c.rope_high_freq_factor
    return jnp.where(long_k, inv_freq_k / factor, jnp.where(short_k, inv_freq_k, blended_k))
  return inv_freq_k


def rope_attention_scale(config) -> float:
  """What YaRN multiplies cos and sin by (so each score by its square): rope_yarn_attention_factor, or
  0.1 ln(factor) + 1; 1 for every other RoPE."""
  if config.rope_scaling != 'yarn':
    return 1.0
  factor = config.rope_scaling_factor
  return config.rope_yarn_attention_factor or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)


def rotary(x_BLHK: jax.Array, inv_freq_k: jax.Array | float, positions_BL: jax.Array | None = None,
           scale: float = 1.0) -> jax.Array:
  """RoPE: rotates each (x_i, x_{i + K/2}) pair by position * inv_freq_k[i] (a number: the base, for
  base^(-2i/K)), so q.k depends on positions only through their difference; times `scale` (YaRN's).
  Positions default to 0 .. L-1."""
  half = x_BLHK.shape[-1] // 2
  if not isinstance(inv_freq_k, jax.Array):
    inv_freq_k = inv_freq_k ** (-jnp.arange(half, dtype=jnp.float32) / half)
  if positions_BL is None:
    positions_BL = jnp.arange(x_BLHK.shape[1])[None, :]
  angles_BLK = positions_BL.astype(jnp.float32)[..., None] * inv_freq_k
  cos, sin = scale * jnp.cos(angles_BLK)[:, :, None, :], scale * jnp.sin(angles_BLK)[:, :, None, :]
  x1, x2 = x_BLHK[..., :half].astype(jnp.float32), x_BLHK[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BLHK.dtype)


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


def compile_platform() -> str:
  """What the code being traced is for: the active mesh's platform (a TPU slice under lm.plan
  --topology, from a CPU host), else the default backend."""
  device = jax.sharding.get_abstract_mesh().abstract_device
  return device.platform if device is not None else jax.default_backend()


def splash_applies(config, length: int) -> bool:
  """Whether splash attention takes `length` tokens: a multiple of 128 and of its block sizes (or
  shorter than them). Others (the harness's length buckets, a prompt) go through `attention`."""
  per_device = length // jax.sharding.get_abstract_mesh().shape.get('context', 1)  # Queries per device.
  return (length % 128 == 0 and length % min(config.splash_block_kv, length) == 0 and per_device % 128 == 0
          and per_device % min(config.splash_block_q, per_device) == 0)


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


@jax.tree_util.register_pytree_node_class
class LowPrecisionKernel:
  """A projection's kernel stored for generation in bfloat16 or int8 (weight-only: activations stay
  in the model's dtype). int8 keeps a float32 scale per column of the kernel's trailing axes (the
  largest magnitude over its first axis / 127): each entry is round(w / scale). `matmul` widens one
  block of columns at a time to float32 on a CPU, so that the widened copy stays in cache and the
  full-width weights are read once, in their own bytes (XLA's CPU backend converts whole arrays
  slowly); GPU and TPU compilers fuse the widening into the matmul themselves."""

  BLOCK = 512  # Columns widened at once.

  def __init__(self, values, scale=None):
    self.values, self.scale = values, scale  # values has the kernel's shape; scale [1, *shape[1:]] or None.

  @classmethod
  def of(cls, kernel: jax.Array, dtype: str) -> 'LowPrecisionKernel':
    kernel = jnp.asarray(kernel, jnp.float32)
    if dtype == 'bfloat16':
      return cls(kernel.astype(jnp.bfloat16))
    scale = jnp.maximum(jnp.max(jnp.abs(kernel), axis=0, keepdims=True), 1e-30) / 127.0
    return cls(jnp.clip(jnp.round(kernel / scale), -127, 127).astype(jnp.int8), scale)

  @property
  def shape(self) -> tuple[int, ...]:
    return self.values.shape

  def widened(self, values, scale):
    if values.dtype == jnp.bfloat16:  # bfloat16 is float32's upper half: a shift, which vectorizes.
      bits = jax.lax.bitcast_convert_type(values, jnp.uint16).astype(jnp.uint32) << 16
      return jax.lax.bitcast_convert_type(bits, jnp.float32)
    return values.astype(jnp.float32) * scale

  def matmul(self, x_NI: jax.Array, size: int) -> jax.Array:
    """x [N, size] @ the kernel as [size, columns], in float32."""
    values = self.values.reshape(size, -1)
    columns = values.shape[1]
    x_NI = x_NI.astype(jnp.float32)
    # The scales as [R, columns]: R = 1, or where the product contracts two axes (attention's output
    # projection) one row per entry of the second, each repeated for every entry of the first.
    scale = None if self.scale is None else self.scale.reshape(-1, columns)
    if compile_platform() != 'cpu':  # GPU and TPU compilers fuse the widening into the matmul.
      scale = None if scale is None else jnp.tile(scale, (size // scale.shape[0], 1))
      return x_NI @ self.widened(values, scale)
    block = next((b for b in range(min(self.BLOCK, columns), 127, -1) if columns % b == 0), columns)

    def one(c):
      v = jax.lax.dynamic_slice_in_dim(values, c * block, block, axis=1)
      if scale is None:
        return x_NI @ self.widened(v, None)
      s = jax.lax.dynamic_slice_in_dim(scale, c * block, block, axis=1)
      return x_NI @ self.widened(v.reshape(-1, s.shape[0], block), s[None]).reshape(size, block)

    y_CNB = jax.lax.map(one, jnp.arange(columns // block))
    return y_CNB.transpose(1, 0, 2).reshape(x_NI.shape[0], columns)

  def tree_flatten(self):
    return (self.values, self.scale), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children)


class Projection(nn.Module):
  """x @ kernel + bias over named axes, e.g. 'BLD,DHK->BLHK': x's trailing axes contract with the
  kernel's leading ones. The kernel keeps its shape whole, so its logical axes hold at init too."""

  spec: str
  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  std: float
  dtype: jnp.dtype
  use_bias: bool = True
  frozen_bias: bool = False  # The bias gets no gradient (for one whose true gradient is zero).

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', _init(self.std, self.kernel_axes), self.kernel_shape)
    x_axes, kernel_axes = self.spec.split('->')[0].split(',')
    contracted = len(set(x_axes) & set(kernel_axes))
    # One 2-D matmul ([B * L, D] @ [D, H * K]; the reshapes are free): XLA's CPU backend runs the
    # einsum's batched form with extra transposes, 8% slower in the bench's train step.
    size = math.prod(self.kernel_shape[:contracted])
    if isinstance(kernel, LowPrecisionKernel):  # Generating with bfloat16 or int8 weights (lm.decode.cast_weights).
      y = kernel.matmul(x.reshape(-1, size), size).astype(self.dtype)
    else:
      y = jnp.dot(x.astype(self.dtype).reshape(-1, size), kernel.astype(self.dtype).reshape(size, -1))
    y = y.reshape(x.shape[:-contracted] + tuple(self.kernel_shape[contracted:]))
    if not self.use_bias:
      return y
    bias = self.param('bias', _zeros(self.kernel_axes[contracted:]), self.kernel_shape[contracted:])
    if self.frozen_bias:
      bias = jax.lax.stop_gradient(bias)
    return y + bias.astype(self.dtype)


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
      head_norm = lambda name: nn.RMSNorm(c.qk_norm_eps, dtype_of(c), scale_init=_ones(('kv',)), name=name)
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


def _activation(config):
  return {'gelu': nn.gelu, 'relu': nn.relu, 'swiglu': nn.silu}[config.mlp]


class Mlp(nn.Module):
  """Dense -> activation -> Dense; with 'swiglu', silu(gate(x)) * up(x) -> Dense."""

  config: ml_collections.FrozenConfigDict
  train: bool = False

  @nn.compact
  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    c = self.config
    width = mlp_width(c)

    def dense_in(name):
      return Projection('BLD,DF->BLF', (c.d_model, width), ('embed', 'mlp'), hidden_std(c), dtype_of(c),
                        use_bias=c.use_bias, name=name)(x_BLD)

    h_BLF = _activation(c)(dense_in('gate' if c.mlp == 'swiglu' else 'up'))
    if c.mlp == 'swiglu':
      h_BLF = h_BLF * dense_in('up')
    h_BLF = nn.with_logical_constraint(h_BLF, ('batch', 'length', 'mlp'))
    return Projection('BLF,FD->BLD', (width, c.d_model), ('mlp', 'embed'), residual_out_std(c), dtype_of(c),
                      use_bias=c.use_bias, name='down')(h_BLF)


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
    router_DE = self.param('router_kernel', _init(c.init_std, ('embed', None)), (c.d_model, num_experts))
    router_logits_BLE = jnp.einsum('BLD,DE->BLE', x_BLD.astype(jnp.float32), router_DE)
    if c.parametrization == 'mup':  # A readout: from the width to a fixed number of experts.
      router_logits_BLE = router_logits_BLE * mup.readout_multiplier(c)
    probs_BLE = jax.nn.softmax(router_logits_BLE, axis=-1)
    self.sow('aux_loss', 'moe_balance', balance_loss(probs_BLE, c.moe_top_k))
    dispatch_BLEC, combine_BLEC = route(probs_BLE, c.moe_top_k, expert_capacity(c, x_BLD.shape[1]))
    x_EBCD = jnp.einsum('BLEC,BLD->EBCD', dispatch_BLEC.astype(dtype), x_BLD.astype(dtype))
    x_EBCD = nn.with_logical_constraint(x_EBCD, ('expert', 'batch', None, 'embed'))

    def expert_in(name):
      kernel = self.param(f'{name}_kernel', _init(hidden_std(c), ('expert', 'embed', 'mlp')),
                          (num_experts, c.d_model, width))
      h_EBCF = jnp.einsum('EBCD,EDF->EBCF', x_EBCD, kernel.astype(dtype))
      if c.use_bias:
        bias = self.param(f'{name}_bias', _zeros(('expert', 'mlp')), (num_experts, width))
        h_EBCF += bias.astype(dtype)[:, None, None]
      return h_EBCF

    h_EBCF = _activation(c)(expert_in('gate' if c.mlp == 'swiglu' else 'up'))
    if c.mlp == 'swiglu':
      h_EBCF = h_EBCF * expert_in('up')
    h_EBCF = nn.with_logical_constraint(h_EBCF, ('expert', 'batch', None, 'mlp'))
    down_EFD = self.param('down_kernel', _init(residual_out_std(c), ('expert', 'mlp', 'embed')),
                          (num_experts, width, c.d_model))
    y_EBCD = jnp.einsum('EBCF,EFD->EBCD', h_EBCF, down_EFD.astype(dtype))
    if c.use_bias:
      down_bias = self.param('down_bias', _zeros(('expert', 'embed')), (num_experts, c.d_model))
      y_EBCD += down_bias.astype(dtype)[:, None, None]
    return jnp.einsum('BLEC,EBCD->BLD', combine_BLEC.astype(dtype), y_EBCD)


class Block(nn.Module):
  """Residual block: self-attention, then (encoder-decoder only) cross-attention to the encoder
  output, then an MLP or mixture of experts; each sublayer with a norm before (pre) or after
  (post) its residual add, and residual dropout on its output."""

  config: ml_collections.FrozenConfigDict
  train: bool = False
  causal: bool = True  # False: bidirectional (the encoder).
  cross: bool = False  # Attend to a context (the encoder output) after self-attention.
  moe: bool = False  # A mixture of experts instead of the MLP.
  decode: bool = False  # Self-attention over a KV cache.

  @nn.compact
  def __call__(self, x_BLD: jax.Array, context_BSD: jax.Array | None = None, self_mask=None, context_mask=None,
               positions_BL=None, valid_BL=None, segments_BL=None):
    c = self.config
    sublayers = [('attention', lambda x: Attention(c, self.train, self.decode, self.causal, name='attention')(
        x, self_mask, None, positions_BL, valid_BL, segments_BL))]
    if self.cross:
      sublayers.append(('cross_attention', lambda x: Attention(c, self.train, name='cross_attention')(
          x, context_mask, context_BSD)))
    ffn = MoeMlp(c, self.train, name='moe') if self.moe else Mlp(c, self.train, name='mlp')
    sublayers.append(('moe' if self.moe else 'mlp', ffn))
    for name, layer in sublayers:
      norm = norm_layer(f'ln_{name}', c)
      if c.norm_position == 'pre':  # x + f(norm(x)): the residual stream itself is never normalised.
        x_BLD = x_BLD + dropout(self, layer(norm(x_BLD)), c.residual_dropout, self.train)
      else:  # norm(x + f(x)), as in the original Transformer.
        x_BLD = norm(x_BLD + dropout(self, layer(x_BLD), c.residual_dropout, self.train))
      x_BLD = nn.with_logical_constraint(x_BLD, ('batch', 'length', 'embed'))
    return (x_BLD, None) if c.scan_layers else x_BLD  # nn.scan wants (carry, output).
