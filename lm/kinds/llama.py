"""Llama's Hugging Face format and the families built like it: Mistral (sliding window), Mixtral
(sparse MoE), Qwen2 (q/k/v biases), Qwen3 (per-head qk-norm, free head_dim) and Qwen3-MoE (Qwen3 with
experts of their own width, dense first layers). All are pre-RMSNorm
decoders with RoPE, SwiGLU and grouped-query attention; weights are torch Linear [out, in].

transformers rotates the pairs (x_i, x_{i + K/2}) (rotate_half), as lm.nn.layers.rotary does, so the
query and key weights need no permutation (Meta's original checkpoints interleave the pairs instead;
their conversion to this format already permuted them)."""

from __future__ import annotations

import math
from typing import Any

import ml_collections
import numpy as np

from lm.config import ConfigError, base_config, override, validate
from lm.kinds.base import HfFamily, hf_value
from lm.kinds.gpt2 import host
from lm.nn.layers import expert_width, head_width, mlp_width
from lm.nn.model import is_moe_layer, unstack_layers

# transformers' rope_type -> model.rope_scaling.
_ROPE_TYPES = {'default': 'none', 'linear': 'linear', 'dynamic': 'dynamic', 'llama3': 'llama3', 'yarn': 'yarn'}


def rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
  """The model.rope_* keys of config.json's RoPE: transformers 5's `rope_parameters`, or the older
  `rope_theta` and `rope_scaling`."""
  legacy = hf.get('rope_scaling') or {}
  rope = {**legacy, **(hf.get('rope_parameters') or {})}
  field = 'rope_parameters' if hf.get('rope_parameters') else 'rope_scaling'
  rope_type = rope.get('rope_type') or rope.get('type') or 'default'
  if rope_type not in _ROPE_TYPES:
    raise ConfigError(f'{field}.rope_type={rope_type!r} in config.json is not supported (lm can represent: '
                      f'{", ".join(map(repr, _ROPE_TYPES))})')
  if rope.get('partial_rotary_factor', hf.get('partial_rotary_factor', 1.0)) != 1.0:
    raise ConfigError('partial_rotary_factor in config.json is not supported (lm rotates whole heads: 1.0)')
  keys = {'model.rope_base': float(rope.get('rope_theta', hf.get('rope_theta', 10000.0))),
          'model.rope_scaling': _ROPE_TYPES[rope_type]}
  if rope_type != 'default':
    keys['model.rope_scaling_factor'] = float(rope['factor'])
  if rope_type == 'dynamic':  # transformers stretches past max_position_embeddings, to factor times it.
    keys['model.rope_original_max_len'] = hf['max_position_embeddings']
    keys['model.max_len'] = int(hf['max_position_embeddings'] * rope['factor'])
  if rope_type == 'llama3':
    keys |= {'model.rope_original_max_len': rope['original_max_position_embeddings'],
             'model.rope_low_freq_factor': float(rope['low_freq_factor']),
             'model.rope_high_freq_factor': float(rope['high_freq_factor'])}
  if rope_type == 'yarn':
    if rope.get('truncate', True) is not True:
      raise ConfigError(f'{field}.truncate={rope["truncate"]!r} in config.json is not supported (lm: true)')
    factor, mscale, mscale_all = float(rope['factor']), rope.get('mscale'), rope.get('mscale_all_dim')
    attention = rope.get('attention_factor')
    if attention is None and mscale and mscale_all:  # DeepSeek's form, as transformers reads it.
      get = lambda m: 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0
      attention = get(mscale) / get(mscale_all)
    keys |= {'model.rope_original_max_len': int(rope.get('original_max_position_embeddings')
                                                or hf['max_position_embeddings']),
             'model.rope_yarn_beta_fast': float(rope.get('beta_fast') or 32.0),
             'model.rope_yarn_beta_slow': float(rope.get('beta_slow') or 1.0),
             'model.rope_yarn_attention_factor': float(attention or 0.0)}
  return keys


