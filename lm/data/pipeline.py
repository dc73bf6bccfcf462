"""From a TFDS array_record source to batches, with Grain: shuffle, tokenize, pack, batch.

Train order is a pure function of (seed, position in the stream, process): documents are
shuffled per epoch by index, packed, then shuffled again in windows of packed sequences; the
iterator's state is small and goes into every checkpoint.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Iterator

import grain
import ml_collections
import numpy as np

from lm.config import ConfigError
from lm.data import builders, tokenizers
from lm.data.packing import PackIterDataset


@dataclasses.dataclass
class Corpus:
  train_source: Any  # Random-access TFDS data sources of examples with a text feature.
  eval_source: Any
  tokenizer: tokenizers.Tokenizer
  text_key: str
  dataset: str  # Names the prepared data exactly (for text_files: which files, sizes, mtimes).


def _split_source(builder, split: str, key: str, text_key: str):
  splits = list(builder.info.splits)
  if split not in splits:
    raise ConfigError(f'{key}={split!r} is not a split of {builder.name!r}; it has {", ".join(sorted(splits))}')
  source = builder.as_data_source(split)
  if len(source) == 0:
    raise ConfigError(f'{key}={split!r} of {builder.name!r} holds no examples')
  if text_key not in source[0]:
    raise ConfigError(f'data.text_key={text_key!r} is not a feature of {builder.name!r}; '
                      f'it has {", ".join(sorted(source[0]))}')
  return source


def _text(example: dict, text_key: str) -> str:
  text = example[text_key]
  return text.decode('utf-8') if isinstance(text, bytes) else str(text)


def load_corpus(config: ml_collections.ConfigDict, tokenizer_dir: pathlib.Path,
                expected_dataset: str | None = None) -> Corpus:
  """Prepares the dataset if it is ours, opens both splits, loads or trains the tokenizer.

  With expected_dataset (what a workdir's checkpoints were trained on), refuses other data.
  """
  d = config.data
  builder = builders.prepare_builder(d.name, d.tfds_data_dir or None, d.paths, d.val_fraction)
  dataset = f'{builder.info.full_name}:{d.train_split}:{d.eval_split}'
  if expected_dataset and dataset != expected_dataset:
    raise ConfigError(f'the data changed since this workdir\'s checkpoints were written '
                      f'({expected_dataset} then, {dataset} now; edited text files?); use a new --workdir')
  train = _split_source(builder, d.train_split, 'data.train_split', d.text_key)
  evaluation = _split_source(builder, d.eval_split, 'data.eval_split', d.text_key)
  texts = (_text(train[i], d.text_key) for i in range(len(train)))
  tokenizer = tokenizers.load_or_train(d.tokenizer, config.model.vocab_size, tokenizer_dir, texts,
                                       d.tokenizer_train_bytes, trained_on=dataset)
  return Corpus(train, evaluation, tokenizer, d.text_key, dataset)


class _Tokenize(grain.transforms.Map):
  """Example -> int32 tokens of its text, led by the document separator."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, text_key: str):
    self._tokenizer, self._text_key = tokenizer, text_key

  def map(self, example: dict) -> np.ndarray:
    ids = self._tokenizer.encode(_text(example, self._text_key))
    return np.concatenate([np.array([self._tokenizer.bos_id], np.int32), ids])


_TRAIN_READ = grain.ReadOptions(num_threads=1, prefetch_buffer_size=64)
_EVAL_READ = grain.ReadOptions(num_threads=0)  # No prefetch threads to leave behind on an early stop.


def train_dataset(config: ml_collections.ConfigDict, corpus: Corpus, shard_index: int = 0,
                  shard_count: int = 1) -> grain.IterDataset:
  """Endless batches {'tokens': [B / shard_count, L + 1] int32, 'loss_mask': [B / shard_count, L] bool}.

  With several data shards (one per group of processes holding the same rows of a batch), each
  reads its own documents; the global batch is the shards' batches stacked in shard order.
  """
  d = config.data
  docs = grain.MapDataset.source(corpus.train_source)[shard_index::shard_count]
  docs = docs.shuffle(seed=config.seed).repeat().map(_Tokenize(corpus.tokenizer, corpus.text_key))
  packed = PackIterDataset(docs.to_iter_dataset(_TRAIN_READ), seq_len=d.seq_len,
                           pad_id=corpus.tokenizer.pad_id, pad_final=False)
  if d.shuffle_window:
    packed = grain.experimental.WindowShuffleIterDataset(packed, window_size=d.shuffle_window,
                                                         seed=config.seed)
  return packed.batch(d.batch_size // shard_count, drop_remainder=True)


def eval_dataset(config: ml_collections.ConfigDict, corpus: Corpus) -> grain.IterDataset:
  """The whole eval split in order, packed like training; the last window padded."""
  docs = grain.MapDataset.source(corpus.eval_source).map(_Tokenize(corpus.tokenizer, corpus.text_key))
  return PackIterDataset(docs.to_iter_dataset(_EVAL_READ), seq_len=config.data.seq_len,
                         pad_id=corpus.tokenizer.pad_id, pad_final=True)


def eval_batches(config: ml_collections.ConfigDict, corpus: Corpus,
                 num_batches: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Batches of exactly eval.batch_size (padding rows masked out); num_batches=0: the whole split."""
  size = config.eval.batch_size
  batches = eval_dataset(config, corpus).batch(size, drop_remainder=False)
  for i, batch in enumerate(batches):
    if num_batches and i >= num_batches:
      return
    short = size - len(batch['tokens'])
    if short:
      batch = {'tokens': np.pad(batch['tokens'], ((0, short), (0, 0)), constant_values=corpus.tokenizer.pad_id),
               'loss_mask': np.pad(batch['loss_mask'], ((0, short), (0, 0)), constant_values=False)}
    yield batch
