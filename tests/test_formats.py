"""data.name='text_files' over the formats corpora ship in: JSONL (plain, gzip, zstd) and Parquet, one
document per row; bad rows refused in one line naming file and row."""

from __future__ import annotations

import gzip
import itertools
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tensorflow_datasets.core import shuffle as tfds_shuffle
import zstandard

from conftest import tiny_config
from lm.config import ConfigError
from lm.data import builders, files, pipeline

ROWS = [f'Document {i}.\nIts second line, {"x" * (i % 7)}\n\n' for i in range(40)]


def _write(path, rows, key='text'):
  """rows as a file of the format its name says, each {key: row, 'n': index}."""
  name = path.name
  if name.endswith('.parquet'):
    pq.write_table(pa.table({'n': list(range(len(rows))), key: rows}), path, row_group_size=7)
    return path
  data = ''.join(json.dumps({key: r, 'n': i}) + '\n' for i, r in enumerate(rows)).encode()
  if name.endswith('.gz'):
    data = gzip.compress(data)
  elif name.endswith('.zst'):
    data = zstandard.ZstdCompressor().compress(data)
  path.write_bytes(data)
  return path


def _texts(builder, split, key='text'):
  source = builder.as_data_source(split)
  return sorted((source[i][key].decode(), source[i]['doc'].decode()) for i in range(len(source)))


@pytest.mark.parametrize('name', ['corpus.jsonl', 'corpus.jsonl.gz', 'corpus.jsonl.zst', 'corpus.parquet'])
def test_a_row_file_gives_one_document_per_row(tmp_path, name):
  """A single file: the last ceil(0.1 * 40) = 4 rows are validation, every row whole, in a field of
  the user's naming."""
  path = _write(tmp_path / name, ROWS, key='content')
  builder = builders.prepare_builder('text_files', str(tmp_path / 'tfds'), str(path), 0.1, text_key='content')
  assert _texts(builder, 'train', 'content') == sorted((r, name) for r in ROWS[:36])
  assert _texts(builder, 'validation', 'content') == sorted((r, name) for r in ROWS[36:])


def test_text_and_row_files_mix_and_split_by_file(tmp_path):
  files = tmp_path / 'files'
  files.mkdir()
  (files / 'a.txt').write_text('Plain text.\n' * 50)
  _write(files / 'b.jsonl.zst', ROWS[:10])
  _write(files / 'c.parquet', ROWS[10:20])
  _write(files / 'd.jsonl', ROWS[20:])
  builder = builders.prepare_builder('text_files', str(tmp_path / 'tfds'), str(files / '*'), 0.25)
  train = _texts(builder, 'train')
  assert {doc for _, doc in train} == {'a.txt', 'b.jsonl.zst', 'c.parquet'}
  assert sorted(t for t, doc in train if doc != 'a.txt') == sorted(ROWS[:20])
  assert _texts(builder, 'validation') == sorted((r, 'd.jsonl') for r in ROWS[20:])


def test_a_single_text_file_is_cut_where_it_always_was(tmp_path):
  """Read line by line as it streams, a lone text file (CRLF line ends and a form feed included)
  splits exactly as the whole-file rule says: after the last line ending by 90% of its characters."""
  text = ''.join(f'line {i}\r\n' if i % 3 else f'line {i}\x0c\n\n' for i in range(2000))
  (tmp_path / 'one.txt').write_bytes(text.encode())
  read = text.replace('\r\n', '\n')  # What read_text() gives.
  cut = read.rfind('\n', 0, round(len(read) * 0.9)) + 1
  builder = builders.prepare_builder('text_files', str(tmp_path / 'tfds'), str(tmp_path / 'one.txt'), 0.1)
  for split, part in (('train', read[:cut]), ('validation', read[cut:])):
    assert sorted(t for t, _ in _texts(builder, split)) == sorted(builders.split_chunks(part))


@pytest.mark.parametrize('name, content, message', [
    ('bad.jsonl', b'{"text": "a"}\n\n{"text": "b"}\n{"text": 3}\n', "'bad.jsonl' row 4: 'text' is int, not text"),
    ('bad.jsonl', b'{"text": "a"}\n{"text": "b"\n', "'bad.jsonl' row 2 is not JSON"),
    ('bad.jsonl', b'{"text": "a"}\n{"body": "b"}\n', "'bad.jsonl' row 2 has no 'text' field (data.text_key); "
                                                     "it has 'body'"),
    ('bad.jsonl', b'{"text": "a"}\n["text"]\n', "'bad.jsonl' row 2 has no 'text' field"),
    ('bad.jsonl', b'{"text": "a"}\n{"text": "\xff"}\n', "'bad.jsonl' row 2 is not UTF-8 (byte 0xff at column 11)"),
    ('bad.jsonl.gz', gzip.compress(b''.join(b'{"text": "row %d"}\n' % i for i in range(3000)), mtime=0)[:4000],
     "'bad.jsonl.gz' is truncated after row"),
    ('bad.jsonl.gz', gzip.compress(b'{"text": "a"}\n', mtime=0)[:12] + b'not deflate',
     "'bad.jsonl.gz' cannot be read after row 0"),
    ('bad.jsonl.zst', b'not zstd at all', "'bad.jsonl.zst' cannot be read after row 0"),
    ('bad.parquet', b'not parquet', "'bad.parquet' is not a Parquet file"),
])
def test_malformed_rows_are_refused_naming_file_and_row(tmp_path, name, content, message):
  (tmp_path / name).write_bytes(content)
  with pytest.raises(ConfigError, match=re.escape(message.lstrip("'"))) as e:
    builders.prepare_builder('text_files', str(tmp_path / 'tfds'), str(tmp_path / name), 0.1)
  assert '\n' not in str(e.value)


