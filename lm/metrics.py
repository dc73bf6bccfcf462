"""Where numbers go: metrics.jsonl and TensorBoard in the workdir (process 0 only)."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import jax
import numpy as np
import tqdm

from lm.config import target_len
from lm.layers import mlp_width
from lm.model import is_moe_layer


def say(message: str) -> None:
  """Prints a line to the console (process 0 only) without breaking the progress bar."""
  if jax.process_index() == 0:
    tqdm.tqdm.write(message)


def tokens_per_example(config) -> int:
  """Tokens one row of a training batch holds: seq_len, plus the decoder's for an encoder-decoder."""
  if config.model.kind == 'encoder_decoder':
    return config.data.seq_len + target_len(config)
  return config.data.seq_len


def flops_per_example(config) -> float:
  """Training FLOPs (forward + backward, matmuls only) for one row of a batch.

  Every weight matrix costs 6 FLOPs per token passing through it (2 forward, 4 backward): all but
  the position table and the input embedding, whose lookup is free; the output layer counts, tied
  or not. A mixture of experts counts its router and the top_k experts a token uses, not the
  capacity slack. Attention adds 12 * d_model FLOPs per (query, key) pair it scores (Q K^T and the
  weighted sum of V, forward and backward), counting every pair of the L x L square: the causal
  mask and a sliding window are not subtracted, because the dense kernel computes them too.
  """
  m = config.model
  head = m.d_model // m.num_heads
  q_out = 2 * m.d_model * head * m.num_heads
  kv = 2 * m.d_model * head * (m.num_kv_heads or m.num_heads)
  dense = (3 if m.mlp == 'swiglu' else 2) * m.d_model * mlp_width(m)
  moe = m.moe_top_k * dense + m.d_model * m.moe_experts

  def mlps(layers):  # Summed MLP weights a token passes through in `layers` blocks.
    moe_layers = sum(is_moe_layer(m, i) for i in range(layers))
    return moe_layers * moe + (layers - moe_layers) * dense

  def self_attending(layers, length):
    return 6 * length * (layers * (q_out + kv) + mlps(layers)) + 12 * layers * m.d_model * length**2

  if m.kind == 'decoder':
    length = config.data.seq_len
    return self_attending(m.num_layers, length) + 6 * length * m.vocab_size * m.d_model
  source, target = config.data.seq_len, target_len(config)
  cross = m.num_layers * (6 * target * q_out + 6 * source * kv + 12 * m.d_model * target * source)
  return (self_attending(m.num_encoder_layers or m.num_layers, source) + self_attending(m.num_layers, target)
          + cross + 6 * target * m.vocab_size * m.d_model)


def flops_per_token(config) -> float:
  """flops_per_example / tokens_per_example: for a decoder 6 * weights + 12 * layers * d_model * L."""
  return flops_per_example(config) / tokens_per_example(config)


# Peak dense bfloat16 FLOP/s per device, by jax device_kind (longest matching prefix wins).
PEAK_FLOPS = {
    'TPU v2': 45e12, 'TPU v3': 123e12, 'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12,
    'TPU v5p': 459e12, 'TPU v5': 459e12, 'TPU v6 lite': 918e12, 'TPU v6e': 918e12, 'TPU7x': 2307e12,
    'NVIDIA A100': 312e12, 'NVIDIA H100': 989e12, 'NVIDIA H200': 989e12, 'NVIDIA B200': 2250e12,
    'NVIDIA GH200': 989e12, 'NVIDIA L4': 121e12, 'NVIDIA A10': 125e12,
}


def peak_flops_per_device(config, device) -> float | None:
  """train.peak_flops_per_device, else the table's figure for the device kind; None if unknown (CPU)."""
  if config.train.peak_flops_per_device:
    return config.train.peak_flops_per_device
  kind = getattr(device, 'device_kind', '')
  matches = [name for name in PEAK_FLOPS if kind.startswith(name)]
  return PEAK_FLOPS[max(matches, key=len)] if matches else None


def measure_matmul_flops(device, dtype: str = 'float32', sizes: tuple[int, ...] | None = None,
                         repeats: int = 3) -> float:
  """The dense matmul rate of one device in FLOP/s: the fastest of `repeats` timed chains of [n, n] @ [n, n]
  products in `dtype`, over the sizes n (default 1024, 2048 and 4096 on CPU, 8192 on accelerators),
  each compiled and run once first."""
  import time  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  cpu = device.platform == 'cpu'
  chain = 1 if cpu else 16  # Enough work per call to hide the dispatch.
  best = 0.0
  for n in sizes or ((1024, 2048, 4096) if cpu else (8192,)):
    x = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype), device)
    w = jax.device_put(jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype) / math.sqrt(n), device)
    products = jax.jit(lambda x, w: jax.lax.fori_loop(0, chain, lambda _, y: jnp.dot(y, w), x))
    jax.block_until_ready(products(x, w))
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(products(x, w))
      best = max(best, chain * 2 * n**3 / (time.perf_counter() - start))
  return best


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
  """The records of a workdir's metrics.jsonl, less a last line cut short by a killed process."""
  text = (pathlib.Path(workdir) / 'metrics.jsonl').read_text()
  lines = text.splitlines()
  if lines and not text.endswith('\n'):
    try:
      json.loads(lines[-1])
    except json.JSONDecodeError:
      lines.pop()
  return [json.loads(line) for line in lines if line.strip()]
