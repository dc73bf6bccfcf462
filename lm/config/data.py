"""The `data.*` keys: where text comes from, how it is tokenized and batched, and the sizes derived
from them; with the rules tying them to the model."""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

from lm.config.schema import BOOLEAN, FREE, MATCH, SHAPE, ConfigError, choice, integer, key, number, string

BYTE_VOCAB_SIZE = 258  # 256 bytes + pad + document separator; see lm/data/tokenizers.py.
PAD_IDS = {'byte': 256, 'sentencepiece': 0}  # The padding id of each data.tokenizer.
MIN_SENTENCEPIECE_VOCAB = 320  # 256 byte-fallback pieces + specials + room for merges.
FILE_SOURCES = ('text_files', 'text_pairs', 'tokenized')  # data.name values read from data.paths.


@dataclasses.dataclass(frozen=True)
class Data:
  name: str = key('shakespeare', string(nonempty=True), MATCH,
                  "'shakespeare', 'text_files', 'text_pairs', 'tokenized' (the shards python -m lm.tokenize wrote "
                  'to data.paths), or any TFDS dataset prepared as array_record.')
  paths: str = key('', string(), MATCH, 'text_files / text_pairs: comma-separated files or globs (text_files: '
                   'text, or one document per row in .jsonl, .jsonl.gz, .jsonl.zst, .parquet; pairs: .tsv '
                   'input<TAB>target, or .jsonl); tokenized: the lm.tokenize --out folder.')
  tfds_data_dir: str = key('', string(), FREE, "Where datasets are prepared and read. '': text_files and "
                           "text_pairs under the workdir (WORKDIR/data), other datasets in TFDS's default "
                           '($TFDS_DATA_DIR or ~/tensorflow_datasets); set it to share prepared files between runs.')
  train_split: str = key('train', string(nonempty=True), MATCH, 'The split training reads.')
  eval_split: str = key('validation', string(nonempty=True), FREE, 'The split evaluation reads.')
  text_key: str = key('text', string(nonempty=True), MATCH, 'Feature holding the text in each example (text_files: '
                      'the field or column of each JSONL or Parquet row).')
  tokenizer: str = key('sentencepiece', choice('sentencepiece', 'byte', 'huggingface'), SHAPE,
                       "'sentencepiece' (trained on the train split on first use), 'byte', or 'huggingface' (a "
                       'tokenizer.json taken from checkpoint.init_from: a GPT-2 brought in by python -m lm.hf import).')
  tokenizer_train_bytes: int = key(50_000_000, integer(1), FREE,
                                   'At most this much train text is used to train sentencepiece.')
  objective: str = key('lm', choice('lm', 'span_corruption', 'seq2seq'), MATCH,
                       "'lm' (next token), 'span_corruption' (T5, on the same text) or 'seq2seq' (input/target pairs).")
  seq_len: int = key(256, integer(1), MATCH, 'Tokens per training sequence (the model sees seq_len inputs, predicts '
                     'seq_len targets).')
  target_len: int = key(64, integer(1), MATCH, 'seq2seq: decoder positions per example (targets are cut or padded).')
  input_key: str = key('input', string(nonempty=True), MATCH, 'seq2seq: the feature holding the input text.')
  target_key: str = key('target', string(nonempty=True), MATCH, 'seq2seq: the feature holding the target text.')
  noise_density: float = key(0.15, number(0, 1, lo_open=True, hi_open=True), MATCH,
                             'span_corruption: share of tokens masked.')
  mean_span_length: float = key(3.0, number(1), MATCH, 'span_corruption: mean length of the masked spans.')
  batch_size: int = key(32, integer(1), MATCH, 'Sequences per step.')
  shuffle_window: int = key(1024, integer(0), MATCH, 'Packed sequences shuffled together after packing; 0 = off.')
  mixture: str = key('', string(), MATCH, "Train on several sources by weight, e.g. 'shakespeare:0.7,text_files:0.3': "
                     'comma-separated SOURCE:WEIGHT, SOURCE a data.name (text_files and tokenized read data.paths, '
                     'or NAME=PATHS, comma-free); each is evaluated apart (eval/SOURCE/...); data.name is not read.')
  document_mask: bool = key(False, BOOLEAN, MATCH, 'Packed sequences carry segment ids: attention stays within a '
                            'document, positions restart at each, and no document\'s first token is a target of the '
                            'one before (lm, span_corruption).')
  val_fraction: float = key(0.1, number(0, 0.5, lo_open=True), MATCH, 'text_files: share of files (or of a lone '
                            'file) held out for validation; text_pairs: of pairs.')


