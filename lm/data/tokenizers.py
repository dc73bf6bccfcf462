"""Tokenizers: raw UTF-8 bytes, SentencePiece trained on the train split and kept in the workdir, or
a Hugging Face `tokenizer.json` (e.g. GPT-2's byte-level BPE, brought in by `python -m lm.hf import`).

Both are lossless (decode(encode(text)) == text) and know how many bytes of text each token
stands for (`token_bytes`), which is what turns a loss in nats per token into bits per byte.
"""

from __future__ import annotations

import io
import json
import pathlib
import re
from typing import Iterable, Protocol

import numpy as np
import sentencepiece as spm

from lm.config import PAD_IDS, ConfigError

try:  # Optional: the `hf` extra, needed only for HuggingFaceTokenizer.
  import tokenizers as hf_tokenizers
except ImportError:
  hf_tokenizers = None


class Tokenizer(Protocol):
  vocab_size: int
  pad_id: int
  bos_id: int  # Starts every document; a packed sequence may hold several.
  eos_id: int  # Where generation stops: the end-of-text token (bos_id where one token does both).
  # Whether a text on its own (a prompt, a task's context) starts with bos_id: as transformers'
  # tokenizer(text) does for a Hugging Face tokenizer; always for lm's own (documents start so).
  adds_bos: bool
  token_bytes: np.ndarray  # [vocab_size] int32: UTF-8 bytes each id decodes to (0 for specials).

  def encode(self, text: str) -> np.ndarray: ...

  def decode(self, ids: Iterable[int]) -> str: ...


def prompt_ids(tokenizer: Tokenizer, text: str) -> np.ndarray:
  """int32 ids of a text generation or scoring starts from, as the tokenizer starts a text: with bos_id
  first where it adds_bos (lm's own tokenizers, whose documents start so; Llama's), else its tokens alone
  (GPT-2, Qwen), as transformers' tokenizer(text) gives. The one rule for every prompt lm reads."""
  ids = np.asarray(tokenizer.encode(text), np.int32)
  return np.concatenate([np.array([tokenizer.bos_id], np.int32), ids]) if tokenizer.adds_bos else ids


class ByteTokenizer:
  """Ids 0..255 are the bytes themselves; 256 pads and 257 starts a document."""

  vocab_size = 258
  pad_id = PAD_IDS['byte']
  bos_id = eos_id = 257
  adds_bos = True

  def __init__(self):
    self.token_bytes = np.array([1] * 256 + [0, 0], dtype=np.int32)

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode('utf-8'), dtype=np.uint8).astype(np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode('utf-8', errors='replace')


class SentencePieceTokenizer:
  """A SentencePiece model with identity normalisation, byte fallback and '\\n' as a piece."""
  adds_bos = True

  def __init__(self, model_proto: bytes):
    self.model_proto = model_proto
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id = self._sp.pad_id()
    self.bos_id = self.eos_id = self._sp.bos_id()
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


def _byte_alphabet() -> dict[str, int]:
  """Byte-level BPE (GPT-2) writes byte b as one printable character: itself if printable, else
  chr(256 + n) for the n-th unprintable byte. Returns character -> byte."""
  printable = [*range(ord('!'), ord('~') + 1), *range(ord('\xa1'), ord('\xac') + 1), *range(ord('\xae'), 256)]
  unprintable = [b for b in range(256) if b not in printable]
  return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(unprintable)}


END_TOKENS = ('<|endoftext|>', '</s>', '<|end_of_text|>', '<eos>')  # What may separate documents.


class HuggingFaceTokenizer:
  """A `tokenizers` tokenizer from its tokenizer.json, with its family's document boundaries: where
  its post-processor starts a text with a special token (Llama's <s> or <|begin_of_text|>), that is
  bos_id, so a document or prompt starts as transformers' tokenizer(text) does, and its end-of-text
  token is eos_id: `eos_token` where given (tokenizer_config.json's, as transformers reads it), else the
  first of END_TOKENS it has; where it adds nothing (GPT-2, Qwen), the end-of-text token separates
  documents as bos_id and eos_id both. The end-of-text token pads."""

  HF_FILE = 'hf_tokenizer.json'  # Its name in a workdir's tokenizer folder.

  def __init__(self, json_text: str, eos_token: str | None = None):
    if hf_tokenizers is None:
      raise ConfigError("a Hugging Face tokenizer needs the 'tokenizers' package: pip install -e '.[hf]'")
    self.json_text = json_text
    self._tok = hf_tokenizers.Tokenizer.from_str(json_text)
    self.vocab_size = self._tok.get_vocab_size()
    if eos_token is not None and self._tok.token_to_id(eos_token) is None:
      raise ConfigError(f'eos_token {eos_token!r} of tokenizer_config.json is not a token of tokenizer.json')
    ends = [eos_token] if eos_token is not None else [t for t in END_TOKENS if self._tok.token_to_id(t) is not None]
    if not ends:
      raise ConfigError(f'the tokenizer has none of the end-of-text tokens {", ".join(END_TOKENS)}')
    self.eos_id = self.pad_id = self._tok.token_to_id(ends[0])
    plain, templated = (self._tok.encode('a', add_special_tokens=add).ids for add in (False, True))
    prefix = templated[:templated.index(plain[0])] if plain and plain[0] in templated else []
    self.bos_id = prefix[0] if len(prefix) == 1 else self.eos_id
    self.adds_bos = len(prefix) == 1
    special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
    alphabet = _byte_alphabet()
    byte_level = '"ByteLevel"' in json.dumps(json.loads(json_text).get('decoder'))  # GPT-2's space is Ġ.
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self.token_bytes = np.zeros(self.vocab_size, np.int32)
    for piece, i in vocab.items():
      if piece in special or i >= self.vocab_size:
        continue
      if byte_level and all(ch in alphabet for ch in piece):
        self.token_bytes[i] = len(piece)
      elif not byte_level and re.fullmatch('<0x[0-9A-F]{2}>', piece):  # SentencePiece's byte fallback.
        self.token_bytes[i] = 1
      elif not byte_level:  # SentencePiece-derived (Llama 2, Mistral): U+2581 is a space.
        self.token_bytes[i] = len(piece.replace('\u2581', ' ').encode('utf-8'))
      else:
        self.token_bytes[i] = len(self._tok.decode([i], skip_special_tokens=False).encode('utf-8'))

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def token(self, i: int) -> str:
    return self._tok.id_to_token(i)

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size], skip_special_tokens=True)


