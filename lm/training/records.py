"""The train records: a step's metrics every train.log_every steps, with its time, throughput and MFU.
The loop makes them after each step, before any hook runs, so every hook sees the same records."""

from __future__ import annotations

import time

import jax
import ml_collections

from lm.parallel import sharding
from lm.training import metrics

Record = tuple[int, dict[str, float]]  # (step, {name: value}) without the 'train/' prefix.


class TrainRecords:
  """Fetches a log step's metrics one step late, so the device never waits for the host; at once when
  the step is waited for anyway (`flush`: a due hook waits for it), timed right then."""

  def __init__(self, config: ml_collections.ConfigDict, start_step: int, peak_flops: float, num_devices: int):
    self.config = config
    self.flops_per_second = peak_flops * num_devices  # The devices' peak: MFU's denominator.
    self.pending: tuple[int, dict[str, jax.Array]] | None = None
    self.mark = (time.perf_counter(), start_step)  # When the device had finished which step.

  def after_step(self, step: int, step_metrics: dict[str, jax.Array], last: bool, flush: bool) -> list[Record]:
    """The records complete after this step: the pending one, and this step's if flush."""
    records = []
    if self.pending:  # Fetched one step late, when the device has long finished it: no stall.
      records.append(self._record(*self.pending))
      self.pending = None
    if step % self.config.train.log_every == 0 or last:
      for value in jax.tree.leaves(step_metrics):
        value.copy_to_host_async()
      self.pending = (step, step_metrics)
    if self.pending and flush:  # The hooks wait for the step anyway: record it first, timed right.
      records.append(self._record(*self.pending))
      self.pending = None
    return records

  def restart_clock(self, step: int) -> None:
    """Keeps the time since the last mark (eval, saving, a hook that waits) out of the step times."""
    self.mark = (time.perf_counter(), step)

  def _record(self, step: int, step_metrics: dict[str, jax.Array]) -> Record:
    """A log step's metrics, timed from the last mark to when they reached the host: as the host runs
    ahead of the device, their arrival marks when the device finished the step."""
    c = self.config
    values = {k: float(v) for k, v in sharding.to_host(step_metrics).items()}
    now = time.perf_counter()
    values['step_seconds'] = (now - self.mark[0]) / (step - self.mark[1])
    tokens = c.data.batch_size * metrics.tokens_per_example(c.model, c.data)
    values['tokens_per_second'] = tokens / values['step_seconds']
    # Model FLOPs utilisation: the share of the devices' peak the model's FLOPs use.
    values['mfu'] = metrics.flops_per_token(c.model, c.data) * values['tokens_per_second'] / self.flops_per_second
    self.mark = (now, step)
    return step, values
