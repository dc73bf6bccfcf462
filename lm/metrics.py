"""Where numbers go: metrics.jsonl and TensorBoard in the workdir (process 0 only)."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import jax
import numpy as np
import tqdm


def say(message: str) -> None:
  """Prints a line to the console (process 0 only) without breaking the progress bar."""
  if jax.process_index() == 0:
    tqdm.tqdm.write(message)


def flops_per_token(config) -> float:
  """Training FLOPs per token (forward + backward, matmuls only): 6 per weight a token passes
  through (every matrix but the position table and the input embedding, whose lookup is free; the
  output layer counts, tied or not) plus attention's scores and weighted sum, 12 * layers * d_model * seq_len (the causal
  mask is not subtracted: the dense form computes it all)."""
  m = config.model
  head = m.d_model // m.num_heads
  kv_heads = m.num_kv_heads or m.num_heads
  per_block = 2 * m.d_model * head * (m.num_heads + kv_heads) + (3 if m.mlp == 'swiglu' else 2) * m.d_model * m.mlp_dim
  weights = m.num_layers * per_block + m.vocab_size * m.d_model
  return 6.0 * weights + 12.0 * m.num_layers * m.d_model * config.data.seq_len


def eval_summary(loss_sum: float, token_count: float, byte_count: float) -> dict[str, float]:
  """Mean loss (nats per token), perplexity and bits per byte from summed eval statistics."""
  loss = loss_sum / max(token_count, 1.0)
  return {'loss': loss, 'perplexity': math.exp(min(loss, 700.0)),
          'bits_per_byte': loss_sum / (math.log(2) * max(byte_count, 1.0)), 'tokens': token_count}


class MetricWriter:
  """One JSON object per line ({'step': s, 'train/loss': ...}) plus TensorBoard scalars and text."""

  def __init__(self, workdir: pathlib.Path, start_step: int = 0):
    """Appends to the workdir's records, first dropping any after start_step (a resumed run
    recomputes those steps)."""
    self._enabled = jax.process_index() == 0
    if not self._enabled:
      return
    from tensorboardX import SummaryWriter  # Imports no TensorFlow.
    path = workdir / 'metrics.jsonl'
    if path.exists():
      kept = [r for r in read_metrics(workdir) if r['step'] <= start_step]
      tmp = path.with_suffix('.tmp')
      tmp.write_text(''.join(json.dumps(r) + '\n' for r in kept))
      tmp.rename(path)
    self._jsonl = open(path, 'a', encoding='utf-8')
    self._tensorboard = SummaryWriter(str(workdir / 'tensorboard'), purge_step=start_step + 1 if start_step else None)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self._enabled:
      return
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self._jsonl.flush()
    for key, value in scalars.items():
      self._tensorboard.add_scalar(key, value, step)

  def write_text(self, step: int, tag: str, text: str) -> None:
    if self._enabled:
      self._tensorboard.add_text(tag, text, step)

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._tensorboard.close()


def read_metrics(workdir: pathlib.Path | str) -> list[dict[str, float]]:
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
