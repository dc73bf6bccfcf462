"""Where numbers go: metrics.jsonl and TensorBoard in the workdir, and Weights & Biases where
train.wandb_project says (process 0 only)."""

from __future__ import annotations

import html
import importlib
import json
import math
import os
import pathlib
import sys
import time
from typing import Any
import uuid

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from lm import kinds
from lm.config import ConfigError, flatten
from lm.training.workdirs import read_metrics


def _summary_writer_class() -> type:
  """tensorboardX's SummaryWriter (which imports no TensorFlow), imported so that it does not import
  PyTorch either where PyTorch is installed but not yet loaded: it would only check whether values
  are torch tensors (ours are floats), and the import costs ~3 s at the start of every run."""
  if 'torch' in sys.modules:
    from tensorboardX import SummaryWriter  # noqa: PLC0415
    return SummaryWriter
  sys.modules['torch'] = None  # An import of torch now raises ImportError; tensorboardX allows that.
  try:
    from tensorboardX import SummaryWriter  # noqa: PLC0415
  finally:
    del sys.modules['torch']
  return SummaryWriter


SummaryWriter = _summary_writer_class()


def say(message: str) -> None:
  """Prints a line to the console (process 0 only) without breaking the progress bar."""
  if jax.process_index() == 0:
    tqdm.tqdm.write(message)


def tokens_per_example(m, d) -> int:
  """Tokens one row of a training batch holds (`m`, `d`: a config's model and data sections): seq_len,
  plus the decoder's for an encoder-decoder."""
  return kinds.of(m).tokens_per_example(d)


def flops_per_example(m, d) -> float:
  """Training FLOPs (forward + backward, matmuls only) for one row of a batch, as its kind counts them.

  Every weight matrix costs 6 FLOPs per token passing through it (2 forward, 4 backward): all but
  the position table and the input embedding, whose lookup is free; the output layer counts, tied
  or not. A mixture of experts counts its router and the top_k experts a token uses, not the
  capacity slack. Attention adds 12 * d_model FLOPs per (query, key) pair it scores (Q K^T and the
  weighted sum of V, forward and backward), counting every pair of the L x L square: the causal
  mask and a sliding window are not subtracted, because the dense kernel computes them too.
  """
  return kinds.of(m).flops_per_example(m, d)


def flops_per_token(m, d) -> float:
  """flops_per_example / tokens_per_example: for a decoder 6 * weights + 12 * layers * d_model * L."""
  return flops_per_example(m, d) / tokens_per_example(m, d)


# Peak dense bfloat16 FLOP/s per device, by jax device_kind (longest matching prefix wins).
PEAK_FLOPS = {
    'TPU v2': 45e12, 'TPU v3': 123e12, 'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12,
    'TPU v5p': 459e12, 'TPU v5': 459e12, 'TPU v6 lite': 918e12, 'TPU v6e': 918e12, 'TPU7x': 2307e12,
    'NVIDIA A100': 312e12, 'NVIDIA H100': 989e12, 'NVIDIA H200': 989e12, 'NVIDIA B200': 2250e12,
    'NVIDIA GH200': 989e12, 'NVIDIA L4': 121e12, 'NVIDIA A10': 125e12,
}


def peak_flops_per_device(device, configured: float = 0.0) -> float | None:
  """`configured` (train.peak_flops_per_device) if set, else the table's figure for the device kind;
  None if unknown (CPU)."""
  if configured:
    return configured
  kind = getattr(device, 'device_kind', '')
  matches = [name for name in PEAK_FLOPS if kind.startswith(name)]
  return PEAK_FLOPS[max(matches, key=len)] if matches else None


def measure_matmul_flops(device, dtype: str = 'float32', sizes: tuple[int, ...] | None = None,
                         repeats: int = 3) -> float:
  """The dense matmul rate of one device in FLOP/s: the fastest of `repeats` timed chains of [n, n] @ [n, n]
  products in `dtype`, over the sizes n (default 1024, 2048 and 4096 on CPU, 8192 on accelerators),
  each compiled and run once first."""
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


def cache_dir() -> pathlib.Path:
  """Where lm keeps what it measures once per machine: $LM_CACHE_DIR, else ~/.cache/lm."""
  return pathlib.Path(os.environ.get('LM_CACHE_DIR') or pathlib.Path.home() / '.cache' / 'lm')


