"""Token shards written once by `python -m lm.tokenize` and read by data.name='tokenized'.

  DIR/manifest.json               what was tokenized and with what; written last, when every shard is
  DIR/plan.json                   the same without the counts: what a killed run was making
  DIR/tokenizer/                  the tokenizer, as a workdir keeps it
  DIR/SPLIT/NNNNN.tokens.npy      a shard's documents back to back (uint16 or uint32 ids, each led by
                                  the document separator, as the pipeline tokenizes text)
  DIR/SPLIT/NNNNN.offsets.npy     int64 [documents + 1]: where each starts; written after the tokens,
                                  so a shard is finished when its offsets exist

Shard i of a split holds its documents i * shard_docs .. (i + 1) * shard_docs - 1, in the source's
order: a run over the shards sees the documents, and so the batches, of the same run over the text.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import pathlib
from typing import Any

import numpy as np

from lm.config import ConfigError

FORMAT = 1
MANIFEST, PLAN = 'manifest.json', 'plan.json'


def shard_files(split_dir: pathlib.Path, index: int) -> tuple[pathlib.Path, pathlib.Path]:
  return split_dir / f'{index:05d}.tokens.npy', split_dir / f'{index:05d}.offsets.npy'


def _save_atomically(path: pathlib.Path, array: np.ndarray) -> None:
  tmp = path.with_name(path.name + '.tmp')
  with open(tmp, 'wb') as f:
    np.save(f, array)
  os.replace(tmp, path)


def write_shard(split_dir: pathlib.Path, index: int, docs: list[np.ndarray], dtype: str) -> int:
  """Writes one shard (tokens, then the offsets that mark it finished); returns its token count."""
  split_dir.mkdir(parents=True, exist_ok=True)
  tokens_path, offsets_path = shard_files(split_dir, index)
  _save_atomically(tokens_path, np.concatenate(docs).astype(dtype) if docs else np.zeros(0, dtype))
  _save_atomically(offsets_path, np.cumsum([0] + [len(d) for d in docs], dtype=np.int64))
  return sum(len(d) for d in docs)


def finished_shard(split_dir: pathlib.Path, index: int) -> tuple[int, int] | None:
  """(documents, tokens) of a finished shard, or None."""
  tokens_path, offsets_path = shard_files(split_dir, index)
  if not offsets_path.exists() or not tokens_path.exists():
    return None
  offsets = np.load(offsets_path)
  return len(offsets) - 1, int(offsets[-1])


def token_dtype(vocab_size: int) -> str:
  return 'uint16' if vocab_size <= 1 << 16 else 'uint32'


def tokenizer_fingerprint(tokenizer_dir: pathlib.Path, kind: str) -> str:
  """sha256 (first 16 hex digits) of the tokenizer's file: what names its exact vocabulary."""
  digest = hashlib.sha256(kind.encode())
  for name in ('sentencepiece.model', 'hf_tokenizer.json'):
    if (tokenizer_dir / name).exists():
      digest.update((tokenizer_dir / name).read_bytes())
  return digest.hexdigest()[:16]


def check_npy(path: pathlib.Path) -> None:
  """Refuses, in one line naming it, a missing .npy file or one whose bytes are fewer or more than its
  header's shape and dtype say (a copy cut short), before it is read or memory-mapped."""
  where = f'data.paths: {str(path)!r}'
  if not path.is_file():
    raise ConfigError(f'{where} is missing: tokenize again')
  with open(path, 'rb') as f:
    try:
      version = np.lib.format.read_magic(f)
      read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
      shape, _, dtype = read_header(f)
    except (ValueError, EOFError) as e:
      raise ConfigError(f'{where} is not a .npy file ({str(e).strip().splitlines()[0]}): tokenize again') from None
    expected = f.tell() + math.prod(shape) * dtype.itemsize
  actual = path.stat().st_size
  if actual != expected:
    what = 'truncated' if actual < expected else 'longer than its header says'
    raise ConfigError(f'{where} is {what}: {actual} bytes, expected {expected}; tokenize again')


class TokenizedSource:
  """A split's documents as int32 token arrays, by index (a Grain random-access source): the shards'
  tokens are memory-mapped, nothing is read until asked for. Each file's size is checked first."""

  def __init__(self, split_dir: pathlib.Path, num_shards: int):
    for i in range(num_shards):
      for path in shard_files(split_dir, i):
        check_npy(path)
    self._tokens = [np.load(shard_files(split_dir, i)[0], mmap_mode='r') for i in range(num_shards)]
    self._offsets = [np.load(shard_files(split_dir, i)[1]) for i in range(num_shards)]
    self._starts = list(np.cumsum([0] + [len(o) - 1 for o in self._offsets]))

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getitem__(self, index: int) -> np.ndarray:
    if not 0 <= index < len(self):
      raise IndexError(index)
    shard = bisect.bisect_right(self._starts, index) - 1
    offsets, row = self._offsets[shard], index - self._starts[shard]
    return np.asarray(self._tokens[shard][offsets[row]:offsets[row + 1]], np.int32)


def read_manifest(out: str) -> dict[str, Any]:
  """The manifest of a finished lm.tokenize output folder, else a one-line refusal."""
  folder = pathlib.Path(os.path.expanduser(out))
  if not (folder / MANIFEST).exists():
    why = ('was killed before it finished: rerun the same python -m lm.tokenize to complete it'
           if (folder / PLAN).exists() else 'is not a python -m lm.tokenize output (no manifest.json)')
    raise ConfigError(f"data.paths={out!r} {why}")
  manifest = json.loads((folder / MANIFEST).read_text())
  if manifest.get('format') != FORMAT:
    raise ConfigError(f'data.paths={out!r} holds token shards of format {manifest.get("format")}; '
                      f'this lm reads format {FORMAT}: tokenize again')
  return manifest


def check_run(manifest: dict[str, Any], d, room: int, out: str) -> None:
  """Refuses, in one line, a run whose tokenizer or vocabulary is not the one the shards hold, or that
  reads a split they lack (d: the data section; room: the ids the tokenizer may use)."""
  t = manifest['tokenizer']
  if d.tokenizer != t['kind']:
    raise ConfigError(f"data.tokenizer={d.tokenizer!r}, but data.paths={out!r} was tokenized with {t['kind']!r}")
  if t['kind'] == 'sentencepiece' and t['requested_vocab_size'] != room:
    raise ConfigError(f"data.paths={out!r} was tokenized for {t['requested_vocab_size']} token ids "
                      f"(model.vocab_size less reserved ids); this run has {room}: set model.vocab_size to match "
                      'or tokenize again')
  if t['vocab_size'] > room:
    raise ConfigError(f"data.paths={out!r} holds a vocabulary of {t['vocab_size']} ids; this run has room for {room}")
  for key in ('train_split', 'eval_split'):
    if getattr(d, key) not in manifest['splits']:
      raise ConfigError(f'data.{key}={getattr(d, key)!r} is not among the tokenized splits of {out!r} '
                        f'({", ".join(manifest["splits"])})')


def open_split(manifest: dict[str, Any], out: str, split: str) -> TokenizedSource:
  folder = pathlib.Path(os.path.expanduser(out)) / split
  return TokenizedSource(folder, len(manifest['splits'][split]['shards']))
