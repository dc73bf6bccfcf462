"""python -m lm.tokenize and data.name='tokenized': shards that hold exactly the pipeline's tokens, a
rerun that continues, runs that read them as they read text, and refusals that name the mismatch."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, tiny_config, tiny_overrides
from lm.config import ConfigError
from lm.data import pipeline, tokenized
from lm.tokenize import tokenize

SHARD_DOCS = 3


@pytest.fixture(scope='module')
def shards(tfds_dir, play_files, tmp_path_factory):
  """The tiny text_files corpus tokenized by the command, two workers, three documents a shard."""
  out = tmp_path_factory.mktemp('shards') / 'out'
  flags = [f'--config.{k}={v}' for k, v in tiny_overrides(tfds_dir, play_files).items()]
  result = subprocess.run([sys.executable, '-m', 'lm.tokenize', f'--config={ROOT / "experiments" / "quickstart.py"}',
                           f'--out={out}', '--workers=2', f'--shard_docs={SHARD_DOCS}', *flags],
                          capture_output=True, text=True, cwd=ROOT, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  return out, result


def _text_config(tfds_dir, play_files, **extra):
  return tiny_config(tfds_dir, play_files, **extra)


def _tokenized_config(tfds_dir, play_files, out, **extra):
  return tiny_config(tfds_dir, play_files, **{'data.name': 'tokenized', 'data.paths': str(out)}, **extra)


def test_shards_hold_the_pipelines_tokens_document_for_document(tfds_dir, play_files, shards, tmp_path):
  out, result = shards
  assert 'train: ' in result.stdout and 'MB_s=' in result.stderr and 'tokens=' in result.stderr  # The bar.
  manifest = json.loads((out / 'manifest.json').read_text())
  config = _text_config(tfds_dir, play_files)
  corpus = pipeline.load_corpus(config.data, config.model.vocab_size, tmp_path / 'tok')
  assert manifest['tokenizer']['fingerprint'] == tokenized.tokenizer_fingerprint(tmp_path / 'tok', 'sentencepiece')
  assert manifest['source']['dataset'] == corpus.dataset and manifest['workers'] == 2
  tokenize_doc = pipeline.Tokenize(corpus.tokenizer, ('text',)).map
  for split, source in (('train', corpus.train_source), ('validation', corpus.eval_source)):
    reader = tokenized.open_split(manifest, str(out), split)
    expected = [tokenize_doc(source[i]) for i in range(len(source))]
    assert len(reader) == len(source) == manifest['splits'][split]['documents']
    for i, doc in enumerate(expected):
      np.testing.assert_array_equal(reader[i], doc)
    assert manifest['splits'][split]['tokens'] == sum(map(len, expected))
    assert len(manifest['splits'][split]['shards']) == -(-len(source) // SHARD_DOCS)


def test_a_run_from_the_shards_sees_the_batches_of_the_run_from_text(tfds_dir, play_files, shards, tmp_path):
  """Same seed, same documents in the same order: identical training and eval batches, on every data
  shard of a two-process run, and the iterator's checkpoint resumes the same."""
  out, _ = shards
  text = _text_config(tfds_dir, play_files, **{'data.document_mask': True})
  tokens = _tokenized_config(tfds_dir, play_files, out, **{'data.document_mask': True})
  from_text = pipeline.load_corpus(text.data, text.model.vocab_size, tmp_path / 'a')
  from_shards = pipeline.load_corpus(tokens.data, tokens.model.vocab_size, tmp_path / 'b')
  assert from_shards.pretokenized and (tmp_path / 'b' / 'sentencepiece.model').exists()  # Kept with the run.
  for shard in (0, 1):
    a = list(itertools.islice(iter(pipeline.train_dataset(text.data, from_text, 0, shard, 2)), 6))
    b = list(itertools.islice(iter(pipeline.train_dataset(tokens.data, from_shards, 0, shard, 2)), 6))
    for x, y in zip(a, b, strict=True):
      assert x.keys() == y.keys()
      for k in x:
        np.testing.assert_array_equal(x[k], y[k])
  for x, y in zip(pipeline.eval_batches(text.data, from_text, 0, 16),
                  pipeline.eval_batches(tokens.data, from_shards, 0, 16), strict=True):
    np.testing.assert_array_equal(x['tokens'], y['tokens'])
  it = iter(pipeline.train_dataset(tokens.data, from_shards, 0))
  for _ in range(3):
    next(it)
  state = it.get_state()
  later = [next(it)['tokens'] for _ in range(3)]
  again = iter(pipeline.train_dataset(tokens.data, from_shards, 0))
  again.set_state(state)
  for x in later:
    np.testing.assert_array_equal(next(again)['tokens'], x)


