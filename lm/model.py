"""A GPT-style decoder-only Transformer in Flax linen.

Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv_heads`, `kv`, `mlp`) and every
activation is constrained to (`batch`, `length`, ...); the mapping of those names onto a device
mesh lives in the config, so sharding needs no change here.

Shape suffixes: B batch, L length, D d_model, H heads, G kv heads, K head dim, F mlp_dim, V vocab.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections


def _init(std: float, axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


def _zeros(axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _ones(axes: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def norm_layer(name: str, config) -> nn.Module:
  """model.norm: LayerNorm (x - mean) / std * scale + bias, or RMSNorm x / rms(x) * scale."""
  if config.norm == 'rmsnorm':
    return nn.RMSNorm(epsilon=1e-5, dtype=_dtype(config), scale_init=_ones(('embed',)), name=name)
  return nn.LayerNorm(epsilon=1e-5, dtype=_dtype(config), scale_init=_ones(('embed',)),
                      bias_init=_zeros(('embed',)), name=name)


def residual_out_std(config) -> float:
  """Init std of the matrices that write into the residual stream (attention out, MLP down)."""
  if config.init == 'gpt2':  # Scaled by depth so the residual stream's variance stays put.
    return config.init_std / math.sqrt(2 * config.num_layers)
  return config.init_std


def rotary(x_BLHK: jax.Array, base: float) -> jax.Array:
  """RoPE: rotates each (x_i, x_{i + K/2}) pair by position * base^(-2i/K), so q.k depends on
  positions only through their difference."""
  half = x_BLHK.shape[-1] // 2
  inv_freq_k = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles_LK = jnp.arange(x_BLHK.shape[1], dtype=jnp.float32)[:, None] * inv_freq_k[None, :]
  cos, sin = jnp.cos(angles_LK)[None, :, None, :], jnp.sin(angles_LK)[None, :, None, :]
  x1, x2 = x_BLHK[..., :half].astype(jnp.float32), x_BLHK[..., half:].astype(jnp.float32)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BLHK.dtype)


def _dtype(config) -> jnp.dtype:
  return jnp.dtype(config.dtype)


def causal_attention(q_BLHK: jax.Array, k_BLHK: jax.Array, v_BLHK: jax.Array, window: int = 0) -> jax.Array:
  """softmax(Q K^T / sqrt(d_k)) V with position i attending to positions <= i (and, with a
  window w > 0, only to the last w of them: i - w < j <= i)."""
  q_BHLK, k_BHLK, v_BHLK = (x.transpose(0, 2, 1, 3) for x in (q_BLHK, k_BLHK, v_BLHK))
  scores_BHLL = (q_BHLK @ k_BHLK.swapaxes(-1, -2)) / math.sqrt(q_BLHK.shape[-1])
  length = q_BLHK.shape[1]
  causal_LL = jnp.tril(jnp.ones((length, length), dtype=bool))
  if window:
    causal_LL &= ~jnp.tril(jnp.ones((length, length), dtype=bool), k=-window)
  scores_BHLL = jnp.where(causal_LL, scores_BHLL.astype(jnp.float32), jnp.finfo(jnp.float32).min)
  probs_BHLL = jax.nn.softmax(scores_BHLL, axis=-1).astype(v_BLHK.dtype)
  return (probs_BHLL @ v_BHLK).transpose(0, 2, 1, 3)


class Projection(nn.Module):
  """x @ kernel + bias over named axes, e.g. 'BLD,DHK->BLHK' (einsum keeps the kernel's shape whole,
  so its logical axes hold at init too)."""

  spec: str
  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  std: float
  dtype: jnp.dtype
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', _init(self.std, self.kernel_axes), self.kernel_shape)
    y = jnp.einsum(self.spec, x.astype(self.dtype), kernel.astype(self.dtype))
    if not self.use_bias:
      return y
    x_axes, out_axes = self.spec.split(',')[0], self.spec.split('->')[1]
    out_dims = sum(a not in x_axes for a in out_axes)  # The kernel's trailing output axes.
    bias = self.param('bias', _zeros(self.kernel_axes[-out_dims:]), self.kernel_shape[-out_dims:])
    return y + bias.astype(self.dtype)


class Attention(nn.Module):
  """Causal multi-head self-attention."""

  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    c = self.config
    head_dim = c.d_model // c.num_heads
    out_std = residual_out_std(c)

    kv_heads = c.num_kv_heads or c.num_heads

    def project(name, heads, heads_axis):
      # No key bias: it adds q.b to every score of a query's row, which softmax ignores (its
      # gradient is zero, up to rounding noise that Adam would amplify).
      return Projection('BLD,DHK->BLHK', (c.d_model, heads, head_dim), ('embed', heads_axis, 'kv'),
                        c.init_std, _dtype(c), use_bias=c.use_bias and name != 'key', name=name)(x_BLD)

    q_BLHK = project('query', c.num_heads, 'heads')
    k_BLGK, v_BLGK = project('key', kv_heads, 'kv_heads'), project('value', kv_heads, 'kv_heads')
    if c.qk_norm:  # RMS-normalise each head's query and key (bounds the attention logits).
      q_BLHK = nn.RMSNorm(epsilon=1e-6, dtype=_dtype(c), scale_init=_ones(('kv',)), name='query_norm')(q_BLHK)
      k_BLGK = nn.RMSNorm(epsilon=1e-6, dtype=_dtype(c), scale_init=_ones(('kv',)), name='key_norm')(k_BLGK)
    if c.positions == 'rope':
      q_BLHK, k_BLGK = rotary(q_BLHK, c.rope_base), rotary(k_BLGK, c.rope_base)
    # Grouped-query attention: each of the kv_heads serves num_heads / kv_heads query heads.
    k_BLHK, v_BLHK = (jnp.repeat(x, c.num_heads // kv_heads, axis=2) for x in (k_BLGK, v_BLGK))
    out_BLHK = causal_attention(q_BLHK, k_BLHK, v_BLHK, c.sliding_window)
    out_BLHK = nn.with_logical_constraint(out_BLHK, ('batch', 'length', 'heads', 'kv'))
    return Projection('BLHK,HKD->BLD', (c.num_heads, head_dim, c.d_model), ('heads', 'kv', 'embed'),
                      out_std, _dtype(c), use_bias=c.use_bias, name='out')(out_BLHK)


class Mlp(nn.Module):
  """Dense -> activation -> Dense; with 'swiglu', silu(gate(x)) * up(x) -> Dense."""

  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    c = self.config
    out_std = residual_out_std(c)

    def dense_in(name):
      return nn.Dense(c.mlp_dim, use_bias=c.use_bias, dtype=_dtype(c), kernel_init=_init(c.init_std, ('embed', 'mlp')),
                      bias_init=_zeros(('mlp',)), name=name)(x_BLD)

    if c.mlp == 'swiglu':
      h_BLF = nn.silu(dense_in('gate')) * dense_in('up')
    else:
      h_BLF = {'gelu': nn.gelu, 'relu': nn.relu}[c.mlp](dense_in('up'))
    h_BLF = nn.with_logical_constraint(h_BLF, ('batch', 'length', 'mlp'))
    return nn.Dense(c.d_model, use_bias=c.use_bias, dtype=_dtype(c), kernel_init=_init(out_std, ('mlp', 'embed')),
                    bias_init=_zeros(('embed',)), name='down')(h_BLF)


class Block(nn.Module):
  """Residual block: attention then MLP, each with a norm before (pre) or after (post) the residual add."""

  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, x_BLD: jax.Array, _=None):
    dtype = _dtype(self.config)
    c = self.config
    for name, layer in (('attention', Attention(c, name='attention')), ('mlp', Mlp(c, name='mlp'))):
      norm = norm_layer(f'ln_{name}', c)
      if c.norm_position == 'pre':  # x + f(norm(x)): the residual stream itself is never normalised.
        x_BLD = x_BLD + layer(norm(x_BLD))
      else:  # norm(x + f(x)), as in the original Transformer.
        x_BLD = norm(x_BLD + layer(x_BLD))
      x_BLD = nn.with_logical_constraint(x_BLD, ('batch', 'length', 'embed'))
    return (x_BLD, None) if self.config.scan_layers else x_BLD  # nn.scan wants (carry, output).


# What the backward pass keeps of a block's activations; the rest it recomputes.
REMAT_POLICIES = {'full': jax.checkpoint_policies.nothing_saveable, 'dots': jax.checkpoint_policies.dots_saveable}


def _block_class(config) -> type[nn.Module]:
  block = Block
  if config.remat != 'none':
    block = nn.remat(block, policy=REMAT_POLICIES[config.remat], prevent_cse=not config.scan_layers)
  if config.scan_layers:
    block = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True}, length=config.num_layers,
                    metadata_params={nn.PARTITION_NAME: 'layers'})
  return block


class GPT(nn.Module):
  """Token ids [B, L] -> next-token logits [B, L, V] (float32)."""

  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, tokens_BL: jax.Array) -> jax.Array:
    c = self.config
    dtype = _dtype(c)
    embed = nn.Embed(c.vocab_size, c.d_model, dtype=dtype, embedding_init=_init(c.init_std, ('vocab', 'embed')),
                     name='token_embedding')
    x_BLD = embed(tokens_BL) * jnp.asarray(c.embed_multiplier, dtype)
    if c.positions == 'learned':  # 'rope' rotates queries and keys instead; 'none' relies on the causal mask.
      positions_LD = self.param('position_embedding', _init(c.init_std, (None, 'embed')), (c.max_len, c.d_model))
      x_BLD = x_BLD + positions_LD[:tokens_BL.shape[1]].astype(dtype)
    x_BLD = nn.with_logical_constraint(x_BLD, ('batch', 'length', 'embed'))
    block = _block_class(c)
    if c.scan_layers:
      x_BLD, _ = block(c, name='blocks')(x_BLD, None)
    else:
      for i in range(c.num_layers):
        x_BLD = block(c, name=f'block_{i}')(x_BLD)
    if c.norm_position == 'pre':  # Post-norm blocks already end normalised.
      x_BLD = norm_layer('ln_final', c)(x_BLD)
    if c.tie_embeddings:
      logits_BLV = embed.attend(x_BLD)
    else:
      logits_BLV = nn.Dense(c.vocab_size, use_bias=False, dtype=dtype, kernel_init=_init(c.init_std, ('embed', 'vocab')),
                            name='output')(x_BLD)
    return nn.with_logical_constraint(logits_BLV.astype(jnp.float32), ('batch', 'length', 'vocab'))


def make_model(model_config: ml_collections.ConfigDict) -> GPT:
  return GPT(ml_collections.FrozenConfigDict(model_config))


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


def stack_layers(params: dict, num_layers: int) -> dict:
  """Parameters of the unscanned model (block_0 ... block_{n-1}) in the scanned layout (blocks)."""
  params = dict(params)
  blocks = [params.pop(f'block_{i}') for i in range(num_layers)]
  params['blocks'] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return params


def unstack_layers(params: dict, num_layers: int) -> dict:
  """The inverse of stack_layers."""
  params = dict(params)
  blocks = params.pop('blocks')
  for i in range(num_layers):
    params[f'block_{i}'] = jax.tree.map(lambda x, i=i: x[i], blocks)
  return params
