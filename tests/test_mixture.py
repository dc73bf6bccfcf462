"""data.mixture: rows drawn from several sources by weight, deterministically and resumably, one
tokenizer for all, each source evaluated on its own; bad mixtures refused in one line."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from conftest import run_main, tiny_config, tiny_overrides
from lm.config import ConfigError
from lm.data import pipeline
from lm.tokenize import tokenize


@pytest.fixture(scope='module')
def short_files(tmp_path_factory, play_files):
  """A second text corpus: 30 small JSONL rows of other text."""
  folder = tmp_path_factory.mktemp('rows')
  rows = [f'Row {i}: numbers and more numbers, {" ".join(str(j) for j in range(i, i + 40))}.\n' for i in range(30)]
  (folder / 'rows.jsonl').write_text(''.join(json.dumps({'text': r}) + '\n' for r in rows))
  return str(folder / 'rows.jsonl')


def _mixture(tfds_dir, play_files, mixture, **extra):
  return tiny_config(tfds_dir, play_files, **{'data.mixture': mixture, 'data.shuffle_window': 0}, **extra)


@pytest.mark.parametrize('mixture, message', [
    ('shakespeare:0,text_files:0', "data.mixture='shakespeare:0,text_files:0': the weights must sum to a positive"),
    ('shakespeare', "data.mixture entry 'shakespeare': expected SOURCE:WEIGHT"),
    ('shakespeare:lots', "the weight 'lots' is not a number"),
    ('shakespeare:-1,text_files:2', 'the weight must be a finite number >= 0'),
    ('shakespeare:1,text_pairs:1', "source 'text_pairs' holds pairs"),
    ('shakespeare:1,shakespeare:1', 'names one source twice'),
    ('shakespeare:1,shakespeare=x.txt:1', 'only text_files and tokenized read paths'),
])
def test_bad_mixtures_are_refused_in_one_line(tfds_dir, play_files, mixture, message):
  with pytest.raises(ConfigError, match=message.replace('(', r'\(')) as e:
    _mixture(tfds_dir, play_files, mixture)
  assert '\n' not in str(e.value)
  with pytest.raises(ConfigError, match="source 'text_files' reads data.paths, which is empty"):
    _mixture(tfds_dir, '', 'shakespeare:1,text_files:1')


def test_unknown_sources_and_different_tokenizers_are_refused(tfds_dir, play_files, short_files, tmp_path):
  config = _mixture(tfds_dir, play_files, 'shakespeare:1,no_such_dataset:1')
  with pytest.raises(ConfigError, match="data.mixture source 'no_such_dataset': data.name='no_such_dataset' is not"):
    pipeline.load_corpus(config.data, config.model.vocab_size, tmp_path / 'tok')
  outs = []
  for name, paths in (('a', play_files), ('b', short_files)):  # Each trains its own tokenizer.
    source = tiny_config(tfds_dir, paths, **{'data.seq_len': 16})
    tokenize(source.data, source.model.vocab_size, str(tmp_path / name), workers=1, progress=False)
    outs.append(tmp_path / name)
  config = _mixture(tfds_dir, play_files, f'tokenized={outs[0]}:1,tokenized={outs[1]}:1', **{'data.seq_len': 16})
  with pytest.raises(ConfigError, match="sources 'tokenized' and 'tokenized_2' were tokenized with different "
                                        'tokenizers'):
    pipeline.load_corpus(config.data, config.model.vocab_size, tmp_path / 'tok2')


@pytest.fixture(scope='module')
def mixture(tfds_dir, play_files, short_files, tmp_path_factory):
  config = _mixture(tfds_dir, play_files, f'text_files:0.7,text_files={short_files}:0.3',
                    **{'data.seq_len': 16})
  return config, pipeline.load_corpus(config.data, config.model.vocab_size, tmp_path_factory.mktemp('tok'))


def test_rows_come_from_each_source_by_weight_and_resume_exactly(mixture):
  config, corpus = mixture
  assert list(corpus.weights) == ['text_files', 'text_files_2']
  assert corpus.corpora['text_files'].tokenizer is corpus.corpora['text_files_2'].tokenizer is corpus.tokenizer
  batches = list(itertools.islice(iter(pipeline.train_dataset(config.data, corpus, config.seed)), 50))
  sources = np.concatenate([b['source'] for b in batches])
  assert abs(np.mean(sources == 0) - 0.7) < 0.01  # 200 rows: Grain's mixing keeps the proportions.
  rows = corpus.tokenizer.decode(np.ravel([b['tokens'][b['source'] == 1] for b in batches[:5]][0]))
  assert 'numbers' in rows  # Source 1's rows are the JSONL rows.
  again = list(itertools.islice(iter(pipeline.train_dataset(config.data, corpus, config.seed)), 50))
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a['tokens'], b['tokens'])
  it = iter(pipeline.train_dataset(config.data, corpus, config.seed))
  for _ in range(20):
    next(it)
  state = it.get_state()
  resumed = iter(pipeline.train_dataset(config.data, corpus, config.seed))
  resumed.set_state(state)
  for batch in batches[20:30]:
    b = next(resumed)
    np.testing.assert_array_equal(b['tokens'], batch['tokens'])
    np.testing.assert_array_equal(b['source'], batch['source'])


@pytest.mark.slow
def test_a_mixture_run_logs_its_realised_mixture_and_each_sources_eval(tfds_dir, play_files, short_files, tmp_path,
                                                                        compile_cache):
  workdir = tmp_path / 'run'
  run_main(workdir, tiny_overrides(tfds_dir, play_files, **{'data.mixture': f'shakespeare:0.5,text_files={short_files}'
                                                                            ':0.5', 'data.paths': ''}),
           compile_cache=compile_cache)
  lines = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  train = [m for m in lines if 'train/mixture/shakespeare' in m]
  assert train and all(abs(m['train/mixture/shakespeare'] + m['train/mixture/text_files'] - 1) < 1e-9 for m in train)
  final = [m for m in lines if 'eval/shakespeare/loss' in m][-1]
  assert {'eval/text_files/loss', 'eval/text_files/bits_per_byte', 'eval/shakespeare/bits_per_byte'} <= set(final)
  # The combined eval weighs each source's loss by its tokens.
  weighted = sum(final[f'eval/{s}/loss'] * final[f'eval/{s}/tokens'] for s in ('shakespeare', 'text_files'))
  assert final['eval/tokens'] == final['eval/shakespeare/tokens'] + final['eval/text_files/tokens']
  np.testing.assert_allclose(final['eval/loss'], weighted / final['eval/tokens'], rtol=1e-9)
