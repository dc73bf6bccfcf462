"""GPT-2's Hugging Face format (model_type 'gpt2'): learned positions, LayerNorm, GELU, fused qkv
in Conv1D weights ([in, out]), tied embeddings."""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from lm.config import base_config, override, validate
from lm.kinds.base import HfFamily, hf_value
from lm.nn.layers import mlp_width
from lm.nn.model import unstack_layers

# GPT-2's tanh-approximated GELU names: what model.mlp='gelu' computes (flax's approximate GELU).
_GELUS = ('gelu_new', 'gelu_pytorch_tanh', 'gelu_fast')


def host(x) -> np.ndarray:
  """A contiguous float32 numpy copy (what safetensors writes)."""
  return np.ascontiguousarray(np.asarray(x, np.float32))


class Gpt2(HfFamily):
  model_type = 'gpt2'
  architecture = 'GPT2LMHeadModel'
  prefix = 'transformer.'  # Older checkpoints leave it out of the weight names.

  def config_from_hf(self, hf: dict[str, Any]) -> ml_collections.ConfigDict:
    hf_value(hf, 'activation_function', 'gelu_new', _GELUS)
    hf_value(hf, 'scale_attn_weights', True, (True,))
    hf_value(hf, 'scale_attn_by_inverse_layer_idx', False, (False,))
    hf_value(hf, 'tie_word_embeddings', True, (True,))
    config = base_config()
    max_len = hf['n_positions']
    return validate(override(config, {
        'model.vocab_size': hf['vocab_size'], 'model.d_model': hf['n_embd'], 'model.num_layers': hf['n_layer'],
        'model.num_heads': hf['n_head'], 'model.max_len': max_len, 'model.mlp_dim': hf.get('n_inner') or 0,
        'model.mlp': 'gelu', 'model.norm': 'layernorm', 'model.norm_eps': hf_value(hf, 'layer_norm_epsilon', 1e-5),
        'model.norm_position': 'pre', 'model.positions': 'learned',
        'model.use_bias': True, 'model.tie_embeddings': True, 'model.init': 'gpt2',
        'model.init_std': hf.get('initializer_range', 0.02), 'model.dtype': 'float32', 'model.scan_layers': False,
        'data.tokenizer': 'huggingface', 'data.seq_len': min(config.data.seq_len, max_len)}))

  def problem(self, m: ml_collections.ConfigDict) -> str | None:
    wanted = {'kind': 'decoder', 'positions': 'learned', 'norm': 'layernorm', 'norm_position': 'pre', 'mlp': 'gelu',
              'use_bias': True, 'qkv_bias': False, 'tie_embeddings': True, 'qk_norm': False, 'moe_experts': 0,
              'sliding_window': 0, 'embed_multiplier': 1.0, 'parametrization': 'sp', 'head_dim': 0, 'mtp_depth': 0}
    for key, value in wanted.items():
      if m[key] != value:
        return f'model.{key}={m[key]!r}: a GPT-2 checkpoint needs model.{key}={value!r}'
    if m.num_kv_heads not in (0, m.num_heads):
      return f'model.num_kv_heads={m.num_kv_heads}: GPT-2 has as many key/value heads as query heads'
    return None

  def params_from_hf(self, get, m: ml_collections.ConfigDict):
    d, heads = m.d_model, m.num_heads
    head_dim, width = d // heads, mlp_width(m)

    def norm(ours, theirs):
      yield f'{ours}/scale', get(f'{theirs}.weight', (d,))
      yield f'{ours}/bias', get(f'{theirs}.bias', (d,))

    yield 'token_embedding/embedding', get('wte.weight', (m.vocab_size, d))
    yield 'position_embedding', get('wpe.weight', (m.max_len, d))
    yield from norm('ln_final', 'ln_f')
    for i in range(m.num_layers):
      h, b = f'h.{i}.', f'block_{i}/'
      qkv_w, qkv_b = get(h + 'attn.c_attn.weight', (d, 3 * d)), get(h + 'attn.c_attn.bias', (3 * d,))
      for name, w, bias in zip(('query', 'key', 'value'), np.split(qkv_w, 3, axis=1), np.split(qkv_b, 3)):
        yield f'{b}attention/{name}/kernel', w.reshape(d, heads, head_dim)
        yield f'{b}attention/{name}/bias', bias.reshape(heads, head_dim)
      yield f'{b}attention/out/kernel', get(h + 'attn.c_proj.weight', (d, d)).reshape(heads, head_dim, d)
      yield f'{b}attention/out/bias', get(h + 'attn.c_proj.bias', (d,))
      yield from norm(b + 'ln_attention', h + 'ln_1')
      yield from norm(b + 'ln_mlp', h + 'ln_2')
      for ours, theirs, shape in (('up', 'c_fc', (d, width)), ('down', 'c_proj', (width, d))):
        yield f'{b}mlp/{ours}/kernel', get(h + f'mlp.{theirs}.weight', shape)
        yield f'{b}mlp/{ours}/bias', get(h + f'mlp.{theirs}.bias', shape[1:])

  def params_to_hf(self, params: dict, m: ml_collections.ConfigDict):
    """A GPT2LMHeadModel state dict, the tied lm_head left out."""
    params = unstack_layers(params, m)
    yield 'transformer.wte.weight', host(params['token_embedding']['embedding'])
    yield 'transformer.wpe.weight', host(params['position_embedding'])
    yield 'transformer.ln_f.weight', host(params['ln_final']['scale'])
    yield 'transformer.ln_f.bias', host(params['ln_final']['bias'])
    d = m.d_model
    for i in range(m.num_layers):
      b, h = params[f'block_{i}'], f'transformer.h.{i}.'
      a = b['attention']
      qkv = ('query', 'key', 'value')
      yield h + 'attn.c_attn.weight', host(np.concatenate([np.reshape(a[n]['kernel'], (d, d)) for n in qkv], 1))
      yield h + 'attn.c_attn.bias', host(np.concatenate([np.reshape(a[n]['bias'], (d,)) for n in qkv]))
      yield h + 'attn.c_proj.weight', host(np.reshape(a['out']['kernel'], (d, d)))
      yield h + 'attn.c_proj.bias', host(a['out']['bias'])
      for ours, theirs in (('ln_attention', 'ln_1'), ('ln_mlp', 'ln_2')):
        yield h + theirs + '.weight', host(b[ours]['scale'])
        yield h + theirs + '.bias', host(b[ours]['bias'])
      for ours, theirs in (('up', 'c_fc'), ('down', 'c_proj')):
        yield h + f'mlp.{theirs}.weight', host(b['mlp'][ours]['kernel'])
        yield h + f'mlp.{theirs}.bias', host(b['mlp'][ours]['bias'])

  def hf_config(self, m: ml_collections.ConfigDict, bos_id: int | None, eos_id: int | None) -> dict[str, Any]:
    return {'model_type': 'gpt2', 'architectures': [self.architecture], 'vocab_size': m.vocab_size,
            'n_positions': m.max_len, 'n_embd': m.d_model, 'n_layer': m.num_layers, 'n_head': m.num_heads,
            'n_inner': mlp_width(m), 'activation_function': 'gelu_new', 'layer_norm_epsilon': m.norm_eps,
            'resid_pdrop': 0.0, 'embd_pdrop': 0.0, 'attn_pdrop': 0.0, 'initializer_range': m.init_std,
            'scale_attn_weights': True, 'tie_word_embeddings': True, 'use_cache': True, 'torch_dtype': 'float32',
            'bos_token_id': bos_id, 'eos_token_id': eos_id}


GPT2 = Gpt2()