class MixtureSource(NamedTuple):
  label: str  # Its name in metrics: eval/LABEL/loss, train/mixture/LABEL.
  name: str  # Its data.name.
  paths: str  # Its data.paths.
  weight: float


def mixture_sources(d: Data) -> list[MixtureSource]:
  """The entries of data.mixture ('NAME[=PATHS]:WEIGHT', comma-separated), labelled by name (a repeated
  name: NAME_2, NAME_3, ...); a malformed entry is a ConfigError naming it."""
  entries = []
  for part in (p.strip() for p in d.mixture.split(',')):
    if not part:
      continue
    source, sep, weight = part.rpartition(':')
    name, _, paths = source.partition('=')
    if not sep or not name.strip():
      raise ConfigError(f"data.mixture entry {part!r}: expected SOURCE:WEIGHT, e.g. 'shakespeare:0.7,text_files:0.3'")
    try:
      value = float(weight)
    except ValueError:
      raise ConfigError(f'data.mixture entry {part!r}: the weight {weight!r} is not a number') from None
    if not math.isfinite(value) or value < 0:
      raise ConfigError(f'data.mixture entry {part!r}: the weight must be a finite number >= 0')
    name, paths = name.strip(), paths.strip() or (d.paths if name.strip() in FILE_SOURCES else '')
    entries.append((name, paths, value))
  seen: dict[str, int] = {}
  sources = []
  for name, paths, weight in entries:
    seen[name] = seen.get(name, 0) + 1
    sources.append(MixtureSource(name if seen[name] == 1 else f'{name}_{seen[name]}', name, paths, weight))
  return sources


def mixture_rules(c) -> list[str]:
  d = c.data
  if not d.mixture.strip():
    return []
  try:
    sources = mixture_sources(d)
  except ConfigError as e:
    return [str(e)]
  errors = []
  if not sources or sum(s.weight for s in sources) <= 0:
    errors.append(f'data.mixture={d.mixture!r}: the weights must sum to a positive number')
  if d.objective == 'seq2seq':
    errors.append("data.mixture mixes documents; data.objective='seq2seq' reads one source of pairs")
  for s in sources:
    if s.name == 'text_pairs':
      errors.append("data.mixture source 'text_pairs' holds pairs, not documents: it cannot be mixed")
    elif s.name in FILE_SOURCES and not s.paths:
      errors.append(f'data.mixture source {s.name!r} reads data.paths, which is empty: set it, or write '
                    f'{s.name}=PATHS:{s.weight:g}')
    elif s.name not in FILE_SOURCES and s.paths:
      errors.append(f"data.mixture source {s.label!r}: only text_files and tokenized read paths")
  if len({(s.name, s.paths) for s in sources}) < len(sources):
    errors.append(f'data.mixture={d.mixture!r} names one source twice')
  return errors


def span_lengths(seq_len: int, noise_density: float, mean_span_length: float) -> tuple[int, int, int, int]:
  """Span corruption (lm/data/spans.py): (raw_len, num_noise, num_spans, target_len), the longest
  token window whose corrupted input fits in seq_len, and what it yields."""

  def counts(raw_len):
    num_noise = min(max(1, round(raw_len * noise_density)), raw_len - 1)
    num_spans = max(1, min(round(num_noise / mean_span_length), num_noise, raw_len - num_noise))
    return num_noise, num_spans

  raw_len = seq_len
  while True:  # The corrupted input of raw_len + 1 tokens would still fit: take it.
    noise, spans = counts(raw_len + 1)
    if raw_len + 1 - noise + spans > seq_len:
      break
    raw_len += 1
  num_noise, num_spans = counts(raw_len)
  return raw_len, num_noise, num_spans, num_noise + num_spans


