"""GPT-2 interop: a transformers GPT-2 with random weights (built here, nothing downloaded) imports
into lm with the same logits, and lm's export loads back into transformers with them again."""

import json
import os

import jax
import numpy as np
import pytest
from tokenizers import Tokenizer
import torch
import transformers

from conftest import tiny_overrides
from lm import hf
from lm.config import ConfigError, override, validate
from lm.data.builders import normalize_text, shakespeare_plays_dir
from lm.data.tokenizers import train_byte_level_bpe
from lm.evaluate import evaluate
from lm.generate import generate
from lm.training import loop, saved

TEXT = 'To be, or not to be, that is the question:\nWhether \'tis nobler in the mind to suffer'


def _byte_level_bpe(texts) -> Tokenizer:
  """A GPT-2-style byte-level BPE tokenizer (320 learned tokens, then <|endoftext|>)."""
  return train_byte_level_bpe(texts, 321)


@pytest.fixture(scope='module')
def hf_gpt2(tmp_path_factory):
  """A save_pretrained folder of a small random GPT-2 (no parameter left at a trivial value)."""
  folder = tmp_path_factory.mktemp('hf_gpt2')
  play = sorted(shakespeare_plays_dir().glob('*/*.md'))[0]
  tokenizer = _byte_level_bpe([normalize_text(play.read_text(encoding='utf-8'))[:50_000]])
  tokenizer.save(str(folder / 'tokenizer.json'))
  end = tokenizer.token_to_id('<|endoftext|>')
  config = transformers.GPT2Config(vocab_size=tokenizer.get_vocab_size(), n_positions=64, n_embd=32, n_layer=2,
                                   n_head=4, bos_token_id=end, eos_token_id=end)
  torch.manual_seed(0)
  model = transformers.GPT2LMHeadModel(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():  # Norms and biases too, so each is checked.
      scale, shift = (0.1, 0) if 'ln' not in name else (0.2, 1.0 if 'weight' in name else 0)
      p.copy_(torch.randn_like(p) * scale + shift)
  model.save_pretrained(folder)
  return folder, model, tokenizer


def _torch_logits(model, ids) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(ids)[None]).logits[0].numpy()


def test_import_then_export_keeps_the_logits(hf_gpt2, tmp_path):
  folder, torch_model, tokenizer = hf_gpt2
  hf.import_hf(folder, tmp_path / 'imported')
  run = saved.load(tmp_path / 'imported', devices=jax.devices()[:1])
  ids = run.tokenizer.encode(TEXT)
  assert list(ids) == tokenizer.encode(TEXT).ids and run.tokenizer.decode(ids) == TEXT
  ours = np.asarray(run.model.apply({'params': run.params}, ids[None]))[0]
  np.testing.assert_allclose(ours, _torch_logits(torch_model, ids), atol=1e-4, rtol=1e-4)

  hf.export_hf(tmp_path / 'imported', tmp_path / 'exported')
  reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / 'exported').eval()
  np.testing.assert_allclose(_torch_logits(reloaded, ids), ours, atol=1e-4, rtol=1e-4)
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / 'exported')
  assert hf_tokenizer.encode(TEXT) == list(ids)
  umask = os.umask(0o022)
  os.umask(umask)
  modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / 'exported').iterdir()}
  assert modes == dict.fromkeys(['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json',
                                 'generation_config.json'], oct(0o666 & ~umask))  # Not safetensors' 0600.

  with pytest.raises(ConfigError, match=f"^'{tmp_path / 'exported'}' is not empty; export into a new --hf_dir, or "
                                        'give --overwrite to replace its files$'):
    hf.export_hf(tmp_path / 'imported', tmp_path / 'exported')
  hf.export_hf(tmp_path / 'imported', tmp_path / 'exported', overwrite=True)
  assert sorted(modes) == sorted(p.name for p in (tmp_path / 'exported').iterdir())


def test_greedy_generation_matches_transformers(hf_gpt2, tmp_path):
  folder, torch_model, tokenizer = hf_gpt2
  hf.import_hf(folder, tmp_path / 'imported')
  end = tokenizer.token_to_id('<|endoftext|>')
  prompt = tokenizer.encode('To be').ids  # As GPT-2's tokenizer starts a text: no BOS (tests/test_prompts.py).
  with torch.no_grad():
    theirs = torch_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                                  pad_token_id=end)[0, len(prompt):].tolist()
  [[ours]] = generate(tmp_path / 'imported', 'To be', max_new_tokens=12, greedy=True, stop_at_end=False)
  assert ours == tokenizer.decode(theirs)


def test_bad_checkpoints_are_refused(hf_gpt2, tmp_path):
  folder, _, _ = hf_gpt2
  with pytest.raises(ConfigError, match='no config.json in'):
    hf.import_hf(tmp_path, tmp_path / 'w')
  config = json.loads((folder / 'config.json').read_text())
  broken = tmp_path / 'broken'
  broken.mkdir()
  for name in ('model.safetensors', 'tokenizer.json'):
    (broken / name).write_bytes((folder / name).read_bytes())
  (broken / 'config.json').write_text(json.dumps(config | {'vocab_size': 100}))
  with pytest.raises(ConfigError, match='tokenizer.json has 321 tokens but config.json vocab_size=100'):
    hf.import_hf(broken, tmp_path / 'w2')
  (broken / 'config.json').write_text(json.dumps(config | {'activation_function': 'relu'}))
  with pytest.raises(ConfigError, match="activation_function='relu'"):
    hf.import_hf(broken, tmp_path / 'w3')


@pytest.mark.slow  # Over 9 s on 2 cores: the fast loop stays under 5 minutes.
def test_imported_gpt2_fine_tunes_from_its_weights(hf_gpt2, tmp_path, tfds_dir, play_files):
  folder, _, _ = hf_gpt2
  hf.import_hf(folder, tmp_path / 'imported')
  imported = saved.load(tmp_path / 'imported', devices=jax.devices()[:1])
  data = dict(dataset='text_files', paths=play_files, tfds_data_dir=tfds_dir, seq_len=32, batch_size=16)
  before = evaluate(imported, **data)
  config = validate(override(imported.config, tiny_overrides(tfds_dir, play_files, **{
      'checkpoint.init_from': str(tmp_path / 'imported'), 'data.tokenizer': 'huggingface', 'model.max_len': 64,
      'model.vocab_size': imported.config.model.vocab_size, 'model.mlp_dim': 0, 'model.num_heads': 4,
      'optimizer.learning_rate': 3e-3, 'eval.num_samples': 0, 'train.steps': 8})))
  trainer = loop.Trainer(config, tmp_path / 'finetune', devices=jax.devices()[:1])
  jax.tree.map(np.testing.assert_array_equal, trainer.state.params, imported.params)  # Starts from GPT-2's weights.
  after = trainer.run()
  assert after['tokens'] == before['tokens'] and after['loss'] < before['loss'] - 0.1
  with pytest.raises(ConfigError, match='holds imported parameters, not a training run'):
    loop.Trainer(config, tmp_path / 'imported', devices=jax.devices()[:1])