def load(kind: str, tokenizer_dir: pathlib.Path) -> Tokenizer:
  """The tokenizer a run saved in its workdir's tokenizer folder."""
  if kind == 'byte':
    return ByteTokenizer()
  name = 'sentencepiece.model' if kind == 'sentencepiece' else HuggingFaceTokenizer.HF_FILE
  if not (tokenizer_dir / name).exists():
    raise ConfigError(f'no {kind} tokenizer in {str(tokenizer_dir)!r} (expected {name})')
  if kind == 'sentencepiece':
    return SentencePieceTokenizer((tokenizer_dir / name).read_bytes())
  info_path = tokenizer_dir / 'tokenizer.json'
  info = json.loads(info_path.read_text()) if info_path.exists() else {}
  return HuggingFaceTokenizer((tokenizer_dir / name).read_text(encoding='utf-8'), info.get('eos_token'))


def save(tokenizer: Tokenizer, tokenizer_dir: pathlib.Path, info: dict) -> None:
  """The tokenizer's file (if it has one) and `info` into tokenizer_dir, each written atomically."""
  files = {'tokenizer.json': json.dumps(info).encode()}
  if isinstance(tokenizer, SentencePieceTokenizer):
    files['sentencepiece.model'] = tokenizer.model_proto
  elif isinstance(tokenizer, HuggingFaceTokenizer):
    files[HuggingFaceTokenizer.HF_FILE] = tokenizer.json_text.encode('utf-8')
    files['tokenizer.json'] = json.dumps(info | {'eos_token': tokenizer.token(tokenizer.eos_id)}).encode()
  tokenizer_dir.mkdir(parents=True, exist_ok=True)
  for name, data in files.items():
    tmp = tokenizer_dir / f'{name}.tmp'
    tmp.write_bytes(data)
    tmp.rename(tokenizer_dir / name)


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


def train_byte_level_bpe(texts: Iterable[str], vocab_size: int):
  """A GPT-2-style byte-level BPE `tokenizers.Tokenizer` of vocab_size tokens: vocab_size - 1 learned
  from texts (the 256 byte symbols first), then <|endoftext|>. For models built in tests and benchmarks."""
  if hf_tokenizers is None:
    raise ConfigError("a Hugging Face tokenizer needs the 'tokenizers' package: pip install -e '.[hf]'")
  tokenizer = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
  tokenizer.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = hf_tokenizers.decoders.ByteLevel()
  trainer = hf_tokenizers.trainers.BpeTrainer(vocab_size=vocab_size - 1, special_tokens=[], show_progress=False,
                                              initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(texts, trainer)
  tokenizer.add_special_tokens(['<|endoftext|>'])
  return tokenizer


def same_train_data(saved: str, now: str) -> bool:
  """Whether a recorded 'dataset:train_split' names the data now read (records before the eval
  split could change on resume appended ':eval_split')."""
  return saved == now or saved.startswith(now + ':')


def load_or_train(kind: str, vocab_size: int, tokenizer_dir: pathlib.Path, train_texts: Iterable[str],
                  max_train_bytes: int, trained_on: str = '', copy_from: pathlib.Path | None = None) -> Tokenizer:
  """The byte tokenizer, or the sentencepiece model in tokenizer_dir.

  The saved model is reused when it was trained for the same vocab_size on the same data
  (`trained_on`); otherwise it is trained now and saved there. With copy_from (the tokenizer
  folder of the run a fine-tuning starts from), that run's tokenizer is used and saved here,
  whatever it was trained on: the only way to get a 'huggingface' one.
  """
  if kind == 'byte':
    return ByteTokenizer()
  if copy_from is not None:
    try:
      tokenizer = load(kind, copy_from)
    except ConfigError as e:
      raise ConfigError(f'checkpoint.init_from: {e}') from None
    info = json.loads((copy_from / 'tokenizer.json').read_text()) | {'copied_from': str(copy_from)}
  elif kind == 'huggingface':
    raise ConfigError("data.tokenizer='huggingface' takes the tokenizer of checkpoint.init_from (a workdir "
                      "made by python -m lm.hf import); set checkpoint.init_from")
  else:
    wanted = dict(kind=kind, requested_vocab_size=vocab_size, trained_on=trained_on)
    info_path = tokenizer_dir / 'tokenizer.json'
    saved = json.loads(info_path.read_text()) if info_path.exists() else {}
    if ((tokenizer_dir / 'sentencepiece.model').exists() and saved.get('kind') == kind
        and saved.get('requested_vocab_size') == vocab_size
        and same_train_data(saved.get('trained_on', ''), trained_on)):
      return load(kind, tokenizer_dir)
    tokenizer = train_sentencepiece(train_texts, vocab_size, max_train_bytes)
    info = wanted | {'vocab_size': tokenizer.vocab_size}
  save(tokenizer, tokenizer_dir, info)
  return tokenizer
