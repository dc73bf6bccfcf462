"""model.kind='decoder': the GPT-style decoder (lm.model.GPT); its Hugging Face families are in
lm/kinds/gpt2.py and lm/kinds/llama.py."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lm.kinds.base import Kind, self_attention_stack_flops
from lm.kinds.gpt2 import GPT2
from lm.kinds.llama import LLAMA, MISTRAL, MIXTRAL, QWEN2, QWEN3
from lm.model import GPT, empty_cache


class Decoder(Kind):
  """Token ids -> next-token logits; decodes through its self-attention KV cache."""
  name = 'decoder'
  hf_families = (MIXTRAL, QWEN3, QWEN2, LLAMA, MISTRAL, GPT2)

  def build(self, m: ml_collections.ConfigDict, d: ml_collections.ConfigDict) -> nn.Module:
    return GPT(ml_collections.FrozenConfigDict(m))

  def example_batch(self, d: ml_collections.ConfigDict, batch_size: int = 1) -> dict[str, jax.Array]:
    batch = {'tokens': jnp.zeros((batch_size, d.seq_len + 1), jnp.int32)}
    return batch | ({'segment_ids': batch['tokens']} if d.document_mask else {})

  def target_positions(self, d: ml_collections.ConfigDict) -> int:
    return d.seq_len

  def tokens_per_example(self, d: ml_collections.ConfigDict) -> int:
    return d.seq_len

  def flops_per_example(self, m: ml_collections.ConfigDict, d: ml_collections.ConfigDict) -> float:
    return self_attention_stack_flops(m, m.num_layers, d.seq_len) + 6 * d.seq_len * m.vocab_size * m.d_model

  def decode_step(self, model, params, cache, tokens_NL, positions_NL, valid_NL, context):
    logits_NLV, variables = model.apply({'params': params, 'cache': cache}, tokens_NL, False, True, positions_NL,
                                        valid_NL, mutable=['cache'])
    return logits_NLV, variables['cache']

  def init_cache(self, model, batch_size, length=None, context=None):
    tokens = jnp.zeros((batch_size, 1), jnp.int32)
    return empty_cache(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, False, True, tokens,
                                                         tokens > 0)), length)
