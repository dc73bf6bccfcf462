"""model.kind='decoder': the GPT-style decoder (lm.nn.model.GPT); its Hugging Face families are in
lm/kinds/gpt2.py and lm/kinds/llama.py."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from lm.kinds.base import Kind, self_attention_stack_flops
from lm.kinds.gpt2 import GPT2
from lm.kinds.llama import LLAMA, MISTRAL, MIXTRAL, QWEN2, QWEN3, QWEN3_MOE
from lm.nn.model import GPT, empty_cache, vocab_logits


class Decoder(Kind):
  """Token ids -> next-token logits; decodes through its self-attention KV cache."""
  name = 'decoder'
  hf_families = (MIXTRAL, QWEN3_MOE, QWEN3, QWEN2, LLAMA, MISTRAL, GPT2)

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
    """The blocks and the output layer; each multi-token module (training only) adds a block like the
    last, its 2D -> D projection and the output layer again."""
    layers = self_attention_stack_flops(m, m.num_layers, d.seq_len)
    last_block = layers - self_attention_stack_flops(m, m.num_layers - 1, d.seq_len)
    output = 6 * d.seq_len * m.vocab_size * m.d_model
    mtp = m.get('mtp_depth', 0) * (last_block + 6 * d.seq_len * 2 * m.d_model**2 + output)
    return layers + output + mtp

  def decoding_context(self, model, params, inputs_NS):
    """With tied embeddings, the output layer as a [D, V] matrix, transposed once: read as the [V, D]
    table at every step, XLA's CPU backend transposed all of it each time (a third of GPT-2 small's
    decoding step)."""
    if not model.config.tie_embeddings:
      return None
    return {'readout_DV': params['token_embedding']['embedding'].T}

  def decode_step(self, model, params, cache, tokens_NL, positions_NL, valid_NL, context):
    out, variables = model.apply({'params': params, 'cache': cache}, tokens_NL, False, True, positions_NL,
                                 valid_NL, hidden=context is not None, mutable=['cache'])
    if context is not None:
      out = vocab_logits(model.config, params, out, context['readout_DV'])
    return out, variables['cache']

  def init_cache(self, model, batch_size, length=None, context=None):
    tokens = jnp.zeros((batch_size, 1), jnp.int32)
    return empty_cache(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, False, True, tokens,
                                                         tokens > 0)), length)
