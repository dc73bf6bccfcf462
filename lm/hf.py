"""GPT-2 weights in and out of Hugging Face's format (a `save_pretrained` folder: config.json,
model.safetensors, tokenizer.json). Needs the `hf` extra: pip install -e '.[hf]'.

  python -m lm.hf import --hf_dir=path/to/gpt2 --workdir=runs/gpt2    # then lm.generate, lm.evaluate,
                                                                      # or checkpoint.init_from=runs/gpt2
  python -m lm.hf export --workdir=runs/x --hf_dir=out/x              # transformers can load out/x

Only files on disk are read: nothing is downloaded.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

from absl import app, flags, logging

FLAGS = flags.FLAGS
import ml_collections
import numpy as np

from lm.config import ConfigError, base_config, flatten, override, validate

# GPT-2's tanh-approximated GELU names: what model.mlp='gelu' computes (flax's approximate GELU).
_GELUS = ('gelu_new', 'gelu_pytorch_tanh', 'gelu_fast')


def require(module: str):
  """The module, or a ConfigError saying to install the hf extra."""
  try:
    return __import__(module, fromlist=['_'])
  except ImportError:
    raise ConfigError(f"GPT-2 import/export needs the '{module.split('.')[0]}' package: pip install -e '.[hf]'") from None


def config_from_hf(hf: dict[str, Any]) -> ml_collections.ConfigDict:
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


def check_gpt2_shaped(config: ml_collections.ConfigDict) -> None:
  """A ConfigError naming the first model key that GPT-2's architecture cannot express."""
  m = config.model
  wanted = {'kind': 'decoder', 'positions': 'learned', 'norm': 'layernorm', 'norm_position': 'pre', 'mlp': 'gelu',
            'use_bias': True, 'tie_embeddings': True, 'qk_norm': False, 'moe_experts': 0, 'sliding_window': 0,
            'embed_multiplier': 1.0}
  for key, value in wanted.items():
    if m[key] != value:
      raise ConfigError(f'model.{key}={m[key]!r}: a GPT-2 checkpoint needs model.{key}={value!r}')
  if m.num_kv_heads not in (0, m.num_heads):
    raise ConfigError(f'model.num_kv_heads={m.num_kv_heads}: GPT-2 has as many key/value heads as query heads')


def params_from_hf(tensors: dict[str, np.ndarray], config: ml_collections.ConfigDict) -> dict:
  """lm parameters (block_0 ... layout) from a GPT-2 state dict (Conv1D weights are [in, out])."""
  from lm.layers import mlp_width  # pylint: disable=import-outside-toplevel
  m = config.model
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
        'mlp': {'up': {'kernel': get(h + 'mlp.c_fc.weight', (d, width)), 'bias': get(h + 'mlp.c_fc.bias', (width,))},
                'down': {'kernel': get(h + 'mlp.c_proj.weight', (width, d)), 'bias': get(h + 'mlp.c_proj.bias', (d,))}}}
  return params


