"""model.kind='decoder': the GPT-style decoder (lm.model.GPT), and GPT-2's Hugging Face format."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lm.config import ConfigError, base_config, override, validate
from lm.kinds.base import Kind, self_attention_stack_flops
from lm.layers import mlp_width
from lm.model import GPT, empty_cache, unstack_layers

# GPT-2's tanh-approximated GELU names: what model.mlp='gelu' computes (flax's approximate GELU).
_GELUS = ('gelu_new', 'gelu_pytorch_tanh', 'gelu_fast')


class Decoder(Kind):
  """Token ids -> next-token logits; decodes through its self-attention KV cache."""
  name = 'decoder'
  hf_model_type = 'gpt2'

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

  def config_from_hf(self, hf: dict[str, Any]) -> ml_collections.ConfigDict:
    """An lm config whose model is the GPT-2 that a transformers config.json describes."""
    if hf.get('model_type') != 'gpt2':
      raise ConfigError(f'model_type={hf.get("model_type")!r} in config.json: only GPT-2 checkpoints import')
    unsupported = {'activation_function': (hf.get('activation_function', 'gelu_new'), _GELUS),
                   'layer_norm_epsilon': (hf.get('layer_norm_epsilon', 1e-5), (1e-5,)),
                   'scale_attn_weights': (hf.get('scale_attn_weights', True), (True,)),
                   'scale_attn_by_inverse_layer_idx': (hf.get('scale_attn_by_inverse_layer_idx', False), (False,)),
                   'tie_word_embeddings': (hf.get('tie_word_embeddings', True), (True,))}
    for key, (value, allowed) in unsupported.items():
      if value not in allowed:
        raise ConfigError(f'{key}={value!r} in config.json is not supported (allowed: {", ".join(map(repr, allowed))})')
    config = base_config()
    max_len = hf['n_positions']
    return validate(override(config, {
        'model.vocab_size': hf['vocab_size'], 'model.d_model': hf['n_embd'], 'model.num_layers': hf['n_layer'],
        'model.num_heads': hf['n_head'], 'model.max_len': max_len, 'model.mlp_dim': hf.get('n_inner') or 0,
        'model.mlp': 'gelu', 'model.norm': 'layernorm', 'model.norm_position': 'pre', 'model.positions': 'learned',
        'model.use_bias': True, 'model.tie_embeddings': True, 'model.init': 'gpt2',
        'model.init_std': hf.get('initializer_range', 0.02), 'model.dtype': 'float32', 'model.scan_layers': False,
        'data.tokenizer': 'huggingface', 'data.seq_len': min(config.data.seq_len, max_len)}))


  def check_hf_shaped(self, m: ml_collections.ConfigDict) -> None:
    """A ConfigError naming the first model key that GPT-2's architecture cannot express."""
    wanted = {'kind': 'decoder', 'positions': 'learned', 'norm': 'layernorm', 'norm_position': 'pre', 'mlp': 'gelu',
              'use_bias': True, 'tie_embeddings': True, 'qk_norm': False, 'moe_experts': 0, 'sliding_window': 0,
              'embed_multiplier': 1.0, 'parametrization': 'sp'}
    for key, value in wanted.items():
      if m[key] != value:
        raise ConfigError(f'model.{key}={m[key]!r}: a GPT-2 checkpoint needs model.{key}={value!r}')
    if m.num_kv_heads not in (0, m.num_heads):
      raise ConfigError(f'model.num_kv_heads={m.num_kv_heads}: GPT-2 has as many key/value heads as query heads')


  def params_from_hf(self, tensors: dict[str, np.ndarray], m: ml_collections.ConfigDict) -> dict:
    """lm parameters (block_0 ... layout) from a GPT-2 state dict (Conv1D weights are [in, out])."""
    t = {k.removeprefix('transformer.'): np.asarray(v, np.float32) for k, v in tensors.items()}
    d, heads = m.d_model, m.num_heads
    head_dim = d // heads

    def get(name, shape):
      if name not in t:
        raise ConfigError(f'model.safetensors has no tensor {name!r}')
      if t[name].shape != shape:
        raise ConfigError(f'{name} in model.safetensors is {t[name].shape}, config.json implies {shape}')
      return t[name]

    def norm(name):
      return {'scale': get(f'{name}.weight', (d,)), 'bias': get(f'{name}.bias', (d,))}

    params = {'token_embedding': {'embedding': get('wte.weight', (m.vocab_size, d))},
              'position_embedding': get('wpe.weight', (m.max_len, d)), 'ln_final': norm('ln_f')}
    width = mlp_width(m)
    for i in range(m.num_layers):
      h = f'h.{i}.'
      qkv_w, qkv_b = get(h + 'attn.c_attn.weight', (d, 3 * d)), get(h + 'attn.c_attn.bias', (3 * d,))
      attention = {name: {'kernel': w.reshape(d, heads, head_dim), 'bias': b.reshape(heads, head_dim)}
                   for name, w, b in zip(('query', 'key', 'value'), np.split(qkv_w, 3, axis=1), np.split(qkv_b, 3))}
      attention['out'] = {'kernel': get(h + 'attn.c_proj.weight', (d, d)).reshape(heads, head_dim, d),
                          'bias': get(h + 'attn.c_proj.bias', (d,))}
      params[f'block_{i}'] = {
          'attention': attention, 'ln_attention': norm(h + 'ln_1'), 'ln_mlp': norm(h + 'ln_2'),
          'mlp': {'up': {'kernel': get(h + 'mlp.c_fc.weight', (d, width)),
                         'bias': get(h + 'mlp.c_fc.bias', (width,))},
                  'down': {'kernel': get(h + 'mlp.c_proj.weight', (width, d)),
                           'bias': get(h + 'mlp.c_proj.bias', (d,))}}}
    return params


  def params_to_hf(self, params: dict, m: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """The inverse of params_from_hf: a GPT2LMHeadModel state dict (the tied lm_head left out)."""
    params = unstack_layers(params, m.num_layers) if 'blocks' in params else params
    p = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
    out = {'transformer.wte.weight': p(params['token_embedding']['embedding']),
           'transformer.wpe.weight': p(params['position_embedding']),
           'transformer.ln_f.weight': p(params['ln_final']['scale']),
           'transformer.ln_f.bias': p(params['ln_final']['bias'])}
    d = m.d_model
    for i in range(m.num_layers):
      b, h = params[f'block_{i}'], f'transformer.h.{i}.'
      a = b['attention']
      qkv = ('query', 'key', 'value')
      out[h + 'attn.c_attn.weight'] = p(np.concatenate([np.reshape(a[n]['kernel'], (d, d)) for n in qkv], 1))
      out[h + 'attn.c_attn.bias'] = p(np.concatenate([np.reshape(a[n]['bias'], (d,)) for n in qkv]))
      out[h + 'attn.c_proj.weight'] = p(np.reshape(a['out']['kernel'], (d, d)))
      out[h + 'attn.c_proj.bias'] = p(a['out']['bias'])
      for ours, theirs in (('ln_attention', 'ln_1'), ('ln_mlp', 'ln_2')):
        out[h + theirs + '.weight'], out[h + theirs + '.bias'] = p(b[ours]['scale']), p(b[ours]['bias'])
      for ours, theirs in (('up', 'c_fc'), ('down', 'c_proj')):
        layer = b['mlp'][ours]
        out[h + f'mlp.{theirs}.weight'], out[h + f'mlp.{theirs}.bias'] = p(layer['kernel']), p(layer['bias'])
    return out


  def hf_config(self, m: ml_collections.ConfigDict, end_id: int | None) -> dict[str, Any]:
    """transformers' config.json for a (GPT-2-shaped) model section."""
    return {'model_type': 'gpt2', 'architectures': ['GPT2LMHeadModel'], 'vocab_size': m.vocab_size,
            'n_positions': m.max_len, 'n_embd': m.d_model, 'n_layer': m.num_layers, 'n_head': m.num_heads,
            'n_inner': mlp_width(m), 'activation_function': 'gelu_new', 'layer_norm_epsilon': 1e-5,
            'resid_pdrop': 0.0, 'embd_pdrop': 0.0, 'attn_pdrop': 0.0, 'initializer_range': m.init_std,
            'scale_attn_weights': True, 'tie_word_embeddings': True, 'use_cache': True, 'torch_dtype': 'float32',
            'bos_token_id': end_id, 'eos_token_id': end_id}
