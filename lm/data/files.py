"""The user's files behind text_files and text_pairs (data.paths): globs resolved, UTF-8 text checked,
rows of JSONL (plain, gzip, zstd) and Parquet read a block at a time, tab-separated pairs; every
malformed, truncated or unreadable file refused in one line naming it and its row.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import hashlib
import io
import json
import os
import pathlib
from typing import Iterator
import zlib

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from lm.config import ConfigError


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


def files_digest(files: list[pathlib.Path], *settings) -> str:
  """Names the files' current contents (path, size, mtime) and the settings that shape the splits."""
  digest = hashlib.sha1(repr(settings).encode())
  for f in files:
    stat = f.stat()
    digest.update(f'{f}\0{stat.st_size}\0{stat.st_mtime_ns}\0'.encode())
  return digest.hexdigest()[:12]


def text_lines(path: pathlib.Path) -> Iterator[str]:
  """The lines of a text file as read_text() would give them (universal newlines), one at a time."""
  with open(path, encoding='utf-8') as f:
    yield from f


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