def params_to_hf(params: dict, config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """The inverse of params_from_hf: a GPT2LMHeadModel state dict (the tied lm_head left out)."""
  from lm.model import unstack_layers  # pylint: disable=import-outside-toplevel
  m = config.model
  params = unstack_layers(params, m.num_layers) if 'blocks' in params else params
  p = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
  out = {'transformer.wte.weight': p(params['token_embedding']['embedding']),
         'transformer.wpe.weight': p(params['position_embedding']),
         'transformer.ln_f.weight': p(params['ln_final']['scale']), 'transformer.ln_f.bias': p(params['ln_final']['bias'])}
  d = m.d_model
  for i in range(m.num_layers):
    b, h = params[f'block_{i}'], f'transformer.h.{i}.'
    a = b['attention']
    out[h + 'attn.c_attn.weight'] = p(np.concatenate([np.reshape(a[n]['kernel'], (d, d)) for n in ('query', 'key', 'value')], 1))
    out[h + 'attn.c_attn.bias'] = p(np.concatenate([np.reshape(a[n]['bias'], (d,)) for n in ('query', 'key', 'value')]))
    out[h + 'attn.c_proj.weight'] = p(np.reshape(a['out']['kernel'], (d, d)))
    out[h + 'attn.c_proj.bias'] = p(a['out']['bias'])
    for ours, theirs in (('ln_attention', 'ln_1'), ('ln_mlp', 'ln_2')):
      out[h + theirs + '.weight'], out[h + theirs + '.bias'] = p(b[ours]['scale']), p(b[ours]['bias'])
    for ours, theirs in (('up', 'c_fc'), ('down', 'c_proj')):
      out[h + f'mlp.{theirs}.weight'], out[h + f'mlp.{theirs}.bias'] = p(b['mlp'][ours]['kernel']), p(b['mlp'][ours]['bias'])
  return out


def hf_config(config: ml_collections.ConfigDict, end_id: int | None) -> dict[str, Any]:
  """transformers' config.json for config's (GPT-2-shaped) model."""
  from lm.layers import mlp_width  # pylint: disable=import-outside-toplevel
  m = config.model
  return {'model_type': 'gpt2', 'architectures': ['GPT2LMHeadModel'], 'vocab_size': m.vocab_size,
          'n_positions': m.max_len, 'n_embd': m.d_model, 'n_layer': m.num_layers, 'n_head': m.num_heads,
          'n_inner': mlp_width(m), 'activation_function': 'gelu_new', 'layer_norm_epsilon': 1e-5,
          'resid_pdrop': 0.0, 'embd_pdrop': 0.0, 'attn_pdrop': 0.0, 'initializer_range': m.init_std,
          'scale_attn_weights': True, 'tie_word_embeddings': True, 'use_cache': True, 'torch_dtype': 'float32',
          'bos_token_id': end_id, 'eos_token_id': end_id}


def import_gpt2(hf_dir: str | pathlib.Path, workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  """Writes a workdir holding the GPT-2 in hf_dir as step 0 (parameters only) with its tokenizer;
  returns its config. Generate from it, evaluate it, or fine-tune it with checkpoint.init_from."""
  import jax  # pylint: disable=import-outside-toplevel
  from lm import checkpoint  # pylint: disable=import-outside-toplevel
  from lm.data import tokenizers  # pylint: disable=import-outside-toplevel
  hf_dir, workdir = pathlib.Path(hf_dir), pathlib.Path(workdir)
  for name in ('config.json', 'model.safetensors', 'tokenizer.json'):
    if not (hf_dir / name).is_file():
      raise ConfigError(f'no {name} in {str(hf_dir)!r}: expected a folder written by save_pretrained '
                        '(config.json, model.safetensors) with the tokenizer\'s tokenizer.json')
  if checkpoint.has_checkpoints(workdir / 'checkpoints'):
    raise ConfigError(f'{str(workdir)!r} already holds checkpoints; import into a new --workdir')
  config = config_from_hf(json.loads((hf_dir / 'config.json').read_text()))
  tokenizer = tokenizers.HuggingFaceTokenizer((hf_dir / 'tokenizer.json').read_text(encoding='utf-8'))
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ConfigError(f'tokenizer.json has {tokenizer.vocab_size} tokens but config.json vocab_size='
                      f'{config.model.vocab_size}: they do not belong together')
  params = params_from_hf(require('safetensors.numpy').load_file(str(hf_dir / 'model.safetensors')), config)
  workdir.mkdir(parents=True, exist_ok=True)
  tokenizers.save(tokenizer, workdir / 'tokenizer', {'kind': 'huggingface', 'vocab_size': tokenizer.vocab_size,
                                                     'imported_from': str(hf_dir.absolute())})
  (workdir / 'config.json').write_text(json.dumps(flatten(config), indent=1, sort_keys=True))
  (workdir / checkpoint.IMPORTED_FILE).write_text(json.dumps({'imported_from': str(hf_dir.absolute())}))
  checkpointer = checkpoint.Checkpointer(workdir / 'checkpoints', config)
  checkpointer.save_params(0, jax.tree.map(np.asarray, params))
  checkpointer.close()
  return config


def export_gpt2(workdir: str | pathlib.Path, hf_dir: str | pathlib.Path, step: int | None = None) -> pathlib.Path:
  """Writes the run's parameters at `step` (default: latest) as a transformers GPT-2 folder, with its
  tokenizer.json if the run uses a Hugging Face tokenizer."""
  import jax  # pylint: disable=import-outside-toplevel
  from lm import saved, sharding  # pylint: disable=import-outside-toplevel
  from lm.data import tokenizers  # pylint: disable=import-outside-toplevel
  safetensors_numpy = require('safetensors.numpy')
  workdir, hf_dir = pathlib.Path(workdir), pathlib.Path(hf_dir)
  run = saved.load(workdir, step, devices=jax.devices()[:1], mesh_shape=(1, 1, 1))
  check_gpt2_shaped(run.config)
  hf_dir.mkdir(parents=True, exist_ok=True)
  tensors = params_to_hf(sharding.to_host(run.params), run.config)
  safetensors_numpy.save_file(tensors, str(hf_dir / 'model.safetensors'), metadata={'format': 'pt'})
  end_id = run.tokenizer.bos_id
  (hf_dir / 'config.json').write_text(json.dumps(hf_config(run.config, end_id), indent=2))
  if isinstance(run.tokenizer, tokenizers.HuggingFaceTokenizer):
    (hf_dir / 'tokenizer.json').write_text(run.tokenizer.json_text, encoding='utf-8')
    end = run.tokenizer.end_token
    (hf_dir / 'tokenizer_config.json').write_text(json.dumps({
        'tokenizer_class': 'GPT2Tokenizer', 'bos_token': end, 'eos_token': end, 'unk_token': end,
        'model_max_length': run.config.model.max_len}, indent=2))
  return hf_dir


def _define_flags() -> None:
  """The command line's flags (defined only when run as a program)."""
  flags.DEFINE_string('hf_dir', None, 'The Hugging Face folder to read (import) or write (export).')
  flags.DEFINE_string('workdir', None, 'The lm workdir to write (import) or read (export).')
  flags.DEFINE_integer('step', None, 'export: the checkpoint to write (default: the latest).')


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in ('import', 'export') or not FLAGS.hf_dir or not FLAGS.workdir:
    sys.exit('usage: python -m lm.hf import --hf_dir=DIR --workdir=runs/NAME | '
             'python -m lm.hf export --workdir=runs/NAME --hf_dir=DIR')
  logging.set_verbosity(logging.WARNING)
  try:
    if argv[1] == 'import':
      config = import_gpt2(FLAGS.hf_dir, FLAGS.workdir)
      m = config.model
      print(f'imported a GPT-2 of {m.num_layers} layers, width {m.d_model}, {m.vocab_size} tokens into '
            f'{FLAGS.workdir}/ (step 0)')
    else:
      print(f'exported to {export_gpt2(FLAGS.workdir, FLAGS.hf_dir, FLAGS.step)}/')
  except (ConfigError, OSError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
