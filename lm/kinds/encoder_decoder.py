"""model.kind='encoder_decoder': the original Transformer layout (lm.nn.model.EncoderDecoder)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lm.config import PAD_IDS, target_len
from lm.kinds.base import Kind, attention_widths, self_attention_stack_flops
from lm.nn.layers import head_width
from lm.nn.model import EncoderDecoder, empty_cache


class EncoderDecoderKind(Kind):
  """(input ids, target ids) -> next-target logits. Decoding encodes the input once; the decoder then
  reads its own tokens through its self-attention KV cache and cross-attends to the encoder output."""
  name = 'encoder_decoder'
  prompt_is_input = True

  def build(self, m: ml_collections.ConfigDict, d: ml_collections.ConfigDict) -> nn.Module:
    # The encoder learns to ignore the tokenizer's padding id.
    return EncoderDecoder(ml_collections.FrozenConfigDict(m), PAD_IDS[d.tokenizer])

  def example_batch(self, d: ml_collections.ConfigDict, batch_size: int = 1) -> dict[str, jax.Array]:
    batch = {'inputs': jnp.zeros((batch_size, d.seq_len), jnp.int32),
             'tokens': jnp.zeros((batch_size, target_len(d) + 1), jnp.int32)}
    if d.document_mask:
      batch |= {'input_segment_ids': batch['inputs'], 'segment_ids': batch['tokens']}
    return batch

  def target_positions(self, d: ml_collections.ConfigDict) -> int:
    return target_len(d)

  def tokens_per_example(self, d: ml_collections.ConfigDict) -> int:
    return d.seq_len + target_len(d)

  def flops_per_example(self, m: ml_collections.ConfigDict, d: ml_collections.ConfigDict) -> float:
    """The encoder and decoder stacks, plus cross-attention: 6 per weight (queries and outputs per
    target, keys and values per source token) and 12 * heads * head_dim per (target, source) pair."""
    source, target = d.seq_len, target_len(d)
    q_out, kv = attention_widths(m)
    cross = m.num_layers * (6 * target * q_out + 6 * source * kv + 12 * m.num_heads * head_width(m) * target * source)
    return (self_attention_stack_flops(m, m.num_encoder_layers or m.num_layers, source)
            + self_attention_stack_flops(m, m.num_layers, target) + cross + 6 * target * m.vocab_size * m.d_model)

  def decoding_context(self, model, params, inputs_NS):
    """The encoder output and the inputs (whose padding cross-attention masks), computed once."""
    return model.apply({'params': params}, inputs_NS, method=EncoderDecoder.encode), inputs_NS

  def decode_step(self, model, params, cache, tokens_NL, positions_NL, valid_NL, context):
    encoded_NSD, inputs_NS = context
    logits_NLV, variables = model.apply({'params': params, 'cache': cache}, encoded_NSD, inputs_NS, tokens_NL,
                                        False, False, True, positions_NL, valid_NL, method=EncoderDecoder.decode,
                                        mutable=['cache'])
    return logits_NLV, variables['cache']

  def sample_request(self, prompt_ids, text_ids, bos_id, pad_id, d):
    """The text, padded or cut to data.seq_len, is the encoder's input; the decoder starts afresh."""
    inputs = np.pad(text_ids[:d.seq_len], (0, max(0, d.seq_len - len(text_ids))), constant_values=pad_id)
    return np.array([bos_id], np.int32), inputs

  def sample_text(self, prompt, row, tokenizer):
    """The input, then the decoder's output up to its end token."""
    ends = np.flatnonzero(row == tokenizer.eos_id)
    return f'{prompt}\n=>\n{tokenizer.decode(row[:ends[0]] if len(ends) else row)}'

  def init_cache(self, model, batch_size, length=None, context=None):
    c = model.config
    tokens = jnp.zeros((batch_size, 1), jnp.int32)
    inputs = jnp.ones((batch_size, 1), jnp.int32)
    encoded = jnp.zeros((batch_size, 1, c.d_model), jnp.dtype(c.dtype))

    def init():
      return model.init(jax.random.PRNGKey(0), encoded, inputs, tokens, False, False, True, tokens, tokens >= 0,
                        method=EncoderDecoder.decode)

    return empty_cache(jax.eval_shape(init), length)