def reserved_ids(d: Data) -> int:
  """Ids at the top of the vocabulary the tokenizer leaves free: span corruption's sentinels (d: the
  data section)."""
  return span_lengths(d.seq_len, d.noise_density, d.mean_span_length)[2] if d.objective == 'span_corruption' else 0


def target_len(d: Data) -> int:
  """Decoder positions of an encoder-decoder example (seq2seq: data.target_len; d: the data section)."""
  if d.objective == 'span_corruption':
    return span_lengths(d.seq_len, d.noise_density, d.mean_span_length)[3]
  return d.target_len


def length_rules(c) -> list[str]:
  if c.data.seq_len > c.model.max_len:
    return [f'data.seq_len={c.data.seq_len} exceeds the position table: must be <= model.max_len={c.model.max_len}']
  return []


def objective_rules(c) -> list[str]:
  """The objective against the model kind and the tokenizer."""
  m, d = c.model, c.data
  errors = []
  if m.kind == 'decoder' and d.objective != 'lm':
    errors.append(f"data.objective={d.objective!r} needs model.kind='encoder_decoder' (model.kind='decoder')")
  if m.kind == 'encoder_decoder' and d.tokenizer not in PAD_IDS:
    errors.append(f"model.kind='encoder_decoder' needs data.tokenizer 'sentencepiece' or 'byte' (not {d.tokenizer!r})")
  if m.kind == 'encoder_decoder' and d.objective == 'lm':
    errors.append("model.kind='encoder_decoder' needs data.objective='span_corruption' or 'seq2seq' "
                  "(data.objective='lm')")
  if m.kind == 'decoder' and m.num_encoder_layers:
    errors.append(f"model.num_encoder_layers={m.num_encoder_layers} needs model.kind='encoder_decoder'")
  if d.document_mask and d.objective == 'seq2seq':
    errors.append("data.document_mask=True masks documents packed together; data.objective='seq2seq' packs none "
                  '(one pair per row)')
  if m.kind == 'encoder_decoder' and target_len(d) > m.max_len:
    what = ('the span-corruption targets of data.seq_len' if d.objective == 'span_corruption'
            else f'data.target_len={d.target_len}')
    errors.append(f'{what} need {target_len(d)} decoder positions: must be <= model.max_len={m.max_len}')
  return errors


def source_rules(c) -> list[str]:
  """data.paths against data.name, and the vocabulary against the tokenizer."""
  m, d = c.model, c.data
  errors = []
  if d.mixture.strip():
    pass  # mixture_rules checks the sources; data.name is not read.
  elif d.name in FILE_SOURCES and not d.paths.strip():
    errors.append(f'data.paths must name at least one file when data.name={d.name!r}')
  elif d.name not in FILE_SOURCES and d.paths:
    errors.append(f"data.paths is only read when data.name is 'text_files', 'text_pairs' or 'tokenized' "
                  f'(data.name={d.name!r})')
  if d.name == 'tokenized' and d.objective == 'seq2seq':
    errors.append("data.name='tokenized' holds documents, not (input, target) pairs: data.objective='seq2seq' "
                  'reads text_pairs or a TFDS dataset')
  if d.name == 'text_files' and d.text_key == 'doc':
    errors.append("data.text_key='doc' is the feature naming each text_files document's file: pick another name")
  if d.name == 'text_pairs' and d.objective != 'seq2seq':
    errors.append(f"data.name='text_pairs' holds (input, target) pairs: needs data.objective='seq2seq' "
                  f'(data.objective={d.objective!r})')
  reserved = reserved_ids(d)
  sentinels = f' + {reserved} span-corruption sentinels' if reserved else ''
  if d.tokenizer == 'byte' and m.vocab_size < BYTE_VOCAB_SIZE + reserved:
    errors.append(f"model.vocab_size={m.vocab_size} must be >= {BYTE_VOCAB_SIZE}{sentinels} with data.tokenizer='byte'")
  if d.tokenizer == 'sentencepiece' and m.vocab_size < MIN_SENTENCEPIECE_VOCAB + reserved:
    errors.append(f"model.vocab_size={m.vocab_size} must be >= {MIN_SENTENCEPIECE_VOCAB}{sentinels} "
                  "with data.tokenizer='sentencepiece'")
  return errors
