"""A TFDS catalog dataset by name: lm1b built by its own TFDS builder, in array_record format, from
local files laid out as its download unpacks (nothing downloaded), then read by a run as a user with
lm1b prepared reads it."""

from __future__ import annotations

import glob
import itertools
import types
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.datasets.lm1b import lm1b_dataset_builder

from conftest import tiny_config
from lm.config import ConfigError
from lm.data import pipeline
from lm.data.builders import shakespeare_plays_dir


@pytest.fixture(scope='module')
def lm1b_dir(tmp_path_factory) -> str:
  """lm1b 1.1.0 prepared with TFDS's builder code from the plays' lines, one sentence per line as
  lm1b's news files hold them: 'tfds build lm1b --file_format=array_record', with the download
  replaced by those files."""
  raw = tmp_path_factory.mktemp('lm1b_download')
  top = raw / lm1b_dataset_builder._TOP_LEVEL_DIR
  lines = [line.strip() for play in sorted(shakespeare_plays_dir().glob('*/*.md'))[:6]
           for line in play.read_text(encoding='utf-8').splitlines() if len(line.strip()) > 20]
  for folder, name, part in (('training-monolingual.tokenized.shuffled', 'news.en-0000{}-of-00100', lines[:-400]),
                             ('heldout-monolingual.tokenized.shuffled', 'news.en.heldout-0000{}-of-00050',
                              lines[-400:])):
    (top / folder).mkdir(parents=True)
    for shard in range(2):
      (top / folder / name.format(shard)).write_text('\n'.join(part[shard::2]) + '\n', encoding='utf-8')
  data_dir = str(tmp_path_factory.mktemp('tfds_catalog'))
  no_tensorflow = types.SimpleNamespace(io=types.SimpleNamespace(gfile=types.SimpleNamespace(glob=glob.glob)))
  with mock.patch.object(lm1b_dataset_builder, 'tf', no_tensorflow), \
       mock.patch.object(tfds.download.DownloadManager, 'download_and_extract', return_value=str(raw)):
    builder = tfds.builder('lm1b', data_dir=data_dir, file_format='array_record')
    builder.download_and_prepare()
  return data_dir


def test_a_prepared_catalog_dataset_trains_and_evaluates_by_name(lm1b_dir, play_files, tmp_path):
  config = tiny_config(lm1b_dir, play_files, **{'data.name': 'lm1b', 'data.paths': '', 'data.eval_split': 'test',
                                                'data.document_mask': True})
  corpus = pipeline.load_corpus(config.data, config.model.vocab_size, tmp_path / 'tok')
  assert corpus.dataset == 'lm1b/1.1.0:train'
  train_lines = len(corpus.train_source)
  assert train_lines > 1000 and len(corpus.eval_source) == 400
  batch = next(iter(pipeline.train_dataset(config.data, corpus, config.seed)))
  text = corpus.tokenizer.decode(np.ravel(batch['tokens']))
  assert any(word in text for word in ('the', 'and', 'I'))
  assert batch['segment_ids'].max() > 2  # Sentences shorter than a sequence, each its own document.
  evaluated = list(itertools.islice(pipeline.eval_batches(config.data, corpus, config.seed, 16), 3))
  assert len(evaluated) == 3 and all(b['tokens'].shape == (16, 33) for b in evaluated)


def test_an_unprepared_catalog_dataset_names_the_build_command(tmp_path, play_files):
  config = tiny_config(str(tmp_path), play_files, **{'data.name': 'lm1b', 'data.paths': ''})
  with pytest.raises(ConfigError, match='prepare it once with: tfds build lm1b --file_format=array_record '
                                        f'--data_dir={tmp_path}'):
    pipeline.load_corpus(config.data, config.model.vocab_size, tmp_path / 'tok')