def cached_matmul_flops(device, dtype: str = 'float32') -> float:
  """measure_matmul_flops at n = 1024, measured once per machine (device kind, cores, dtype, jaxlib and
  XLA_FLAGS) and kept in cache_dir()/matmul_flops.json: the MFU denominator of CPU runs."""
  key = (f'{device.platform}:{device.device_kind}:{os.cpu_count()} cores:{dtype}:jaxlib {jax.lib.__version__}:'
         f'{os.environ.get("XLA_FLAGS", "")}')
  path = cache_dir() / 'matmul_flops.json'
  try:
    cached = json.loads(path.read_text())
  except (OSError, ValueError):
    cached = {}
  if not isinstance(cached, dict) or not isinstance(cached.get(key), float):
    cached = cached if isinstance(cached, dict) else {}
    cached[key] = measure_matmul_flops(device, dtype, sizes=(1024,))
    try:  # Atomically, as several processes may measure at once; a read-only home just measures every run.
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.with_name(f'{path.name}.{os.getpid()}.tmp')
      tmp.write_text(json.dumps(cached, indent=1))
      os.replace(tmp, path)
    except OSError:
      pass
  return cached[key]


def peak_flops(device, dtype: str, configured: float = 0.0) -> float:
  """The MFU denominator: peak_flops_per_device, else (CPUs) the cached measured matmul rate in dtype."""
  return peak_flops_per_device(device, configured) or cached_matmul_flops(device, dtype)


def eval_summary(loss_sum: float, token_count: float, byte_count: float) -> dict[str, float]:
  """Mean loss (nats per token), perplexity and bits per byte from summed eval statistics."""
  loss = loss_sum / max(token_count, 1.0)
  return {'loss': loss, 'perplexity': math.exp(min(loss, 700.0)),
          'bits_per_byte': loss_sum / (math.log(2) * max(byte_count, 1.0)), 'tokens': token_count}


def wandb_module():
  """The wandb package, or a ConfigError saying how to install it."""
  try:
    return importlib.import_module('wandb')  # Imported only for runs that log to it (it takes seconds).
  except ImportError:
    raise ConfigError("train.wandb_project needs the wandb package: pip install -e '.[wandb]'") from None


class WandbWriter:
  """A run's config, scalars and samples on Weights & Biases: one W&B run per workdir, its id kept in
  the workdir (wandb_id), so a resumed run continues it. WANDB_MODE=offline writes it under
  workdir/wandb/ only (`wandb sync` uploads it later)."""

  def __init__(self, workdir: pathlib.Path, config):
    self._wandb = wandb_module()
    id_path = workdir / 'wandb_id'
    run_id = id_path.read_text().strip() if id_path.exists() else uuid.uuid4().hex[:8]
    id_path.write_text(run_id + '\n')
    t = config.train
    self.run = self._wandb.init(project=t.wandb_project, entity=t.wandb_entity or None,
                                name=t.wandb_run_name or workdir.resolve().name, id=run_id, resume='allow',
                                dir=str(workdir), config=flatten(config))

  def write(self, step: int, scalars: dict[str, float]) -> None:
    self.run.log(scalars, step=step)

  def write_text(self, step: int, tag: str, text: str) -> None:
    self.run.log({tag: self._wandb.Html(f'<pre>{html.escape(text)}</pre>')}, step=step)

  def close(self) -> None:
    self.run.finish()


class MetricWriter:
  """One JSON object per line ({'step': s, 'train/loss': ...}) plus TensorBoard scalars and text, and
  the same on Weights & Biases when the config names a train.wandb_project."""

  def __init__(self, workdir: pathlib.Path, start_step: int = 0, config=None):
    """Appends to the workdir's records, first dropping any after start_step (a resumed run
    recomputes those steps)."""
    self._enabled = jax.process_index() == 0
    if not self._enabled:
      return
    path = workdir / 'metrics.jsonl'
    if path.exists():
      kept = [r for r in read_metrics(workdir) if r['step'] <= start_step]
      tmp = path.with_suffix('.tmp')
      tmp.write_text(''.join(json.dumps(r) + '\n' for r in kept))
      tmp.rename(path)
    self._jsonl = open(path, 'a', encoding='utf-8')
    self._tensorboard = SummaryWriter(str(workdir / 'tensorboard'), purge_step=start_step + 1 if start_step else None)
    self._wandb = WandbWriter(workdir, config) if config is not None and config.train.wandb_project else None

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self._enabled:
      return
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({'step': step, **scalars}) + '\n')
    self._jsonl.flush()
    for key, value in scalars.items():
      self._tensorboard.add_scalar(key, value, step)
    if self._wandb:
      self._wandb.write(step, scalars)

  def write_text(self, step: int, tag: str, text: str) -> None:
    if self._enabled:
      self._tensorboard.add_text(tag, text, step)
      if self._wandb:
        self._wandb.write_text(step, tag, text)

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._tensorboard.close()
      if self._wandb:
        self._wandb.close()
