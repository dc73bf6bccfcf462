"""Packing documents into fixed-length training windows, as a checkpointable Grain IterDataset."""

from __future__ import annotations

import collections
import copy
from typing import Any

import grain
import numpy as np


class PackIterDataset(grain.IterDataset):
  """Token arrays (one per document) -> {'tokens': [seq_len + 1], 'loss_mask': [seq_len]}.

  Documents are concatenated into one stream and cut into windows of seq_len + 1 tokens, each
  window starting on the last token of the one before: the model reads tokens[:-1] and predicts
  tokens[1:], so every token of the stream after the first is a target exactly once and none is
  dropped. With `pad_final` the tail of a finite stream is emitted as a last window padded with
  `pad_id` (loss_mask False on the padding); without it the tail is dropped.

  With `segment_ids` each window also carries 'segment_ids' [seq_len + 1] int32: 1 for the tokens of
  its first document, 2 for the next, ..., 0 for padding; and loss_mask is False where a target
  begins a document (it is not predicted from the one before).
  """

  def __init__(self, parent: grain.IterDataset, *, seq_len: int, pad_id: int, pad_final: bool,
               segment_ids: bool = False):
    super().__init__(parent)
    self._seq_len, self._pad_id, self._pad_final, self._segment_ids = seq_len, pad_id, pad_final, segment_ids

  def __iter__(self) -> grain.DatasetIterator:
    return _PackIterator(self._parent.__iter__(), self._seq_len, self._pad_id, self._pad_final, self._segment_ids)

  def __str__(self) -> str:
    return f'PackIterDataset(seq_len={self._seq_len})'


class _PackIterator(grain.DatasetIterator):
  """Keeps the documents that overlap the unread part of the stream, with the parent state from
  before each; its checkpoint is (parent state before the first of them, offset into it), so a
  restore re-reads those documents instead of storing tokens."""

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int, pad_final: bool,
               segment_ids: bool = False):
    super().__init__(parent)
    self._seq_len, self._pad_id, self._pad_final, self._segment_ids = seq_len, pad_id, pad_final, segment_ids
    self._segments: collections.deque[tuple[Any, np.ndarray]] = collections.deque()
    self._offset = 0  # Tokens of the first segment already behind us.
    self._done = False

  def _buffered(self) -> int:
    return sum(len(tokens) for _, tokens in self._segments) - self._offset

  def _read_document(self) -> bool:
    state = self._parent.get_state()
    try:
      tokens = next(self._parent)
    except StopIteration:
      return False
    if len(tokens):
      self._segments.append((state, np.asarray(tokens, dtype=np.int32)))
    return True

  def __next__(self) -> dict[str, np.ndarray]:
    window = self._seq_len + 1
    while not self._done and self._buffered() < window and self._read_document():
      pass
    available = self._buffered()
    if self._done or available < window and not (self._pad_final and available >= 2):
      self._done = True
      raise StopIteration
    pieces, need, start = [], window, self._offset
    for _, tokens in self._segments:
      pieces.append(tokens[start:start + need])
      need -= len(pieces[-1])
      start = 0
      if not need:
        break
    stream = np.concatenate(pieces)
    loss_mask = np.ones(self._seq_len, dtype=bool)
    if len(stream) < window:  # The padded tail of a finite stream.
      loss_mask[len(stream) - 1:] = False
      stream = np.pad(stream, (0, window - len(stream)), constant_values=self._pad_id)
      self._done = True
    self._advance(self._seq_len)
    if not self._segment_ids:
      return {'tokens': stream, 'loss_mask': loss_mask}
    segments = np.repeat(np.arange(1, len(pieces) + 1, dtype=np.int32), [len(p) for p in pieces])
    segments = np.pad(segments, (0, window - len(segments)))
    return {'tokens': stream, 'loss_mask': loss_mask & (segments[1:] == segments[:-1]), 'segment_ids': segments}

  def _advance(self, count: int) -> None:
    while self._segments and count:
      left = len(self._segments[0][1]) - self._offset
      if left > count:
        self._offset += count
        return
      count -= left
      self._segments.popleft()
      self._offset = 0

  def get_state(self) -> dict[str, Any]:
    first = self._segments[0][0] if self._segments else self._parent.get_state()
    return {'parent': copy.deepcopy(first), 'offset': self._offset, 'done': self._done}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(copy.deepcopy(state['parent']))
    self._segments.clear()
    self._offset, self._done = 0, state['done']
    if state['offset']:
      self._read_document()
      self._offset = state['offset']