def rope_to_hf(m: ml_collections.ConfigDict) -> dict[str, Any]:
  """config.json's RoPE fields, in transformers 5's form and the older one (what 4.x reads)."""
  rope_type = {v: k for k, v in _ROPE_TYPES.items()}[m.rope_scaling]
  scaling = {'rope_type': rope_type}
  if rope_type != 'default':
    scaling['factor'] = m.rope_scaling_factor
  if rope_type == 'llama3':
    scaling |= {'low_freq_factor': m.rope_low_freq_factor, 'high_freq_factor': m.rope_high_freq_factor,
                'original_max_position_embeddings': m.rope_original_max_len}
  if rope_type == 'yarn':
    scaling |= {'original_max_position_embeddings': m.rope_original_max_len, 'beta_fast': m.rope_yarn_beta_fast,
                'beta_slow': m.rope_yarn_beta_slow}
    if m.rope_yarn_attention_factor:
      scaling['attention_factor'] = m.rope_yarn_attention_factor
  fields = {'rope_theta': m.rope_base, 'rope_scaling': None if rope_type == 'default' else scaling,
            'rope_parameters': {'rope_theta': m.rope_base} | scaling}
  if rope_type == 'dynamic':
    fields['max_position_embeddings'] = m.rope_original_max_len
  return fields


