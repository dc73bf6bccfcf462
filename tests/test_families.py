"""The open families through lm.hf: for each of llama, mistral, mixtral, qwen2 and qwen3 a tiny
transformers model with every parameter random (norms and biases too; nothing downloaded) imports
with PyTorch's logits, exports back to the same logits, and greedy-decodes transformers' tokens from a
left-padded prompt batch. The RoPE scalings (llama3, linear, dynamic) are checked on the logits."""

import jax
import numpy as np
import pytest
import torch
import transformers

from lm import hf, kinds, saved
from lm.config import ConfigError
from lm.data.builders import normalize_text, shakespeare_plays_dir
from lm.decode import Sampling, generate_ids
from lm.kinds.llama import rope_from_hf
from test_hf import _byte_level_bpe

SHAPE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             rms_norm_eps=1e-5, max_position_embeddings=96)
FAMILIES = {
    'llama': (transformers.LlamaConfig, dict(tie_word_embeddings=False, rope_parameters={
        'rope_type': 'llama3', 'rope_theta': 5e5, 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
        'original_max_position_embeddings': 16})),
    'mistral': (transformers.MistralConfig, dict(sliding_window=8, tie_word_embeddings=False)),
    'mixtral': (transformers.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    'qwen2': (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    'qwen3': (transformers.Qwen3Config, dict(head_dim=16, tie_word_embeddings=False)),
}
ROPES = {
    'linear': dict(rope_parameters={'rope_type': 'linear', 'rope_theta': 10000.0, 'factor': 4.0}),
    'dynamic': dict(rope_parameters={'rope_type': 'dynamic', 'rope_theta': 10000.0, 'factor': 2.0},
                    max_position_embeddings=24),
    'biased': dict(attention_bias=True, mlp_bias=True),  # Llama's biases on every projection.
}
TEXT = 'To be, or not to be, that is the question:\nWhether \'tis nobler in the mind to suffer the slings'


@pytest.fixture(scope='module')
def tokenizer(tmp_path_factory):
  play = sorted(shakespeare_plays_dir().glob('*/*.md'))[0]
  return _byte_level_bpe([normalize_text(play.read_text(encoding='utf-8'))[:50_000]])


def _hf_folder(folder, tokenizer, config_class, **knobs):
  """A save_pretrained folder of a random model; returns (folder, the torch model)."""
  end = tokenizer.token_to_id('<|endoftext|>')
  config = config_class(**(SHAPE | knobs), vocab_size=tokenizer.get_vocab_size(), bos_token_id=end, eos_token_id=end,
                        pad_token_id=end)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():  # Norm scales around 1, the rest around 0, none trivial.
      p.copy_(torch.randn_like(p) * 0.2 + (1.0 if 'norm' in name else 0.0))
  model.save_pretrained(folder)
  tokenizer.save(str(folder / 'tokenizer.json'))
  return folder, model


def _torch_logits(model, ids) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(ids)[None]).logits[0].numpy()


def _lm_logits(run, ids) -> np.ndarray:
  return np.asarray(run.model.apply({'params': run.params}, np.asarray(ids)[None]))[0]


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_family_imports_exports_and_decodes_as_transformers(family, tokenizer, tmp_path):
  config_class, knobs = FAMILIES[family]
  folder, torch_model = _hf_folder(tmp_path / 'hf', tokenizer, config_class, **knobs)
  config = hf.import_hf(folder, tmp_path / 'imported')
  assert kinds.hf_family_of(config.model).model_type == family  # The family it would export as.
  run = saved.load(tmp_path / 'imported', devices=jax.devices()[:1])
  ids = tokenizer.encode(TEXT).ids
  assert len(ids) > 16  # Past llama3's original context and mistral's window.
  ours = _lm_logits(run, ids)
  np.testing.assert_allclose(ours, _torch_logits(torch_model, ids), atol=1e-4, rtol=1e-4)

  hf.export_hf(tmp_path / 'imported', tmp_path / 'exported')
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'exported').eval()
  assert type(reloaded) is type(torch_model)
  np.testing.assert_allclose(_torch_logits(reloaded, ids), ours, atol=1e-4, rtol=1e-4)

  # Greedy decoding from a left-padded batch, through lm's KV cache, gives transformers' tokens.
  end = tokenizer.token_to_id('<|endoftext|>')
  prompts = [ids[:11], ids[:4]]
  padded = torch.tensor([[end] * (11 - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (11 - len(p)) + [1] * len(p) for p in prompts])
  torch_model.generation_config.eos_token_id = None  # Neither side stops at (or suppresses) the end token.
  with torch.no_grad():
    theirs = torch_model.generate(padded, attention_mask=mask, max_new_tokens=40, do_sample=False,
                                  pad_token_id=end)[:, 11:].numpy()
  mine = generate_ids(run.model, run.params, [np.asarray(p, np.int32) for p in prompts], max_new_tokens=40,
                      sampling=Sampling(temperature=0.0), rng=jax.random.PRNGKey(0))
  np.testing.assert_array_equal(np.stack(mine), theirs)


@pytest.mark.parametrize('variant', sorted(ROPES))
def test_llama_variants_import_with_transformers_logits(variant, tokenizer, tmp_path):
  folder, torch_model = _hf_folder(tmp_path / 'hf', tokenizer, transformers.LlamaConfig, **ROPES[variant])
  hf.import_hf(folder, tmp_path / 'imported')
  run = saved.load(tmp_path / 'imported', devices=jax.devices()[:1])
  ids = tokenizer.encode(TEXT + TEXT).ids[:48]  # Past the dynamic variant's 24 positions.
  np.testing.assert_allclose(_lm_logits(run, ids), _torch_logits(torch_model, ids), atol=1e-4, rtol=1e-4)
  hf.export_hf(tmp_path / 'imported', tmp_path / 'exported')
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'exported').eval()
  np.testing.assert_allclose(_torch_logits(reloaded, ids), _torch_logits(torch_model, ids), atol=1e-4, rtol=1e-4)


