"""Periodic work of the training loop as hooks: logging, progress, the non-finite guard, checkpoints,
evaluation with samples, downstream tasks through lm-evaluation-harness, and any a user adds with
`Trainer.add_hook(fn, every=N)`.

After each step the Trainer asks every hook in its list whether it is due, then runs the due ones in
list order. A hook that `waits` reads what the device computed, so the step has to finish first; the
time it takes is kept out of the step times the log reports.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any, Callable

import jax
import tqdm

from lm.inference.run import SavedRun
from lm.parallel import sharding
from lm.training import metrics

if TYPE_CHECKING:  # The Trainer runs the hooks; they only read and write its state.
  from lm.training.loop import Trainer


class NonFiniteError(RuntimeError):
  """Training diverged: more than train.max_nonfinite_steps consecutive non-finite steps."""


@dataclasses.dataclass
class StepInfo:
  """What the hooks see after a step. `records` is filled by the log hook as it logs steps."""
  step: int
  metrics: dict[str, jax.Array]  # This step's metrics, still on the device.
  final: bool  # The step is train.steps: training ends here.
  last: bool  # The last step of this run (train.steps or --stop_after).
  stop: str | None  # The signal that stops the run after this step, as all processes agree.
  checkpoint_overdue: bool  # checkpoint.every_minutes has passed since the last save.
  saving: bool = False  # A checkpoint is written at this step (set before any hook runs) ...
  flush: bool = False  # ... or some due hook waits for the step: the log hook logs it at once.
  records: list[tuple[int, dict[str, float]]] = dataclasses.field(default_factory=list)  # (step, values) logged now.


class Hook:
  """One kind of periodic work. Subclasses say when they are due and what they do."""
  waits = True

  def due(self, trainer: Trainer, info: StepInfo) -> bool:
    raise NotImplementedError

  def __call__(self, trainer: Trainer, info: StepInfo) -> None:
    raise NotImplementedError

  def close(self, trainer: Trainer) -> None:
    """At the end of the run, however it ends."""


class Every(Hook):
  """A user's function, run as fn(trainer, info) every `every` steps (and at the run's last step if at_end)."""

  def __init__(self, fn: Callable[[Trainer, StepInfo], Any], every: int, at_end: bool = False, waits: bool = True):
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
      raise ValueError(f'add_hook: every={every!r} must be an integer >= 1')
    self.fn, self.every, self.at_end, self.waits = fn, every, at_end, waits

  def due(self, trainer, info):
    return info.step % self.every == 0 or (self.at_end and info.last)

  def __call__(self, trainer, info):
    self.fn(trainer, info)


class Log(Hook):
  """Train records every train.log_every steps, fetched one step late so the device never waits for
  the host; logged at once when a hook that waits for the step runs anyway (timed right then)."""
  waits = False

  def __init__(self, trainer: Trainer):
    self.pending: tuple[int, dict[str, jax.Array]] | None = None
    self.mark = (time.perf_counter(), trainer.start_step)  # When the device had finished which step.

  def due(self, trainer, info):
    return True

  def __call__(self, trainer, info):
    if self.pending:  # Fetched one step late, when the device has long finished it: no stall.
      info.records.append(self._write(trainer, *self.pending))
      self.pending = None
    if info.step % trainer.config.train.log_every == 0 or info.last:
      for value in jax.tree.leaves(info.metrics):
        value.copy_to_host_async()
      self.pending = (info.step, info.metrics)
    if self.pending and info.flush:  # Those wait for the step anyway: log it first, timed right.
      info.records.append(self._write(trainer, *self.pending))
      self.pending = None

  def restart_clock(self, step: int) -> None:
    """Keeps the time since the last mark (eval, saving, a user's hook) out of the step times."""
    self.mark = (time.perf_counter(), step)

  def _write(self, trainer: Trainer, step: int, step_metrics: dict[str, jax.Array]) -> tuple[int, dict[str, float]]:
    """Records a log step's metrics, timed from the last mark to when they reached the host.

    As the host runs ahead of the device, their arrival marks when the device finished the step.
    """
    c = trainer.config
    values = {k: float(v) for k, v in sharding.to_host(step_metrics).items()}
    streak = values.pop('nonfinite_streak')
    now = time.perf_counter()
    values['step_seconds'] = (now - self.mark[0]) / (step - self.mark[1])
    tokens = c.data.batch_size * metrics.tokens_per_example(c.model, c.data)
    values['tokens_per_second'] = tokens / values['step_seconds']
    # Model FLOPs utilisation: the share of the devices' peak the model's FLOPs use.
    values['mfu'] = (metrics.flops_per_token(c.model, c.data) * values['tokens_per_second']
                     / (trainer.peak_flops * trainer.mesh.size))
    trainer.writer.write(step, {f'train/{k}': v for k, v in values.items()} | trainer.realised_mixture())
    self.mark = (now, step)
    return step, values | {'nonfinite_streak': streak}


class Progress(Hook):
  """The progress bar: loss, tokens per second, step time and MFU of each train record (process 0)."""
  waits = False

  def __init__(self, trainer: Trainer):
    self.bar = tqdm.tqdm(total=trainer.config.train.steps, initial=trainer.start_step, desc='train', unit='step',
                         dynamic_ncols=True, disable=jax.process_index() != 0, mininterval=1.0)

  def due(self, trainer, info):
    return bool(info.records)

  def __call__(self, trainer, info):
    step, values = info.records[-1]
    self.bar.update(step - self.bar.n)
    self.bar.set_postfix(loss=f'{values["loss"]:.3f}', tok_s=f'{values["tokens_per_second"]:,.0f}',
                         step_ms=f'{1e3 * values["step_seconds"]:.0f}', mfu=f'{100 * values["mfu"]:.0f}%',
                         refresh=False)

  def close(self, trainer):
    self.bar.close()


class NonFiniteGuard(Hook):
  """Stops the run when more than train.max_nonfinite_steps steps in a row were not finite (seen in the
  train records), and before a checkpoint of a state that holds NaN or Inf."""
  waits = False

  def due(self, trainer, info):
    return bool(info.records) or info.saving

  def __call__(self, trainer, info):
    for step, values in info.records:  # After the record: the run's last one shows the divergence.
      self._check_streak(trainer, step, int(values['nonfinite_streak']))
    if info.saving:  # Waits for the step.
      self._check_streak(trainer, info.step, int(sharding.to_host(trainer.state.nonfinite_streak)))
      if not trainer.state_is_finite():
        raise NonFiniteError(f'the train state at step {info.step} holds NaN or Inf values: not checkpointed')

  @staticmethod
  def _check_streak(trainer: Trainer, step: int, streak: int) -> None:
    limit = trainer.config.train.max_nonfinite_steps
    if streak > limit:
      last = trainer.checkpointer.latest_step()
      kept = f'the last checkpoint (step {last}) is kept' if last is not None else 'no checkpoint was written'
      raise NonFiniteError(
          f'training diverged: the loss, gradients or parameters were not finite at every step since step '
          f'{step - streak + 1} (more than train.max_nonfinite_steps={limit} in a row); stopped at step {step} '
          f'without saving; {kept}. Lower optimizer.learning_rate, lengthen optimizer.warmup_steps or set '
          'train.z_loss, then rerun to resume from that checkpoint')


class Checkpoint(Hook):
  """A checkpoint every checkpoint.every steps, when checkpoint.every_minutes have passed, at a stop
  and at the run's last step; written in the background."""
  waits = True

  def __init__(self):
    self.last_save = time.monotonic()

  def overdue(self, trainer: Trainer) -> bool:
    minutes = trainer.config.checkpoint.every_minutes
    return bool(minutes) and time.monotonic() - self.last_save >= 60 * minutes

  def due(self, trainer, info):
    return info.saving

  def __call__(self, trainer, info):
    trainer.checkpointer.save(info.step, trainer.state, trainer.train_iter)
    self.last_save = time.monotonic()


class Harness(Hook):
  """lm-evaluation-harness tasks (eval.harness_tasks) every eval.harness_every steps and when training
  ends, on the training devices and current parameters through lm.harness's own jitted functions (the
  train step is not recompiled); logs harness/TASK/METRIC and harness/seconds."""
  waits = True

  def __init__(self, harness, manager, tasks: list[str]):
    self.harness, self.manager, self.tasks = harness, manager, tasks  # harness: the lm.inference.harness module.

  def due(self, trainer, info):
    every = trainer.config.eval.harness_every
    return info.final or (bool(every) and info.step % every == 0 and not info.stop)

  def __call__(self, trainer, info):
    e = trainer.config.eval
    start = time.perf_counter()
    run = SavedRun(trainer.config, trainer.model, trainer.state.params, trainer.corpus.tokenizer, info.step,
                         trainer.mesh, trainer.workdir)
    model = self.harness.RunModel(run, batch_size=e.batch_size)
    results = self.harness.evaluate(model, self.tasks, limit=e.harness_limit or None, manager=self.manager,
                                    bootstrap_iters=0, check=False)
    scores = {f'harness/{k}': v for k, v in self.harness.flat_metrics(results).items()}
    trainer.writer.write(info.step, scores | {'harness/seconds': time.perf_counter() - start})
    metrics.say(f'step {info.step}: ' + '  '.join(f'{k[len("harness/"):]} {v:.4f}' for k, v in scores.items()))


class Evaluate(Hook):
  """Eval loss, perplexity and bits per byte, and samples, every eval.every steps (a stop skips it, to
  exit soon) and at train.steps (over eval.final_num_batches)."""
  waits = True

  def due(self, trainer, info):
    return info.final or (info.step % trainer.config.eval.every == 0 and not info.stop)

  def __call__(self, trainer, info):
    e = trainer.config.eval
    start = time.perf_counter()
    num_batches = e.final_num_batches if info.final else e.num_batches
    result = trainer.evaluate(num_batches)
    trainer.writer.write(info.step, {f'eval/{k}': v for k, v in result.items()}
                         | {'eval/seconds': time.perf_counter() - start})
    scope = f'{num_batches} batches' if num_batches else 'whole split'
    metrics.say(f'step {info.step}: eval loss {result["loss"]:.4f}  perplexity {result["perplexity"]:.2f}  '
                f'bits/byte {result["bits_per_byte"]:.4f}  ({scope}, {result["tokens"]:.0f} tokens)')
    trainer.last_eval = result
    texts = trainer.samples(info.step)
    if texts and jax.process_index() == 0:
      sample_dir = trainer.workdir / 'samples'
      sample_dir.mkdir(exist_ok=True)
      joined = '\n\n----------\n\n'.join(texts)
      (sample_dir / f'step_{info.step:07d}.txt').write_text(joined, encoding='utf-8')
      trainer.writer.write_text(info.step, 'samples', joined)
      metrics.say(f'--- sample at step {info.step} ---\n{texts[0]}\n---')
