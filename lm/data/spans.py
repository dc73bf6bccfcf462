"""T5-style span corruption: mask random spans of a token window in the input, predict them in the target.

A window of `raw_len` tokens gets `num_noise` tokens masked in `num_spans` spans. The input keeps
the other tokens with each span replaced by one sentinel id; the target is each sentinel followed by
the tokens it replaced. Sentinel j is id vocab_size - 1 - j: the tokenizer is trained to leave the
top num_spans ids free. Counts are fixed per config, so inputs and targets need no padding.
"""

from __future__ import annotations

import numpy as np

from lm.config import span_lengths


def _segments(total: int, count: int, rng: np.random.Generator) -> np.ndarray:
  """`count` random positive lengths summing to `total`."""
  cuts = np.sort(rng.choice(np.arange(1, total), size=count - 1, replace=False)) if count > 1 else np.array([], int)
  return np.diff(np.concatenate([[0], cuts, [total]]))


def noise_mask(raw_len: int, num_noise: int, num_spans: int, rng: np.random.Generator) -> np.ndarray:
  """[raw_len] bool with num_noise True in num_spans runs, each run after at least one kept token."""
  noise = _segments(num_noise, num_spans, rng)
  kept = _segments(raw_len - num_noise, num_spans, rng)
  mask = np.zeros(raw_len, bool)
  start = 0
  for k, n in zip(kept, noise):
    start += k
    mask[start:start + n] = True
    start += n
  return mask


def corrupt(tokens: np.ndarray, mask: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(input, target) of a window with masked positions `mask`."""
  starts = mask & ~np.concatenate([[False], mask[:-1]])  # First token of each span.
  sentinels = vocab_size - np.cumsum(starts)  # vocab_size - 1 for the first span, then down.
  inputs = np.where(starts, sentinels, tokens)[~mask | starts]
  target_mask = mask | np.concatenate([mask[1:], [False]]) & ~mask  # Spans, and the kept token before each.
  target = np.where(mask, tokens, sentinels - 1)[target_mask]  # The token before a span carries its sentinel.
  return inputs.astype(np.int32), target.astype(np.int32)


class SpanCorruption:
  """Grain random map: {'tokens': [raw_len]} -> {'inputs': [seq_len], 'tokens': [target_len + 1],
  'loss_mask': [target_len]}; the decoder reads `start_id` then the target."""

  def __init__(self, seq_len: int, noise_density: float, mean_span_length: float, vocab_size: int,
               start_id: int, pad_id: int):
    self.seq_len, self.vocab_size, self.start_id, self.pad_id = seq_len, vocab_size, start_id, pad_id
    self.raw_len, self.num_noise, self.num_spans, self.target_len = span_lengths(seq_len, noise_density,
                                                                                 mean_span_length)

  def __call__(self, example: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    tokens = example['tokens'][:self.raw_len]
    mask = noise_mask(self.raw_len, self.num_noise, self.num_spans, rng)
    inputs, target = corrupt(tokens, mask, self.vocab_size)
    inputs = np.pad(inputs, (0, self.seq_len - len(inputs)), constant_values=self.pad_id)
    out = {'inputs': inputs, 'tokens': np.concatenate([[self.start_id], target]).astype(np.int32),
           'loss_mask': np.ones(self.target_len, bool)}
    if 'segment_ids' in example:
      out |= corrupt_segments(example['segment_ids'][:self.raw_len], mask, self.seq_len)
    return out


def corrupt_segments(segments: np.ndarray, mask: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
  """The document of each input and target token of `corrupt` (a sentinel: that of its span's first
  token), and the loss mask that drops each target beginning a document the one before is not in."""
  starts = mask & ~np.concatenate([[False], mask[:-1]])
  inputs = segments[~mask | starts]
  target_mask = mask | np.concatenate([mask[1:], [False]]) & ~mask
  target = np.where(mask, segments, np.concatenate([segments[1:], [0]]))[target_mask]
  tokens = np.concatenate([target[:1], target]).astype(np.int32)  # The start token joins the first document.
  return {'input_segment_ids': np.pad(inputs, (0, seq_len - len(inputs))).astype(np.int32),
          'segment_ids': tokens, 'loss_mask': tokens[1:] == tokens[:-1]}
