"""Where a prompt starts: as the tokenizer starts a text (lm.data.tokenizers.prompt_ids). On models
imported from a tokenizer that adds no BOS (GPT-2) and from one that does (Llama 3's style), greedy
lm.generate gives transformers' greedy text exactly; lm's own tokenizers start prompts with BOS; and
lm.generate's refusals of requests no model can answer."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import transformers

from conftest import ROOT
from lm import hf
from lm.config import ConfigError
from lm.data import tokenizers
from lm.data.builders import normalize_text, shakespeare_plays_dir
from lm.generate import generate
from lm.training import saved
from test_families import _hf_folder, _llama3_style
from test_hf import hf_gpt2  # noqa: F401 (the fixture)

PROMPT = 'To be, or not to be'
NEW = 12


def _cli(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'lm.generate', *args], capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT, timeout=300)


def _transformers_greedy(folder, model, ids: list[int]) -> str:
  """transformers' greedy continuation of ids (up to NEW tokens or its end token), as text."""
  tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / 'tokenizer.json'))
  with torch.no_grad():
    new = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=NEW, do_sample=False)[0, len(ids):]
  return tokenizer.decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.fixture(scope='module')
def hf_llama(tmp_path_factory):
  """(save_pretrained folder, torch model) of a random Llama whose tokenizer starts texts with BOS."""
  play = sorted(shakespeare_plays_dir().glob('*/*.md'))[0]
  tokenizer = _llama3_style([normalize_text(play.read_text(encoding='utf-8'))[:50_000]])
  folder, model = _hf_folder(tmp_path_factory.mktemp('hf_llama'), tokenizer, transformers.LlamaConfig,
                             tie_word_embeddings=False)
  (folder / 'tokenizer_config.json').write_text(json.dumps({
      'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': '<|begin_of_text|>', 'eos_token': '<|endoftext|>'}))
  return folder, model


def test_prompts_start_as_the_tokenizer_starts_a_text(hf_gpt2, hf_llama, tmp_path):  # noqa: F811
  byte = tokenizers.ByteTokenizer()
  assert tokenizers.prompt_ids(byte, 'ab').tolist() == [257, 97, 98]  # lm's own: BOS first, as in training.
  assert tokenizers.prompt_ids(byte, '').tolist() == [257] and tokenizers.prompt_ids(byte, 'ab').dtype == np.int32
  for (folder, _), adds in ((hf_gpt2[:2], False), (hf_llama, True)):
    hf.import_hf(folder, tmp_path / folder.name)
    ours = saved.load(tmp_path / folder.name, devices=jax.devices()[:1]).tokenizer
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / 'tokenizer.json'))
    assert ours.adds_bos is adds and tokenizers.prompt_ids(ours, PROMPT).tolist() == theirs(PROMPT).input_ids


@pytest.mark.slow
def test_greedy_generation_equals_transformers_with_and_without_bos(hf_gpt2, hf_llama, tmp_path):  # noqa: F811
  gpt2_folder, gpt2_model, bpe = hf_gpt2
  texts = {}
  for name, folder, model in (('gpt2', gpt2_folder, gpt2_model), ('llama', *hf_llama)):
    hf.import_hf(folder, tmp_path / name)
    ids = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / 'tokenizer.json'))(PROMPT).input_ids
    texts[name] = _transformers_greedy(folder, model, ids)
    run = saved.load(tmp_path / name, devices=jax.devices()[:1])
    assert generate(run, PROMPT, max_new_tokens=NEW, greedy=True) == [[texts[name]]], name
  # Started with GPT-2's end-of-text token (what lm.generate did before), the text differs: the test can tell.
  end = bpe.token_to_id('<|endoftext|>')
  assert _transformers_greedy(gpt2_folder, gpt2_model, [end] + bpe.encode(PROMPT).ids) != texts['gpt2']
  # The command gives the same text (GPT-2: no BOS).
  done = _cli(f'--workdir={tmp_path / "gpt2"}', f'--prompt={PROMPT}', '--greedy', f'--max_new_tokens={NEW}', '--json')
  assert done.returncode == 0, done.stderr[-2000:]
  assert json.loads(done.stdout) == {'prompt': PROMPT, 'continuations': [texts['gpt2']]}
  # An empty prompt has no token to start from under GPT-2's tokenizer; its end-of-text token, as text, is one.
  run = saved.load(tmp_path / 'gpt2', devices=jax.devices()[:1])
  with pytest.raises(ConfigError) as e:
    generate(run, '', max_new_tokens=4, greedy=True)
  assert str(e.value) == ("an empty prompt: this tokenizer starts no text with a token of its own; give text (its "
                          "end-of-text token '<|endoftext|>' starts from nothing)")
  assert generate(run, '<|endoftext|>', max_new_tokens=NEW, greedy=True, stop_at_end=False) == [
      [_transformers_greedy(gpt2_folder, gpt2_model, [end]).replace('<|endoftext|>', '')]]


def test_requests_no_model_answers_are_refused_in_one_line():
  # The command's refusals run through python -m lm.generate in tests/test_bad_input.py.
  with pytest.raises(ConfigError) as e:
    generate('/nonexistent', 'x', greedy=True, num_return_sequences=2)
  assert str(e.value) == ('Greedy methods without beam search do not support `num_return_sequences` different than 1 '
                          '(got 2): pass greedy=False and a temperature above 0')
  with pytest.raises(ConfigError, match=r'^max_new_tokens=-1: must be >= 1 \(default 128; or give max_length'):
    generate('/nonexistent', 'x', max_new_tokens=-1)