def test_a_zstd_file_of_several_frames_reads_them_all(tmp_path):
  """As pzstd and concatenated .zst files write them: every frame's rows, in order."""
  frames = [_write(tmp_path / f'{i}.jsonl.zst', ROWS[i * 20:(i + 1) * 20]).read_bytes() for i in range(2)]
  (tmp_path / 'both.jsonl.zst').write_bytes(b''.join(frames))
  assert list(files.read_rows(tmp_path / 'both.jsonl.zst', 'text')) == ROWS


def test_parquet_columns_are_checked(tmp_path):
  _write(tmp_path / 'a.parquet', ROWS)
  with pytest.raises(ConfigError, match="has no column 'body' \\(data.text_key\\); it has n, text"):
    builders.prepare_builder('text_files', str(tmp_path / 'tfds'), str(tmp_path / 'a.parquet'), 0.1, text_key='body')
  with pytest.raises(ConfigError, match="column 'n' holds int64, not text"):
    builders.prepare_builder('text_files', str(tmp_path / 'tfds'), str(tmp_path / 'a.parquet'), 0.1, text_key='n')
  pq.write_table(pa.table({'text': ['a', None, 'c']}), tmp_path / 'nulls.parquet')
  with pytest.raises(ConfigError, match="nulls.parquet' row 2 has no text"):
    builders.prepare_builder('text_files', str(tmp_path / 'tfds'), str(tmp_path / 'nulls.parquet'), 0.1)


def test_a_run_trains_from_jsonl_rows(tfds_dir, tmp_path):
  """The pipeline reads the rows of a .jsonl.zst file as documents: its batches spell the rows' text."""
  rows = [f'Row {i} says: ' + 'to be or not to be, that is the question. ' * (1 + i % 3) for i in range(60)]
  path = _write(tmp_path / 'rows.jsonl.zst', rows)
  config = tiny_config(tfds_dir, str(path), **{'model.vocab_size': 384})
  corpus = pipeline.load_corpus(config.data, config.model.vocab_size, tmp_path / 'tok')
  assert len(corpus.train_source) == 54 and len(corpus.eval_source) == 6
  batch = next(iter(pipeline.train_dataset(config.data, corpus, config.seed)))
  text = corpus.tokenizer.decode(np.ravel(batch['tokens'][:, 1:]))
  assert 'to be or not to be' in text
  evaluated = list(itertools.chain.from_iterable(
      corpus.tokenizer.decode(np.ravel(b['tokens'][:, 1:][b['loss_mask']]))
      for b in pipeline.eval_batches(config.data, corpus, config.seed, 16)))
  assert ''.join(evaluated).count('Row ') == 6


def test_a_corpus_over_the_memory_buffer_spills_to_disk_without_tensorflow(tmp_path, monkeypatch):
  """Past TFDS's in-memory buffer (1 GB; 2 KB here) examples go through bucket files on disk, written
  without TensorFlow: the prepared split is the same, example for example and in the same order."""
  path = _write(tmp_path / 'rows.jsonl', ROWS * 5)
  in_memory = builders.prepare_builder('text_files', str(tmp_path / 'a'), str(path), 0.1).as_data_source('train')
  monkeypatch.setattr(tfds_shuffle, 'MAX_MEM_BUFFER_SIZE', 2048)
  spilled = builders.prepare_builder('text_files', str(tmp_path / 'b'), str(path), 0.1).as_data_source('train')
  assert len(spilled) == len(in_memory) == 180
  assert [spilled[i] for i in range(180)] == [in_memory[i] for i in range(180)]
  assert not list((tmp_path / 'b').rglob('bucket_*'))  # The buckets are gone.


def test_a_dataset_of_your_files_is_prepared_in_the_workdir_unless_told_where(tmp_path, monkeypatch):
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'shared'))  # TFDS's default: nothing may land there.
  path = _write(tmp_path / 'rows.jsonl', ROWS)
  config = tiny_config('', str(path), **{'data.tokenizer': 'byte'})
  workdir = tmp_path / 'run'
  corpus = pipeline.load_corpus(config.data, config.model.vocab_size, workdir / 'tokenizer', files_dir=workdir / 'data')
  assert len(corpus.train_source) + len(corpus.eval_source) == len(ROWS)
  assert [p.name for p in workdir.iterdir() if p.name != 'tokenizer'] == ['data']
  assert [p.name for p in (workdir / 'data').iterdir()] == ['text_files']  # No empty downloads/ beside it.
  assert not (tmp_path / 'shared').exists()
  told = tiny_config(str(tmp_path / 'shared'), str(path), **{'data.tokenizer': 'byte'})
  pipeline.load_corpus(told.data, told.model.vocab_size, tmp_path / 'other' / 'tokenizer',
                       files_dir=tmp_path / 'other' / 'data')
  assert (tmp_path / 'shared' / 'text_files').is_dir() and not (tmp_path / 'other' / 'data').exists()


def test_a_prepare_that_fails_leaves_nothing_behind(tmp_path):
  _write(tmp_path / 'a.jsonl', ROWS)
  (tmp_path / 'b.jsonl').write_bytes(b'{"text": "fine"}\n{"text": "cut')
  config = tiny_config('', str(tmp_path / '*.jsonl'), **{'data.tokenizer': 'byte'})
  with pytest.raises(ConfigError, match=r"b.jsonl' row 2 is not JSON \(Unterminated string starting at column 10\)"):
    pipeline.load_corpus(config.data, config.model.vocab_size, tmp_path / 'run' / 'tokenizer',
                         files_dir=tmp_path / 'run' / 'data')
  assert not (tmp_path / 'run').exists() or not any((tmp_path / 'run').rglob('*'))
