"""From a TFDS array_record source to batches, with Grain: shuffle, tokenize, pack, batch.

Train order is a pure function of (seed, position in the stream, process): documents are
shuffled per epoch by index, packed, then shuffled again in windows of packed sequences; the
iterator's state is small and goes into every checkpoint.

data.objective shapes the batches:
  lm               {'tokens': [B, L + 1], 'loss_mask': [B, L]}: next-token prediction (decoder).
  span_corruption  packed windows corrupted T5-style (lm/data/spans.py) into
                   {'inputs': [B, L], 'tokens': [B, T + 1], 'loss_mask': [B, T]} (encoder-decoder).
  seq2seq          one (input, target) example per row, the same keys, cut or padded to L and T.
The model predicts tokens[:, 1:] from tokens[:, :-1] (and the inputs), where loss_mask is True.
With data.document_mask, packed batches also hold 'segment_ids' (like 'tokens'; span corruption:
and 'input_segment_ids', like 'inputs'): each token's document, numbered from 1 in its row, 0 on padding.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import pathlib
import shutil
from typing import Any, Iterator

import grain
import ml_collections
from ml_collections import ConfigDict
import numpy as np

from lm.config import ConfigError, MixtureSource, mixture_sources, reserved_ids, target_len
from lm.data import builders, spans, tokenized, tokenizers
from lm.data.packing import PackIterDataset


@dataclasses.dataclass
class Corpus:
  train_source: Any  # Random-access TFDS data sources of examples with a text feature.
  eval_source: Any
  tokenizer: tokenizers.Tokenizer
  text_keys: tuple[str, ...]  # The text feature, or (seq2seq) the input and target features.
  dataset: str  # Names the prepared data exactly (for text_files: which files, sizes, mtimes).
  vocab_size: int  # The model's (model.vocab_size): span corruption's sentinels take its top ids.
  pretokenized: bool = False  # The sources hold token arrays (data.name='tokenized'), not examples.


@dataclasses.dataclass
class Mixture:
  """data.mixture: one Corpus per source (by label), sharing the tokenizer, and their weights."""
  corpora: dict[str, Corpus]
  weights: dict[str, float]
  tokenizer: tokenizers.Tokenizer
  dataset: str
  vocab_size: int


def _check_names(builder, splits, features, split: str, key: str, text_keys: tuple[str, ...]) -> None:
  """Refuses a split or text feature of data section keys that the dataset (of those splits and features) lacks."""
  if split not in splits:
    raise ConfigError(f'{key}={split!r} is not a split of {builder.name!r}; it has {", ".join(sorted(splits))}')
  for text_key, config_key in zip(text_keys, ('data.input_key', 'data.target_key') if len(text_keys) == 2
                                  else ('data.text_key',)):
    if text_key not in features:
      raise ConfigError(f'{config_key}={text_key!r} is not a feature of {builder.name!r}; '
                        f'it has {", ".join(sorted(features))}')


def _split_source(builder, split: str, key: str, text_keys: tuple[str, ...]):
  source = builder.as_data_source(split) if split in builder.info.splits else None
  if source is not None and len(source) == 0:
    raise ConfigError(f'{key}={split!r} of {builder.name!r} holds no examples')
  _check_names(builder, list(builder.info.splits), source[0] if source is not None else (), split, key, text_keys)
  return source


def example_text(example: dict, text_key: str) -> str:
  text = example[text_key]
  return text.decode('utf-8') if isinstance(text, bytes) else str(text)


def load_corpus(d: ConfigDict, vocab_size: int, tokenizer_dir: pathlib.Path, expected_dataset: str | None = None,
                tokenizer: tokenizers.Tokenizer | None = None, init_from: str = '',
                files_dir: pathlib.Path | None = None) -> Corpus:
  """Prepares the dataset of the data section `d` if it is ours, opens both splits, loads or trains
  the tokenizer for a model of vocab_size ids (or takes that of the run in init_from, as
  checkpoint.init_from does; or uses the one given).

  A dataset made from the user's files (text_files, text_pairs) is prepared in files_dir (a workdir's
  data/; None: TFDS's default folder), unless data.tfds_data_dir says where (see builders.data_dir).
  With expected_dataset (what a workdir's checkpoints were trained on), refuses other data before
  preparing any.
  """
  tokenizer_dir = pathlib.Path(tokenizer_dir)
  if d.mixture.strip():
    return _load_mixture(d, vocab_size, tokenizer_dir, expected_dataset, tokenizer, init_from, files_dir)
  if d.name == 'tokenized':
    return _load_tokenized(d, vocab_size, tokenizer_dir, expected_dataset, tokenizer, init_from)
  where = builders.data_dir(d.name, d.tfds_data_dir, files_dir)
  builder = builders.make_builder(d.name, where, d.paths, d.val_fraction, (d.input_key, d.target_key), d.text_key)
  dataset = f'{builder.info.full_name}:{d.train_split}'  # What training reads; the eval split may change.
  _check_same_data(expected_dataset, dataset)
  text_keys = (d.input_key, d.target_key) if d.objective == 'seq2seq' else (d.text_key,)
  prepared_here = False  # By this call, under files_dir: what a refusal below takes back, with a new tokenizer.
  if d.name in ('shakespeare', *builders.FILE_DATASETS):
    for split, key in ((d.train_split, 'data.train_split'), (d.eval_split, 'data.eval_split')):
      _check_names(builder, builders.SPLITS, builder.info.features, split, key, text_keys)
    prepared_here = builders.prepare(builder) and where == str(files_dir)
  new_tokenizer_dir = not tokenizer_dir.exists()
  try:
    return _open_corpus(d, vocab_size, tokenizer_dir, builder, dataset, text_keys, tokenizer, init_from)
  except ConfigError:  # A refused run leaves its workdir as it was.
    if prepared_here:
      builders.unprepare(builder)
    if new_tokenizer_dir:
      shutil.rmtree(tokenizer_dir, ignore_errors=True)
    raise


def _open_corpus(d: ConfigDict, vocab_size: int, tokenizer_dir: pathlib.Path, builder, dataset: str,
                 text_keys: tuple[str, ...], tokenizer: tokenizers.Tokenizer | None, init_from: str) -> Corpus:
  """load_corpus's second half: the splits of a prepared builder, the tokenizer, and their checks."""
  train = _split_source(builder, d.train_split, 'data.train_split', text_keys)
  evaluation = _split_source(builder, d.eval_split, 'data.eval_split', text_keys)
  texts = (example_text(train[i], key) for i in range(len(train)) for key in text_keys)
  room = vocab_size - reserved_ids(d)
  tokenizer = tokenizer or tokenizers.load_or_train(
      d.tokenizer, room, tokenizer_dir, texts, d.tokenizer_train_bytes,
      trained_on=dataset, copy_from=pathlib.Path(init_from) / 'tokenizer' if init_from else None)
  if tokenizer.vocab_size > room:  # A tokenizer taken over by checkpoint.init_from may not fit.
    sentinels = f' less {reserved_ids(d)} span-corruption sentinels' if reserved_ids(d) else ''
    raise ConfigError(f'the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={vocab_size}'
                      f'{sentinels} leaves room for {room}')
  corpus = Corpus(train, evaluation, tokenizer, text_keys, dataset, vocab_size)
  if d.objective != 'seq2seq':
    _check_fills_a_sequence(d, corpus)
  return corpus


def _source_section(d: ConfigDict, source: MixtureSource):
  """The data section of one mixture source: d with its name and paths, and no mixture."""
  section = ml_collections.ConfigDict(dict(d.items()) if hasattr(d, 'items') else dataclasses.asdict(d))
  section.update(name=source.name, paths=source.paths, mixture='')
  return section


def _load_mixture(d: ConfigDict, vocab_size: int, tokenizer_dir: pathlib.Path, expected_dataset: str | None,
                  tokenizer: tokenizers.Tokenizer | None, init_from: str, files_dir: pathlib.Path) -> Mixture:
  """Each source of data.mixture, all with one tokenizer: that of the tokenized sources (which must
  agree), or one trained on the text sources' train splits taken in turn (or given, or init_from's)."""
  sources = mixture_sources(d)
  sections = {s.label: _source_section(d, s) for s in sources}

  def refused(label, e):
    return ConfigError(f'data.mixture source {label!r}: {e}')

  shards = {s.label: tokenized.read_manifest(s.paths) for s in sources if s.name == 'tokenized'}
  fingerprints = {label: m['tokenizer']['fingerprint'] for label, m in shards.items()}
  if len(set(fingerprints.values())) > 1:
    (a, _), (b, _) = list(fingerprints.items())[:2]
    raise ConfigError(f'data.mixture sources {a!r} and {b!r} were tokenized with different tokenizers: '
                      'tokenize every source with one')
  if tokenizer is None and shards:
    first = next(iter(shards))
    tokenizer = _load_tokenized(sections[first], vocab_size, tokenizer_dir, None, None, init_from).tokenizer
  if tokenizer is None and not init_from and d.tokenizer == 'sentencepiece':
    builders_ = {}
    for s in sources:
      try:
        builders_[s.label] = builders.prepare_builder(s.name, builders.data_dir(s.name, d.tfds_data_dir, files_dir),
                                                      s.paths, d.val_fraction, text_key=d.text_key)
      except ConfigError as e:
        raise refused(s.label, e) from None
    trains = [_split_source(b, d.train_split, 'data.train_split', (d.text_key,)) for b in builders_.values()]
    rows = itertools.zip_longest(*(range(len(t)) for t in trains))
    taken_in_turn = (example_text(t[i], d.text_key) for row in rows for t, i in zip(trains, row) if i is not None)
    trained_on = 'mixture(' + ','.join(f'{b.info.full_name}:{d.train_split}' for b in builders_.values()) + ')'
    tokenizer = tokenizers.load_or_train(d.tokenizer, vocab_size - reserved_ids(d), tokenizer_dir, taken_in_turn,
                                         d.tokenizer_train_bytes, trained_on=trained_on)
  corpora = {}
  for s in sources:
    try:
      corpora[s.label] = load_corpus(sections[s.label], vocab_size, tokenizer_dir, tokenizer=tokenizer,
                                     init_from=init_from, files_dir=files_dir)
    except ConfigError as e:
      raise refused(s.label, e) from None
    tokenizer = tokenizer or corpora[s.label].tokenizer  # The first source's (init_from's, or the byte one).
  dataset = 'mixture(' + ','.join(f'{s.label}={corpora[s.label].dataset}*{s.weight:g}' for s in sources) + ')'
  _check_same_data(expected_dataset, dataset)
  return Mixture(corpora, {s.label: s.weight for s in sources}, tokenizer, dataset, vocab_size)


def _check_same_data(expected_dataset: str | None, dataset: str) -> None:
  if expected_dataset and not tokenizers.same_train_data(expected_dataset, dataset):
    raise ConfigError(f'the data changed since this workdir\'s checkpoints were written '
                      f'({expected_dataset} then, {dataset} now; edited text files?); use a new --workdir')


def _load_tokenized(d: ConfigDict, vocab_size: int, tokenizer_dir: pathlib.Path, expected_dataset: str | None,
                    tokenizer: tokenizers.Tokenizer | None, init_from: str) -> Corpus:
  """The shards of python -m lm.tokenize in data.paths, with the tokenizer they were made with."""
  manifest = tokenized.read_manifest(d.paths)
  room = vocab_size - reserved_ids(d)
  tokenized.check_run(manifest, d, room, d.paths)
  shards_tokenizer = pathlib.Path(os.path.expanduser(d.paths)) / 'tokenizer'
  if init_from and (tokenized.tokenizer_fingerprint(pathlib.Path(init_from) / 'tokenizer', d.tokenizer)
                    != manifest['tokenizer']['fingerprint']):
    raise ConfigError(f'checkpoint.init_from={init_from!r} has another tokenizer than data.paths={d.paths!r} was '
                      'tokenized with')
  dataset = f"tokenized:{manifest['source']['dataset']}:{manifest['tokenizer']['fingerprint']}:{d.train_split}"
  _check_same_data(expected_dataset, dataset)
  tokenizer = tokenizer or tokenizers.load_or_train(d.tokenizer, room, tokenizer_dir, (), 0,
                                                    copy_from=shards_tokenizer)
  corpus = Corpus(tokenized.open_split(manifest, d.paths, d.train_split),
                  tokenized.open_split(manifest, d.paths, d.eval_split), tokenizer, (), dataset, vocab_size,
                  pretokenized=True)
  _check_fills_a_sequence(d, corpus)
  return corpus


def _check_fills_a_sequence(d: ConfigDict, corpus: Corpus) -> None:
  """Refuses a train split with fewer tokens than one packed training sequence (read until it has them)."""
  need = d.seq_len + 1 if d.objective == 'lm' else _span_corruption(d, corpus).raw_len
  tokenize = (lambda doc: doc) if corpus.pretokenized else Tokenize(corpus.tokenizer, corpus.text_keys).map
  total = 0
  for i in range(len(corpus.train_source)):
    total += len(tokenize(corpus.train_source[i]))
    if total >= need:
      return
  raise ConfigError(f'data.train_split={d.train_split!r} holds {total} tokens, fewer than one training sequence '
                    f'({need} tokens for data.seq_len={d.seq_len}): add text or lower data.seq_len')


class Tokenize(grain.transforms.Map):
  """Example -> int32 tokens of its text, led by the document separator."""

  def __init__(self, tokenizer: tokenizers.Tokenizer, text_keys: tuple[str, ...]):
    self._tokenizer, (self._text_key,) = tokenizer, text_keys

  def map(self, example: dict) -> np.ndarray:
    ids = self._tokenizer.encode(example_text(example, self._text_key))
    return np.concatenate([np.array([self._tokenizer.bos_id], np.int32), ids])


class _TokenizePair(grain.transforms.Map):
  """(input, target) example -> {'inputs': [seq_len], 'tokens': [target_len + 1], 'loss_mask': [target_len]}.

  The input is cut or padded to seq_len; the decoder reads the document separator, the target, and
  the separator again (so it learns where a target ends), cut or padded to target_len + 1.
  """

  def __init__(self, tokenizer: tokenizers.Tokenizer, keys: tuple[str, str], seq_len: int, target_len: int):
    self._tokenizer, self._keys, self._seq_len, self._target_len = tokenizer, keys, seq_len, target_len

  def map(self, example: dict) -> dict[str, np.ndarray]:
    t, (input_key, target_key) = self._tokenizer, self._keys
    inputs = t.encode(example_text(example, input_key))[:self._seq_len]
    target = t.encode(example_text(example, target_key))
    tokens = np.concatenate([[t.bos_id], target, [t.bos_id]])[:self._target_len + 1]
    loss_mask = np.arange(self._target_len) < len(tokens) - 1
    return {'inputs': np.pad(inputs, (0, self._seq_len - len(inputs)), constant_values=t.pad_id).astype(np.int32),
            'tokens': np.pad(tokens, (0, self._target_len + 1 - len(tokens)),
                             constant_values=t.pad_id).astype(np.int32),
            'loss_mask': loss_mask}


def _span_corruption(d: ConfigDict, corpus: Corpus) -> spans.SpanCorruption:
  t = corpus.tokenizer
  return spans.SpanCorruption(d.seq_len, d.noise_density, d.mean_span_length, corpus.vocab_size,
                              start_id=t.bos_id, pad_id=t.pad_id)


def _examples(d: ConfigDict, corpus: Corpus, seed: int, docs: grain.MapDataset, read: grain.ReadOptions, training: bool,
              shard_index: int = 0) -> grain.IterDataset:
  """Documents -> examples of data.objective (a finite eval stream keeps its padded tail for lm)."""
  t = corpus.tokenizer
  if d.objective == 'seq2seq':
    pair = _TokenizePair(t, corpus.text_keys, d.seq_len, target_len(d))
    return docs.map(pair).to_iter_dataset(read)
  docs = (docs if corpus.pretokenized else docs.map(Tokenize(t, corpus.text_keys))).to_iter_dataset(read)
  if d.objective == 'lm':
    return PackIterDataset(docs, seq_len=d.seq_len, pad_id=t.pad_id, pad_final=not training,
                           segment_ids=d.document_mask)
  corruption = _span_corruption(d, corpus)
  # Windows of raw_len tokens (each starting on the last token of the one before).
  windows = PackIterDataset(docs, seq_len=corruption.raw_len - 1, pad_id=t.pad_id, pad_final=False,
                            segment_ids=d.document_mask)
  # Grain seeds each window's masks by (seed, position in this stream): the shard goes into the seed.
  return windows.random_map(corruption, seed=(seed * 1_000_003 + shard_index) % 2**32)


_TRAIN_READ = grain.ReadOptions(num_threads=1, prefetch_buffer_size=64)
_EVAL_READ = grain.ReadOptions(num_threads=0)  # No prefetch threads to leave behind on an early stop.


def train_dataset(d: ConfigDict, corpus: Corpus | Mixture, seed: int, shard_index: int = 0,
                  shard_count: int = 1) -> grain.IterDataset:
  """Endless batches of B / shard_count rows (see the module docstring for their keys), shuffled by
  `seed` (the run's).

  With several data shards (one per group of processes holding the same rows of a batch), each
  reads its own documents; the global batch is the shards' batches stacked in shard order. A
  mixture draws each row from one source, in Grain's deterministic proportions of the weights, and
  says which in 'source' [B] (the index of its label in corpus.weights).
  """
  def packed_stream(c: Corpus) -> grain.IterDataset:
    docs = grain.MapDataset.source(c.train_source)[shard_index::shard_count]
    return _examples(d, c, seed, docs.shuffle(seed=seed).repeat(), _TRAIN_READ, training=True,
                     shard_index=shard_index)

  if isinstance(corpus, Mixture):
    streams = {label: packed_stream(c).map(_Tag(i)) for i, (label, c) in enumerate(corpus.corpora.items())}
    packed = grain.IterDataset.mix(streams, corpus.weights)
  else:
    packed = packed_stream(corpus)
  if d.shuffle_window:
    packed = grain.experimental.WindowShuffleIterDataset(packed, window_size=d.shuffle_window, seed=seed)
  return packed.batch(d.batch_size // shard_count, drop_remainder=True)


class _Tag(grain.transforms.Map):
  """Marks an example with the index of its mixture source."""

  def __init__(self, index: int):
    self._index = np.int32(index)

  def map(self, example: dict) -> dict:
    return example | {'source': self._index}


def eval_dataset(d: ConfigDict, corpus: Corpus, seed: int) -> grain.IterDataset:
  """The whole eval split in order, made into examples like training (lm: the last window padded;
  span corruption: the tail dropped, the same corruption every time)."""
  return _examples(d, corpus, seed, grain.MapDataset.source(corpus.eval_source), _EVAL_READ, training=False)


def eval_batches(d: ConfigDict, corpus: Corpus, seed: int, size: int,
                 num_batches: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Batches of exactly `size` (eval.batch_size; padding rows masked out); num_batches=0: the whole split."""
  batches = eval_dataset(d, corpus, seed).batch(size, drop_remainder=False)
  for i, batch in enumerate(batches):
    if num_batches and i >= num_batches:
      return
    short = size - len(batch['tokens'])
    if short:
      batch = {k: np.pad(v, ((0, short), (0, 0)), constant_values=False if k == 'loss_mask' else 0
                         if k.endswith('segment_ids') else corpus.tokenizer.pad_id)
               for k, v in batch.items()}
    yield batch
