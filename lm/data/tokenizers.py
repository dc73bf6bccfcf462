"""Tokenizers: raw UTF-8 bytes, or SentencePiece trained on the train split and kept in the workdir.

Both are lossless (decode(encode(text)) == text) and know how many bytes of text each token
stands for (`token_bytes`), which is what turns a loss in nats per token into bits per byte.
"""

from __future__ import annotations

import io
import json
import pathlib
from typing import Iterable, Protocol

import numpy as np
import sentencepiece as spm

from lm.config import PAD_IDS, ConfigError


class Tokenizer(Protocol):
  vocab_size: int
  pad_id: int
  bos_id: int  # Starts every document; a packed sequence may hold several.
  token_bytes: np.ndarray  # [vocab_size] int32: UTF-8 bytes each id decodes to (0 for specials).

  def encode(self, text: str) -> np.ndarray: ...

  def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
  """Ids 0..255 are the bytes themselves; 256 pads and 257 starts a document."""

  vocab_size = 258
  pad_id = PAD_IDS['byte']
  bos_id = 257

  def __init__(self):
    self.token_bytes = np.array([1] * 256 + [0, 0], dtype=np.int32)

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode('utf-8', errors='replace')


class SentencePieceTokenizer:
  """A SentencePiece model with identity normalisation, byte fallback and '\\n' as a piece."""

  def __init__(self, model_proto: bytes):
    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id = self._sp.pad_id()
    self.bos_id = self._sp.bos_id()
    self.token_bytes = np.array([self._piece_bytes(i) for i in range(self.vocab_size)], dtype=np.int32)

  def _piece_bytes(self, i: int) -> int:
    sp = self._sp
    if sp.is_control(i) or sp.is_unknown(i):
      return 0
    if sp.is_byte(i):
      return 1
    return len(sp.id_to_piece(i).replace('\u2581', ' ').encode('utf-8'))

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])


def _training_sentences(texts: Iterable[str], max_bytes: int, max_chars: int = 4096):
  """Paragraphs (with their newlines) of at most max_chars, up to max_bytes in all."""
  seen = 0
  for text in texts:
    for para in text.split('\n\n'):
      para += '\n\n'
      for start in range(0, len(para), max_chars):
        piece = para[start:start + max_chars]
        seen += len(piece.encode('utf-8'))
        yield piece
        if seen >= max_bytes:
          return


def train_sentencepiece(texts: Iterable[str], vocab_size: int, max_bytes: int) -> SentencePieceTokenizer:
  """BPE with at most vocab_size pieces; fewer if the text cannot fill them."""
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_sentences(texts, max_bytes), model_writer=model,
        vocab_size=vocab_size, hard_vocab_limit=False, model_type='bpe', character_coverage=1.0,
        byte_fallback=True, normalization_rule_name='identity', remove_extra_whitespaces=False,
        add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
        user_defined_symbols=['\n'], pad_id=PAD_IDS['sentencepiece'], unk_id=1, bos_id=2, eos_id=-1,
        max_sentence_length=1 << 16, num_threads=2, minloglevel=2)
  except RuntimeError as e:
    raise ConfigError(f'sentencepiece training failed for model.vocab_size={vocab_size}: '
                      f'{str(e).strip().splitlines()[-1]}') from None
  return SentencePieceTokenizer(model.getvalue())


def load_or_train(kind: str, vocab_size: int, tokenizer_dir: pathlib.Path, train_texts: Iterable[str],
                  max_train_bytes: int, trained_on: str = '', copy_from: pathlib.Path | None = None) -> Tokenizer:
  """The byte tokenizer, or the sentencepiece model in tokenizer_dir.

  The saved model is reused when it was trained for the same vocab_size on the same data
  (`trained_on`); otherwise it is trained now and saved there. With copy_from (the tokenizer
  folder of the run a fine-tuning starts from), that model is used and saved here, whatever it was
  trained on.
  """
  if kind == 'byte':
    return ByteTokenizer()
  model_path, info_path = tokenizer_dir / 'sentencepiece.model', tokenizer_dir / 'tokenizer.json'
  if copy_from is not None:
    if not (copy_from / 'sentencepiece.model').exists():
      raise ConfigError(f'checkpoint.init_from: no sentencepiece tokenizer in {str(copy_from)!r}')
    tokenizer = SentencePieceTokenizer((copy_from / 'sentencepiece.model').read_bytes())
    info = json.loads((copy_from / 'tokenizer.json').read_text()) | {'copied_from': str(copy_from)}
  else:
    wanted = dict(kind=kind, requested_vocab_size=vocab_size, trained_on=trained_on)
    saved = json.loads(info_path.read_text()) if info_path.exists() else {}
    if model_path.exists() and all(saved.get(k) == v for k, v in wanted.items()):
      return SentencePieceTokenizer(model_path.read_bytes())
    tokenizer = train_sentencepiece(train_texts, vocab_size, max_train_bytes)
    info = wanted | {'vocab_size': tokenizer.vocab_size}
  tokenizer_dir.mkdir(parents=True, exist_ok=True)
  for path, data in ((model_path, tokenizer.model_proto), (info_path, json.dumps(info).encode())):
    tmp = path.with_suffix('.tmp')
    tmp.write_bytes(data)
    tmp.rename(path)
  return tokenizer
