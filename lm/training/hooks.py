"""Periodic work of the training loop as hooks: progress, the non-finite guard, checkpoints, evaluation
with samples, downstream tasks through lm-evaluation-harness, and any a user adds with
`Trainer.add_hook(fn, every=N)`.

The contract: after each step the loop makes the step's train records (`StepInfo.records`), then asks
every hook whether it is due and runs the due ones in list order. A hook reads the trainer only
through `TrainerView` and changes nothing on it; what it produces it returns, as {name: value} (a
number is logged as a metric at the step, a string as text), and the loop writes it. A hook that
`waits` reads what the device computed, so the step has to finish first; the time it takes is kept
out of the step times the records report.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import jax
import ml_collections
import tqdm

from lm.inference.run import SavedRun
from lm.parallel import sharding
from lm.training import metrics
from lm.training.checkpoint import Checkpointer
from lm.training.records import Record

Produced = Mapping[str, float | str] | None  # What a hook returns: metrics and texts to log at the step.


@runtime_checkable
class TrainerView(Protocol):
  """What hooks may read of the Trainer (tests/test_hooks.py checks the built-in ones read nothing else)."""
  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  mesh: jax.sharding.Mesh
  model: Any  # The flax module.
  state: Any  # The TrainState after the step.
  corpus: Any  # The data: its tokenizer, splits and dataset name.
  checkpointer: Checkpointer
  train_iter: Any  # The data iterator a checkpoint saves.
  start_step: int
  last_eval: dict[str, float]  # The last eval's results in this run ({} before the first).

  def evaluate(self, num_batches: int = 0) -> dict[str, float]: ...

  def samples(self, step: int) -> list[str]: ...

  def state_is_finite(self) -> bool: ...


class NonFiniteError(RuntimeError):
  """Training diverged: more than train.max_nonfinite_steps consecutive non-finite steps."""


@dataclasses.dataclass
class StepInfo:
  """What the hooks see after a step."""
  step: int
  metrics: dict[str, jax.Array]  # This step's metrics, still on the device.
  final: bool  # The step is train.steps: training ends here.
  last: bool  # The last step of this run (train.steps or --stop_after).
  stop: str | None  # The signal that stops the run after this step, as all processes agree.
  checkpoint_overdue: bool  # checkpoint.every_minutes has passed since the last save.
  saving: bool = False  # A checkpoint is written at this step (set before any hook runs) ...
  flush: bool = False  # ... or some due hook waits for the step: its record is made at once.
  records: list[Record] = dataclasses.field(default_factory=list)  # (step, values) the loop logs after this step.


class Hook:
  """One kind of periodic work. Subclasses say when they are due and what they do."""
  waits = True

  def due(self, trainer: TrainerView, info: StepInfo) -> bool:
    raise NotImplementedError

  def __call__(self, trainer: TrainerView, info: StepInfo) -> Produced:
    raise NotImplementedError

  def close(self, trainer: TrainerView) -> None:
    """At the end of the run, however it ends."""


class Every(Hook):
  """A user's function, run as fn(trainer, info) every `every` steps (and at the run's last step if at_end);
  what it returns ({name: value} or None) is logged at the step."""

  def __init__(self, fn: Callable[[TrainerView, StepInfo], Produced], every: int, at_end: bool = False,
               waits: bool = True):
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
      raise ValueError(f'add_hook: every={every!r} must be an integer >= 1')
    self.fn, self.every, self.at_end, self.waits = fn, every, at_end, waits

  def due(self, trainer, info):
    return info.step % self.every == 0 or (self.at_end and info.last)

  def __call__(self, trainer, info):
    return self.fn(trainer, info)


class Progress(Hook):
  """The progress bar: loss, tokens per second, step time and MFU of each train record (process 0)."""
  waits = False

  def __init__(self, trainer: TrainerView):
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
  def _check_streak(trainer: TrainerView, step: int, streak: int) -> None:
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

  def overdue(self, trainer: TrainerView) -> bool:
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
    metrics.say(f'step {info.step}: ' + '  '.join(f'{k[len("harness/"):]} {v:.4f}' for k, v in scores.items()))
    return scores | {'harness/seconds': time.perf_counter() - start}


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
    produced = {f'eval/{k}': v for k, v in result.items()} | {'eval/seconds': time.perf_counter() - start}
    scope = f'{num_batches} batches' if num_batches else 'whole split'
    metrics.say(f'step {info.step}: eval loss {result["loss"]:.4f}  perplexity {result["perplexity"]:.2f}  '
                f'bits/byte {result["bits_per_byte"]:.4f}  ({scope}, {result["tokens"]:.0f} tokens)')
    texts = trainer.samples(info.step)
    if texts and jax.process_index() == 0:
      sample_dir = trainer.workdir / 'samples'
      sample_dir.mkdir(exist_ok=True)
      produced['samples'] = '\n\n----------\n\n'.join(texts)
      (sample_dir / f'step_{info.step:07d}.txt').write_text(produced['samples'], encoding='utf-8')
      metrics.say(f'--- sample at step {info.step} ---\n{texts[0]}\n---')
    return produced
