"""The residual block: attention and an MLP (or mixture of experts), each behind a norm."""

from __future__ import annotations

import flax.linen as nn
import jax
import ml_collections

from lm.nn.attention import Attention
from lm.nn.layers import Mlp, dropout, norm_layer
from lm.nn.moe import MoeMlp


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
