"""A GPT-style decoder-only Transformer in Flax linen.

Every parameter carries logical axis names (`vocab`, `embed`, `heads`, `kv`, `mlp`) and every
activation is constrained to (`batch`, `length`, ...); the mapping of those names onto a device
mesh lives in the config, so sharding needs no change here.

Shape suffixes: B batch, L length, D d_model, H heads, K head dim, F mlp_dim, V vocab.
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


def _layer_norm(name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=1e-5, scale_init=_ones(('embed',)), bias_init=_zeros(('embed',)), name=name)


def causal_attention(q_BLHK: jax.Array, k_BLHK: jax.Array, v_BLHK: jax.Array) -> jax.Array:
  """softmax(Q K^T / sqrt(d_k)) V with position i attending to positions <= i."""
  q_BHLK, k_BHLK, v_BHLK = (x.transpose(0, 2, 1, 3) for x in (q_BLHK, k_BLHK, v_BLHK))
  scores_BHLL = (q_BHLK @ k_BHLK.swapaxes(-1, -2)) / math.sqrt(q_BLHK.shape[-1])
  length = q_BLHK.shape[1]
  causal_LL = jnp.tril(jnp.ones((length, length), dtype=bool))
  scores_BHLL = jnp.where(causal_LL, scores_BHLL.astype(jnp.float32), jnp.finfo(jnp.float32).min)
  probs_BHLL = jax.nn.softmax(scores_BHLL, axis=-1).astype(v_BLHK.dtype)
  return (probs_BHLL @ v_BHLK).transpose(0, 2, 1, 3)


class Attention(nn.Module):
  """Causal multi-head self-attention."""

  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    c = self.config
    head_dim = c.d_model // c.num_heads
    out_std = c.init_std / math.sqrt(2 * c.num_layers)

    def project(name):
      return nn.DenseGeneral(
          features=(c.num_heads, head_dim), kernel_init=_init(c.init_std, ('embed', 'heads', 'kv')),
          bias_init=_zeros(('heads', 'kv')), name=name)(x_BLD)

    q_BLHK, k_BLHK, v_BLHK = project('query'), project('key'), project('value')
    out_BLHK = causal_attention(q_BLHK, k_BLHK, v_BLHK)
    out_BLHK = nn.with_logical_constraint(out_BLHK, ('batch', 'length', 'heads', 'kv'))
    return nn.DenseGeneral(
        features=c.d_model, axis=(-2, -1), kernel_init=_init(out_std, ('heads', 'kv', 'embed')),
        bias_init=_zeros(('embed',)), name='out')(out_BLHK)


class Mlp(nn.Module):
  """Dense -> GELU -> Dense."""

  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    c = self.config
    out_std = c.init_std / math.sqrt(2 * c.num_layers)
    h_BLF = nn.Dense(c.mlp_dim, kernel_init=_init(c.init_std, ('embed', 'mlp')),
                     bias_init=_zeros(('mlp',)), name='up')(x_BLD)
    h_BLF = nn.with_logical_constraint(nn.gelu(h_BLF), ('batch', 'length', 'mlp'))
    return nn.Dense(c.d_model, kernel_init=_init(out_std, ('mlp', 'embed')),
                    bias_init=_zeros(('embed',)), name='down')(h_BLF)


class Block(nn.Module):
  """Pre-LayerNorm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    x_BLD = x_BLD + Attention(self.config, name='attention')(_layer_norm('ln_attention')(x_BLD))
    x_BLD = nn.with_logical_constraint(x_BLD, ('batch', 'length', 'embed'))
    x_BLD = x_BLD + Mlp(self.config, name='mlp')(_layer_norm('ln_mlp')(x_BLD))
    return nn.with_logical_constraint(x_BLD, ('batch', 'length', 'embed'))


class GPT(nn.Module):
  """Token ids [B, L] -> next-token logits [B, L, V] (float32)."""

  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, tokens_BL: jax.Array) -> jax.Array:
    c = self.config
    embed = nn.Embed(c.vocab_size, c.d_model, embedding_init=_init(c.init_std, ('vocab', 'embed')),
                     name='token_embedding')
    positions_LD = self.param('position_embedding', _init(c.init_std, (None, 'embed')),
                              (c.max_len, c.d_model))
    x_BLD = embed(tokens_BL) + positions_LD[:tokens_BL.shape[1]]
    x_BLD = nn.with_logical_constraint(x_BLD, ('batch', 'length', 'embed'))
    for i in range(c.num_layers):
      x_BLD = Block(c, name=f'block_{i}')(x_BLD)
    x_BLD = _layer_norm('ln_final')(x_BLD)
    logits_BLV = embed.attend(x_BLD)  # Tied output layer.
    return nn.with_logical_constraint(logits_BLV.astype(jnp.float32), ('batch', 'length', 'vocab'))


def make_model(model_config: ml_collections.ConfigDict) -> GPT:
  return GPT(ml_collections.FrozenConfigDict(model_config))


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
