"""The Transformer's basic layers in Flax linen: initializers, norms, rotary positions, dropout,
projections (with bfloat16/int8 weights for generation) and the MLP. lm/nn/attention.py, lm/nn/moe.py
and lm/nn/block.py build on them; lm/nn/model.py stacks blocks into the decoder and the encoder-decoder.

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
import jax.numpy as jnp
import ml_collections

from lm.nn import mup


def param_init(std: float, axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


def zeros_init(axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def ones_init(axes: tuple[str | None, ...]):
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
    return nn.RMSNorm(epsilon=config.norm_eps, dtype=dtype_of(config), scale_init=ones_init(('embed',)), name=name)
  return nn.LayerNorm(epsilon=config.norm_eps, dtype=dtype_of(config), scale_init=ones_init(('embed',)),
                      bias_init=zeros_init(('embed',)), name=name)


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


def compile_platform() -> str:
  """What the code being traced is for: the active mesh's platform (a TPU slice under lm.plan
  --topology, from a CPU host), else the default backend."""
  device = jax.sharding.get_abstract_mesh().abstract_device
  return device.platform if device is not None else jax.default_backend()


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
    kernel = self.param('kernel', param_init(self.std, self.kernel_axes), self.kernel_shape)
    x_axes, kernel_axes = self.spec.split('->')[0].split(',')
    contracted = len(set(x_axes) & set(kernel_axes))
    # One 2-D matmul ([B * L, D] @ [D, H * K]; the reshapes are free): XLA's CPU backend runs the
    # einsum's batched form with extra transposes, 8% slower in the bench's train step.
    size = math.prod(self.kernel_shape[:contracted])
    if isinstance(kernel, LowPrecisionKernel):  # bfloat16 or int8 weights (lm.inference.decode.cast_weights).
      y = kernel.matmul(x.reshape(-1, size), size).astype(self.dtype)
    else:
      y = jnp.dot(x.astype(self.dtype).reshape(-1, size), kernel.astype(self.dtype).reshape(size, -1))
    y = y.reshape(x.shape[:-contracted] + tuple(self.kernel_shape[contracted:]))
    if not self.use_bias:
      return y
    bias = self.param('bias', zeros_init(self.kernel_axes[contracted:]), self.kernel_shape[contracted:])
    if self.frozen_bias:
      bias = jax.lax.stop_gradient(bias)
    return y + bias.astype(self.dtype)


def activation(config):
  return {'gelu': nn.gelu, 'relu': nn.relu, 'swiglu': nn.silu}[config.mlp]


def expert_width(config) -> int:
  """A routed expert's hidden width: model.moe_mlp_dim, or the MLP's."""
  return config.moe_mlp_dim or mlp_width(config)


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

    h_BLF = activation(c)(dense_in('gate' if c.mlp == 'swiglu' else 'up'))
    if c.mlp == 'swiglu':
      h_BLF = h_BLF * dense_in('up')
    h_BLF = nn.with_logical_constraint(h_BLF, ('batch', 'length', 'mlp'))
    return Projection('BLF,FD->BLD', (width, c.d_model), ('mlp', 'embed'), residual_out_std(c), dtype_of(c),
                      use_bias=c.use_bias, name='down')(h_BLF)