class Llama(HfFamily):
  model_type = 'llama'
  prefix = ''

  @property
  def architecture(self) -> str:
    """config.json's architectures entry, named for model_type: 'LlamaForCausalLM', 'Qwen2ForCausalLM', ..."""
    return f'{self.model_type.capitalize()}ForCausalLM'

  # What sets the families apart.
  sliding_window = False  # Mistral, Mixtral: config.json's sliding_window.
  moe = False  # Mixtral.
  qkv_bias = False  # Qwen2: biases on q, k and v only.
  qk_norm = False  # Qwen3.
  own_biases = True  # Llama: attention_bias and mlp_bias.
  # Mixtures: MoE keys a checkpoint fixes, where its experts' weights live on disk and their names (lm's
  # gate/up/down kernels).
  moe_fixed: dict[str, Any] = {}
  experts_module = ''
  expert_names: tuple[tuple[str, str], ...] = ()

  # ---- config.json
  def config_from_hf(self, hf: dict[str, Any]) -> ml_collections.ConfigDict:
    hf_value(hf, 'hidden_act', 'silu', ('silu',))
    hf_value(hf, 'attention_dropout', 0.0, (0.0,))
    heads, d = hf['num_attention_heads'], hf['hidden_size']
    head_dim = hf_value(hf, 'head_dim', d // heads)
    keys = {
        'model.vocab_size': hf['vocab_size'], 'model.d_model': d, 'model.num_layers': hf['num_hidden_layers'],
        'model.num_heads': heads, 'model.num_kv_heads': hf_value(hf, 'num_key_value_heads', heads),
        'model.head_dim': 0 if head_dim * heads == d else head_dim,
        'model.mlp_dim': hf['intermediate_size'], 'model.mlp': 'swiglu', 'model.norm': 'rmsnorm',
        'model.norm_eps': float(hf_value(hf, 'rms_norm_eps', 1e-6)), 'model.norm_position': 'pre',
        'model.positions': 'rope', 'model.max_len': hf['max_position_embeddings'],
        'model.tie_embeddings': bool(hf_value(hf, 'tie_word_embeddings', False)), 'model.init': 'normal',
        'model.init_std': hf_value(hf, 'initializer_range', 0.02), 'model.dtype': 'float32',
        'model.scan_layers': False, 'model.use_bias': False, 'model.qkv_bias': self.qkv_bias,
        'model.qk_norm': self.qk_norm, 'data.tokenizer': 'huggingface'}
    keys |= rope_from_hf(hf)
    if self.qk_norm:
      keys['model.qk_norm_eps'] = keys['model.norm_eps']
    if self.own_biases:
      attention_bias, mlp_bias = hf_value(hf, 'attention_bias', False), hf_value(hf, 'mlp_bias', False)
      if attention_bias != mlp_bias:
        raise ConfigError(f'attention_bias={attention_bias} with mlp_bias={mlp_bias} in config.json is not supported '
                          '(lm biases the attention and the MLP together: model.use_bias)')
      keys['model.use_bias'] = bool(attention_bias)
    elif self.qk_norm:  # Qwen3's attention_bias would bias the output projection too.
      hf_value(hf, 'attention_bias', False, (False,))
    if self.sliding_window:
      keys['model.sliding_window'] = hf_value(hf, 'sliding_window', 0)
    else:
      self._refuse_sliding(hf)
    if self.moe:
      keys |= self._moe_from_hf(hf)
    config = base_config()
    keys['data.seq_len'] = min(config.data.seq_len, keys['model.max_len'])
    return validate(override(config, keys))

  def _refuse_sliding(self, hf: dict[str, Any]) -> None:
    """Qwen's use_sliding_window and layer_types (windows on some layers only) are not represented."""
    hf_value(hf, 'use_sliding_window', False, (False,))
    kinds = set(hf.get('layer_types') or ['full_attention'])
    if kinds != {'full_attention'}:
      raise ConfigError(f'layer_types={sorted(kinds)} in config.json is not supported (lm can represent: '
                        "'full_attention' on every layer)")

  def problem(self, m: ml_collections.ConfigDict) -> str | None:
    wanted = {'kind': 'decoder', 'positions': 'rope', 'norm': 'rmsnorm', 'norm_position': 'pre', 'mlp': 'swiglu',
              'embed_multiplier': 1.0, 'parametrization': 'sp', 'qk_norm': self.qk_norm, 'qkv_bias': self.qkv_bias,
              'mtp_depth': 0}
    if not self.own_biases:
      wanted['use_bias'] = False
    if not self.sliding_window:
      wanted['sliding_window'] = 0
    if not self.moe:
      wanted['moe_experts'] = 0
    else:
      wanted |= {'moe_capacity_factor': 0.0, 'moe_shared_experts': 0, 'moe_router_score': 'softmax',
                 'moe_routed_scale': 1.0, 'moe_groups': 1, 'moe_router_bias': False} | self.moe_fixed
    for key, value in wanted.items():
      if m[key] != value:
        return f'model.{key}={m[key]!r}: a {self.model_type} checkpoint needs model.{key}={value!r}'
    if self.moe and not m.moe_experts:
      return f'model.moe_experts=0: a {self.model_type} checkpoint has experts'
    if self.qk_norm and m.qk_norm_eps != m.norm_eps:
      return (f'model.qk_norm_eps={m.qk_norm_eps} and model.norm_eps={m.norm_eps}: a {self.model_type} checkpoint '
              'has one rms_norm_eps for both')
    return None

  def hf_config(self, m: ml_collections.ConfigDict, bos_id: int | None, eos_id: int | None) -> dict[str, Any]:
    config = {
        'model_type': self.model_type, 'architectures': [self.architecture], 'vocab_size': m.vocab_size,
        'hidden_size': m.d_model, 'intermediate_size': mlp_width(m), 'num_hidden_layers': m.num_layers,
        'num_attention_heads': m.num_heads, 'num_key_value_heads': m.num_kv_heads or m.num_heads,
        'head_dim': head_width(m), 'hidden_act': 'silu', 'max_position_embeddings': m.max_len,
        'rms_norm_eps': m.norm_eps, 'tie_word_embeddings': m.tie_embeddings, 'initializer_range': m.init_std,
        'attention_dropout': 0.0, 'use_cache': True, 'torch_dtype': 'float32', 'bos_token_id': bos_id,
        'eos_token_id': eos_id}
    config |= rope_to_hf(m)
    if self.own_biases:
      config |= {'attention_bias': m.use_bias, 'mlp_bias': m.use_bias}
    if self.sliding_window:
      config['sliding_window'] = m.sliding_window or None
    if self.moe:
      config |= self._moe_to_hf(m)
    if self.model_type in ('qwen2', 'qwen3', 'qwen3_moe'):
      config |= {'use_sliding_window': False, 'sliding_window': None,
                 'layer_types': ['full_attention'] * m.num_layers}
    if self.qk_norm:
      config['attention_bias'] = False
    return config

  # ---- weights
  def _layer_names(self, i: int, m) -> dict[str, str]:
    """lm parameter path (within block_i) -> transformers name, for the tensors every family has."""
    p = f'model.layers.{i}.'
    names = {f'attention/{ours}/kernel': f'{p}self_attn.{theirs}_proj.weight'
             for ours, theirs in (('query', 'q'), ('key', 'k'), ('value', 'v'), ('out', 'o'))}
    if m.use_bias or m.qkv_bias:
      names |= {f'attention/{ours}/bias': f'{p}self_attn.{theirs}_proj.bias'
                for ours, theirs in (('query', 'q'), ('key', 'k'), ('value', 'v'))}
    if m.use_bias:
      names['attention/out/bias'] = f'{p}self_attn.o_proj.bias'
    if m.qk_norm:
      names |= {'attention/query_norm/scale': f'{p}self_attn.q_norm.weight',
                'attention/key_norm/scale': f'{p}self_attn.k_norm.weight'}
    ffn = 'ln_moe' if is_moe_layer(m, i) else 'ln_mlp'
    names |= {'ln_attention/scale': f'{p}input_layernorm.weight', f'{ffn}/scale': f'{p}post_attention_layernorm.weight'}
    if not is_moe_layer(m, i):
      names |= {f'mlp/{ours}/kernel': f'{p}mlp.{ours}_proj.weight' for ours in ('gate', 'up', 'down')}
      if m.use_bias:
        names |= {f'mlp/{ours}/bias': f'{p}mlp.{ours}_proj.bias' for ours in ('gate', 'up', 'down')}
    return names

  def _shapes(self, m) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """lm parameter path -> (lm's shape, transformers' shape) for the per-layer tensors."""
    d, h, g, k, f = m.d_model, m.num_heads, m.num_kv_heads or m.num_heads, head_width(m), mlp_width(m)
    return {'attention/query/kernel': ((d, h, k), (h * k, d)), 'attention/key/kernel': ((d, g, k), (g * k, d)),
            'attention/value/kernel': ((d, g, k), (g * k, d)), 'attention/out/kernel': ((h, k, d), (d, h * k)),
            'attention/query/bias': ((h, k), (h * k,)), 'attention/key/bias': ((g, k), (g * k,)),
            'attention/value/bias': ((g, k), (g * k,)), 'attention/out/bias': ((d,), (d,)),
            'attention/query_norm/scale': ((k,), (k,)), 'attention/key_norm/scale': ((k,), (k,)),
            'ln_attention/scale': ((d,), (d,)), 'ln_mlp/scale': ((d,), (d,)), 'ln_moe/scale': ((d,), (d,)),
            'mlp/gate/kernel': ((d, f), (f, d)), 'mlp/up/kernel': ((d, f), (f, d)), 'mlp/down/kernel': ((f, d), (d, f)),
            'mlp/gate/bias': ((f,), (f,)), 'mlp/up/bias': ((f,), (f,)), 'mlp/down/bias': ((d,), (d,))}

  def params_from_hf(self, get, m: ml_collections.ConfigDict):
    shapes = self._shapes(m)
    yield 'token_embedding/embedding', get('model.embed_tokens.weight', (m.vocab_size, m.d_model))
    yield 'ln_final/scale', get('model.norm.weight', (m.d_model,))
    if not m.tie_embeddings:
      yield 'output/kernel', get('lm_head.weight', (m.vocab_size, m.d_model)).T
    for i in range(m.num_layers):
      for path, name in self._layer_names(i, m).items():
        ours, theirs = shapes[path]
        tensor = get(name, theirs)
        yield f'block_{i}/{path}', (tensor.T if tensor.ndim == 2 else tensor).reshape(ours)
      if is_moe_layer(m, i):
        yield from ((f'block_{i}/moe/{name}', tensor) for name, tensor in self._experts_from_hf(get, i, m))

  def params_to_hf(self, params: dict, m: ml_collections.ConfigDict):
    params = unstack_layers(params, m)
    shapes = self._shapes(m)
    yield 'model.embed_tokens.weight', host(params['token_embedding']['embedding'])
    yield 'model.norm.weight', host(params['ln_final']['scale'])
    if not m.tie_embeddings:
      yield 'lm_head.weight', host(np.asarray(params['output']['kernel']).T)
    for i in range(m.num_layers):
      block = params[f'block_{i}']
      for path, name in self._layer_names(i, m).items():
        ours, theirs = shapes[path]
        tensor = np.asarray(_get(block, path))
        yield name, host(tensor.reshape(theirs[::-1]).T if len(theirs) == 2 else tensor.reshape(theirs))
      if is_moe_layer(m, i):
        yield from self._experts_to_hf(block['moe'], i, m)

  def _moe_from_hf(self, hf: dict[str, Any]) -> dict[str, Any]:
    """The model.moe_* keys of a mixture's config.json."""
    raise NotImplementedError

  def _moe_to_hf(self, m) -> dict[str, Any]:
    raise NotImplementedError

  def _experts_from_hf(self, get, i: int, m):
    """(name under block_i/moe, array) of layer i's router and experts: as save_pretrained writes them (one
    tensor per expert and projection), or transformers 5's fused in-memory layout (mlp.gate, and
    mlp.experts.gate_up_proj [E, 2F, D], mlp.experts.down_proj [E, D, F])."""
    d, f, e = m.d_model, expert_width(m), m.moe_experts
    p = f'model.layers.{i}.'
    if get.has(f'{p}mlp.experts.gate_up_proj'):
      yield 'router_kernel', get(f'{p}mlp.gate.weight', (e, d)).T
      gate_up = get(f'{p}mlp.experts.gate_up_proj', (e, 2 * f, d))
      yield 'gate_kernel', gate_up[:, :f].transpose(0, 2, 1)
      yield 'up_kernel', gate_up[:, f:].transpose(0, 2, 1)
      yield 'down_kernel', get(f'{p}mlp.experts.down_proj', (e, d, f)).transpose(0, 2, 1)
      return
    p += f'{self.experts_module}.'
    yield 'router_kernel', get(f'{p}gate.weight', (e, d)).T
    for ours, theirs in self.expert_names:
      shape = (d, f) if ours == 'down' else (f, d)
      yield f'{ours}_kernel', np.stack([get(f'{p}experts.{j}.{theirs}.weight', shape).T for j in range(e)])

  def _experts_to_hf(self, moe: dict, i: int, m):
    p = f'model.layers.{i}.{self.experts_module}.'
    yield p + 'gate.weight', host(np.asarray(moe['router_kernel']).T)
    for j in range(m.moe_experts):
      for ours, theirs in self.expert_names:
        yield f'{p}experts.{j}.{theirs}.weight', host(np.asarray(moe[f'{ours}_kernel'][j]).T)


def _get(tree: dict, path: str):
  for name in path.split('/'):
    tree = tree[name]
  return tree


class Mistral(Llama):
  model_type = 'mistral'
  sliding_window = True
  own_biases = False


class Mixtral(Mistral):
  """Mixtral's experts: the router `gate` [E, D] and per expert w1 (gate), w3 (up) [F, D] and w2 (down)
  [D, F] under block_sparse_moe; every block a mixture, the chosen gates renormalised."""
  model_type = 'mixtral'
  moe = True
  moe_fixed = {'moe_every': 1, 'moe_first_dense': 0, 'moe_mlp_dim': 0, 'moe_norm_top_k': True}
  experts_module = 'block_sparse_moe'
  expert_names = (('gate', 'w1'), ('up', 'w3'), ('down', 'w2'))

  def _moe_from_hf(self, hf: dict[str, Any]) -> dict[str, Any]:
    hf_value(hf, 'router_jitter_noise', 0.0, (0.0,))
    return {'model.moe_experts': hf['num_local_experts'], 'model.moe_top_k': hf['num_experts_per_tok'],
            'model.moe_every': 1, 'model.moe_capacity_factor': 0.0}

  def _moe_to_hf(self, m) -> dict[str, Any]:
    return {'num_local_experts': m.moe_experts, 'num_experts_per_tok': m.moe_top_k, 'router_jitter_noise': 0.0,
            'output_router_logits': False}


class Qwen2(Llama):
  model_type = 'qwen2'
  qkv_bias = True
  own_biases = False


class Qwen3(Llama):
  model_type = 'qwen3'
  qk_norm = True
  own_biases = False


class Qwen3Moe(Qwen3):
  """Qwen3-MoE: Qwen3's attention; experts (gate_proj, up_proj, down_proj, moe_intermediate_size wide) and
  the router `gate` under mlp on every decoder_sparse_step-th block, except the first mlp_only_layers,
  which keep a dense MLP intermediate_size wide. Imported with dropless experts."""
  model_type = 'qwen3_moe'
  architecture = 'Qwen3MoeForCausalLM'
  moe = True
  experts_module = 'mlp'
  expert_names = (('gate', 'gate_proj'), ('up', 'up_proj'), ('down', 'down_proj'))

  def _moe_from_hf(self, hf: dict[str, Any]) -> dict[str, Any]:
    experts = hf['num_experts'] if 'num_experts' in hf else hf['num_local_experts']
    dense = sorted(hf_value(hf, 'mlp_only_layers', []))
    if dense != list(range(len(dense))):
      raise ConfigError(f'mlp_only_layers={dense} in config.json is not supported (lm can represent: the first '
                        'layers, model.moe_first_dense)')
    return {'model.moe_experts': experts, 'model.moe_top_k': hf['num_experts_per_tok'],
            'model.moe_mlp_dim': hf['moe_intermediate_size'], 'model.moe_every': hf_value(hf, 'decoder_sparse_step', 1),
            'model.moe_first_dense': len(dense), 'model.moe_norm_top_k': bool(hf_value(hf, 'norm_topk_prob', False)),
            'model.moe_impl': 'dropless', 'model.moe_capacity_factor': 0.0}

  def _moe_to_hf(self, m) -> dict[str, Any]:
    return {'num_experts': m.moe_experts, 'num_experts_per_tok': m.moe_top_k, 'moe_intermediate_size': expert_width(m),
            'decoder_sparse_step': m.moe_every, 'mlp_only_layers': list(range(m.moe_first_dense)),
            'norm_topk_prob': m.moe_norm_top_k, 'output_router_logits': False}


LLAMA, MISTRAL, MIXTRAL, QWEN2, QWEN3, QWEN3_MOE = Llama(), Mistral(), Mixtral(), Qwen2(), Qwen3(), Qwen3Moe()