def test_a_killed_tokenize_continues_from_its_finished_shards(tfds_dir, play_files, shards, tmp_path):
  """A copy of the output as a kill would leave it (the manifest not yet written, the last shards
  missing or half written): the rerun writes only those, and the result is the same."""
  out, _ = shards
  killed = tmp_path / 'killed'
  subprocess.run(['cp', '-r', str(out), str(killed)], check=True)
  manifest = json.loads((killed / 'manifest.json').read_text())
  (killed / 'manifest.json').unlink()
  plan = {k: v for k, v in manifest.items()
          if k not in ('splits', 'workers', 'seconds', 'text_bytes_this_run', 'worker_seconds_this_run')}
  (killed / 'plan.json').write_text(json.dumps(plan))
  (killed / 'train' / '00001.offsets.npy').unlink()  # Killed between a shard's two files,
  (killed / 'validation' / '00000.offsets.npy').unlink()  # and before these.
  (killed / 'validation' / '00000.tokens.npy').unlink()
  kept = {p: p.stat().st_mtime_ns for p in killed.rglob('*.npy')}
  config = _text_config(tfds_dir, play_files)
  with pytest.raises(ConfigError, match='was killed before it finished: rerun'):
    pipeline.load_corpus(_tokenized_config(tfds_dir, play_files, killed).data, 384, tmp_path / 'run')
  again = tokenize(config.data, config.model.vocab_size, str(killed), workers=1, shard_docs=SHARD_DOCS,
                   progress=False)
  assert again['splits'] == manifest['splits']
  assert all(p.stat().st_mtime_ns == t for p, t in kept.items() if p.name != '00001.tokens.npy')
  assert (killed / 'train' / '00001.tokens.npy').stat().st_mtime_ns != kept[killed / 'train' / '00001.tokens.npy']
  for split in ('train', 'validation'):
    for a, b in zip(sorted((out / split).iterdir()), sorted((killed / split).iterdir()), strict=True):
      assert a.read_bytes() == b.read_bytes()
  assert not (killed / 'plan.json').exists()


def test_mismatches_are_refused_in_one_line_and_nothing_is_overwritten(tfds_dir, play_files, shards, tmp_path):
  out, _ = shards
  before = {p: p.read_bytes() for p in out.rglob('*') if p.is_file()}
  cases = [
      ({'data.tokenizer': 'byte', 'model.vocab_size': 384}, "data.tokenizer='byte', but data.paths=.* was tokenized "
                                                            "with 'sentencepiece'"),
      ({'model.vocab_size': 512}, 'was tokenized for 384 token ids .*this run has 512'),
      ({'data.eval_split': 'test'}, "data.eval_split='test' is not among the tokenized splits"),
  ]
  for overrides, message in cases:
    with pytest.raises(ConfigError, match=message):
      config = _tokenized_config(tfds_dir, play_files, out, **overrides)
      pipeline.load_corpus(config.data, config.model.vocab_size, tmp_path / 'run')
  with pytest.raises(ConfigError, match='is not a python -m lm.tokenize output'):
    config = _tokenized_config(tfds_dir, play_files, tmp_path)
    pipeline.load_corpus(config.data, config.model.vocab_size, tmp_path / 'run')
  # Tokenizing other data, or with another vocabulary, into the same folder.
  other = _text_config(tfds_dir, play_files, **{'data.val_fraction': 0.3})
  with pytest.raises(ConfigError, match='holds shards of other data'):
    tokenize(other.data, other.model.vocab_size, str(out), progress=False)
  other = _text_config(tfds_dir, play_files, **{'model.vocab_size': 512})
  with pytest.raises(ConfigError, match="holds shards of a 'sentencepiece' tokenizer for 384 ids"):
    tokenize(other.data, other.model.vocab_size, str(out), progress=False)
  assert {p: p.read_bytes() for p in out.rglob('*') if p.is_file()} == before
  bad = subprocess.run([sys.executable, '-m', 'lm.tokenize', f'--config={ROOT / "experiments" / "quickstart.py"}',
                        f'--out={tmp_path / "x"}', '--config.data.name=tokenized', f'--config.data.paths={out}'],
                       capture_output=True, text=True, cwd=ROOT, check=False, env=os.environ | {'JAX_PLATFORMS': 'cpu'})
  assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
      "error: data.name='tokenized' is what lm.tokenize writes: point --config at the text to tokenize"]