def test_what_lm_cannot_represent_is_refused_naming_the_field():
  base = {'max_position_embeddings': 64}
  with pytest.raises(ConfigError, match=r"rope_parameters.rope_type='yarn' in config.json is not supported"):
    rope_from_hf(base | {'rope_parameters': {'rope_type': 'yarn', 'factor': 4.0}})
  assert rope_from_hf(base | {'rope_theta': 5e5, 'rope_scaling': {'type': 'linear', 'factor': 2.0}}) == {
      'model.rope_base': 5e5, 'model.rope_scaling': 'linear', 'model.rope_scaling_factor': 2.0}
  llama = transformers.LlamaConfig(**SHAPE, vocab_size=64).to_dict()
  refusals = {'hidden_act': ('gelu', "hidden_act='gelu' in config.json is not supported"),
              'mlp_bias': (True, 'attention_bias=False with mlp_bias=True in config.json is not supported')}
  for field, (value, message) in refusals.items():
    with pytest.raises(ConfigError, match=message):
      kinds.for_hf('llama').config_from_hf(llama | {field: value})
  qwen2 = transformers.Qwen2Config(**SHAPE, vocab_size=64).to_dict()
  with pytest.raises(ConfigError, match="use_sliding_window=True in config.json is not supported"):
    kinds.for_hf('qwen2').config_from_hf(qwen2 | {'use_sliding_window': True})
  mixtral = transformers.MixtralConfig(**SHAPE, vocab_size=64).to_dict()
  with pytest.raises(ConfigError, match="router_jitter_noise=0.1 in config.json is not supported"):
    kinds.for_hf('mixtral').config_from_hf(mixtral | {'router_jitter_noise': 0.1})
  # Export: a windowed model is Mistral's, and Llama refuses it by name.
  windowed = kinds.for_hf('mistral').config_from_hf(transformers.MistralConfig(**SHAPE, vocab_size=64).to_dict())
  assert kinds.hf_family_of(windowed.model).model_type == 'mistral'
  with pytest.raises(ConfigError, match="model.sliding_window=4096: a llama checkpoint needs model.sliding_window=0"):
    kinds.hf_family_of(windowed.model, 'llama')
