"""The training loop: one experiment in one workdir, from its config to checkpoints, metrics and
samples; stopping on signals, divergence or a step limit."""

from __future__ import annotations

import pathlib
import secrets
import signal
import threading
import time
from typing import Any, Callable
import warnings

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from lm import kinds
from lm.config import ConfigError, named_mesh, override
from lm.data import pipeline, tokenizers
from lm.inference import decode
from lm.nn.model import count_embedding_params, count_mtp_params, count_params
from lm.parallel import sharding
from lm.training import checkpoint, hooks, lock, metrics, workdirs
from lm.training.records import TrainRecords
from lm.training.start import how_to_start, start_state
from lm.training.train import (
  all_finite,
  evaluate_params,
  jit_eval_step,
  jit_train_step,
  make_layout,
  padded_token_bytes,
)

NonFiniteError = hooks.NonFiniteError  # What a diverged run raises (lm.main prints it in one line).

_all_finite_jit = jax.jit(lambda *trees: all_finite(trees))


def _is_finite(state) -> bool:
  """No NaN or Inf in a train state's parameters and optimizer state."""
  return bool(sharding.to_host(_all_finite_jit(state.params, state.opt_state)))


def _one_process_first(load: Callable[[], Any]) -> Any:
  """Runs `load` on process 0, then on the others: what it prepares on disk is made once."""
  if jax.process_count() == 1:
    return load()
  if jax.process_index() != 0:
    multihost_utils.sync_global_devices('lm: process 0 prepares data and tokenizer')
  result = load()
  if jax.process_index() == 0:
    multihost_utils.sync_global_devices('lm: process 0 prepares data and tokenizer')
  return result


class StopSignals:
  """Within `with`: SIGTERM and SIGINT are recorded instead of killing the process, so the training
  loop can finish its step, checkpoint and return (a second SIGINT interrupts at once). Outside the
  main thread, where Python cannot handle signals, it records nothing."""

  def __init__(self):
    self.received: str | None = None
    self._previous = {}

  def _handle(self, signum, frame):
    if signum == signal.SIGINT and self.received == 'SIGINT':
      signal.signal(signal.SIGINT, signal.default_int_handler)
      raise KeyboardInterrupt
    self.received = signal.Signals(signum).name
    metrics.say(f'{self.received}: stopping after this step, with a checkpoint')

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class Trainer:
  """One experiment in one workdir: built once, `run()` trains to train.steps (or stop_after).

  Runs on a mesh over `devices` (default: all devices of all processes); every process of a
  multi-host run builds its own Trainer and reads only its rows of each batch.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
               devices: list[jax.Device] | None = None):
    self.workdir = pathlib.Path(workdir)
    lock.check_free(self.workdir)  # lm.main holds the lock; a Trainer of its own must not write beside it.
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.writer: metrics.MetricWriter | None = None  # Open while run() runs.
    self.last_eval: dict[str, float] = {}
    self.stopped_by: str | None = None  # The signal that stopped run() early.
    layout = make_layout(config, devices)
    # mesh.shape as the sizes it resolved to, by name: what config.json and resumes compare.
    self.config = config = override(config, {'mesh.shape': named_mesh(layout.mesh.shape.values())})
    self.mesh, self.rules, self.batch_sharding = layout.mesh, layout.rules, layout.batch_sharding
    self.model = layout.model
    # The denominator of train/mfu: the device's peak from the table, else (CPU) its matmul rate, cached.
    self.peak_flops = metrics.peak_flops(self.mesh.devices.flat[0], config.model.dtype,
                                         config.train.peak_flops_per_device)
    self.hooks: list[hooks.Hook] = []  # The user's; run() puts the built-in ones first.
    self._harness = self._harness_hook(config.eval.harness_tasks)
    if config.train.wandb_project:
      metrics.wandb_module()  # Installed? Refused now, not after the data is read.
    self.start = how_to_start(self.workdir, config)
    self.data_shard = sharding.data_shard(self.batch_sharding, config.data.batch_size)
    workdirs.check_data_shards(self.start.data_workdir(self.workdir), self.data_shard[1])
    trained_on = workdirs.checkpointed_dataset(self.start.data_workdir(self.workdir))
    self.corpus = _one_process_first(lambda: pipeline.load_corpus(
        config.data, config.model.vocab_size, self.workdir / 'tokenizer', trained_on,
        init_from=config.checkpoint.init_from, files_dir=self.workdir / 'data'))
    self._train_step = jit_train_step(layout, config.train)
    self._eval_step = jit_eval_step(self.model, layout.shardings.params, self.batch_sharding)
    self._token_bytes = padded_token_bytes(self.corpus.tokenizer, config.model.vocab_size)
    self.train_iter = iter(pipeline.train_dataset(config.data, self.corpus, config.seed, *self.data_shard))
    self._drawn = np.zeros(len(getattr(self.corpus, 'weights', ())), np.int64)  # Rows per mixture source.
    self.checkpointer = checkpoint.Checkpointer(self.workdir / 'checkpoints', config.checkpoint)
    self.state, lines = start_state(self.start, layout, config, self.checkpointer, self.train_iter,
                                          _is_finite)
    for line in lines:
      metrics.say(line)
    self.start_step = int(sharding.to_host(self.state.step))
    if jax.process_index() == 0:
      workdirs.save_config(self.workdir, config, self.start.changed, self.start_step, self.corpus.dataset,
                           self.data_shard[1])

  @staticmethod
  def _harness_hook(names: str) -> hooks.Harness | None:
    """The hook running eval.harness_tasks, its tasks checked (and their data read) now: a ConfigError
    before training for a name the harness does not know or a dataset it cannot read."""
    tasks = [t.strip() for t in names.split(',') if t.strip()]
    if not tasks:
      return None
    from lm.inference import harness  # noqa: PLC0415 (only here: it brings in lm-eval, torch and datasets)
    manager = harness.task_manager(tasks=tasks)
    harness.check_tasks(tasks, manager)
    return hooks.Harness(harness, manager, tasks)

  def activate(self):
    """The mesh and logical rules in context (needed wherever a step is traced)."""
    return sharding.activate(self.mesh, self.rules)

  def next_batch(self) -> dict[str, jax.Array]:
    """The next global training batch, assembled from this process's rows (a mixture's source of each
    row counted, for realised_mixture, and left out)."""
    batch = next(self.train_iter)
    if 'source' in batch:
      batch = dict(batch)
      self._drawn += np.bincount(batch.pop('source'), minlength=len(self._drawn))
    return sharding.global_batch(batch, self.batch_sharding, self.config.data.batch_size)

  def realised_mixture(self) -> dict[str, float]:
    """{'train/mixture/SOURCE': share of the rows this process drew from it since it started}, or {}."""
    if not isinstance(self.corpus, pipeline.Mixture) or not self._drawn.sum():
      return {}
    shares = self._drawn / self._drawn.sum()
    return {f'train/mixture/{label}': float(share) for label, share in zip(self.corpus.weights, shares)}

  def evaluate(self, num_batches: int = 0) -> dict[str, float]:
    with self.activate():
      return evaluate_params(self.config.data, self.corpus, self.state.params, self._eval_step, self.batch_sharding,
                             self._token_bytes, seed=self.config.seed, batch_size=self.config.eval.batch_size,
                             num_batches=num_batches)

  def samples(self, step: int) -> list[str]:
    e, tokenizer = self.config.eval, self.corpus.tokenizer
    if not e.num_samples:
      return []
    rng = jax.random.fold_in(jax.random.fold_in(self.state.rng, step), 1)
    kind = kinds.of(self.config.model)
    prompt, input_ids = kind.sample_request(
        tokenizers.prompt_ids(tokenizer, e.sample_prompt),  # As lm.generate starts it.
        np.asarray(tokenizer.encode(e.sample_prompt), np.int32), tokenizer.bos_id, tokenizer.pad_id, self.config.data)
    new = decode.sample(self.model, self.state.params, prompt, num_samples=e.num_samples,
                        num_tokens=min(e.sample_tokens, kind.target_positions(self.config.data)),
                        temperature=e.sample_temperature, rng=rng, mesh=self.mesh, input_ids=input_ids)
    return [kind.sample_text(e.sample_prompt, row, tokenizer) for row in new]

  def add_hook(self, hook: hooks.Hook | Callable[[Trainer, hooks.StepInfo], Any], every: int = 1,
               at_end: bool = False, waits: bool = True) -> hooks.Hook:
    """Runs `hook` after each step it is due: a hooks.Hook, or a function fn(trainer, info) called every
    `every` steps (and at the run's last step if at_end). waits=True (the default) keeps its time out of
    the logged step times. Hooks run in the order added, after the built-in ones."""
    if not isinstance(hook, hooks.Hook):
      hook = hooks.Every(hook, every, at_end, waits)
    self.hooks.append(hook)
    return hook

  def state_is_finite(self) -> bool:
    return _is_finite(self.state)

  def run(self, stop_after: int | None = None) -> dict[str, float]:
    """Trains from the current step; returns the last eval (the whole split if training finished)."""
    c = self.config
    end = c.train.steps if stop_after is None else min(stop_after, c.train.steps)
    step = self.start_step
    mtp = count_mtp_params(self.state.params)
    metrics.say(f'model: {count_params(self.state.params):,} parameters'
                + (f' ({mtp:,} of them in {c.model.mtp_depth} multi-token module(s))' if mtp else '') + '; '
                f'tokenizer: {c.data.tokenizer}, {self.corpus.tokenizer.vocab_size} tokens; '
                f'mesh: {c.mesh.shape} over {self.mesh.size} {jax.devices()[0].platform} devices, '
                f'{jax.process_count()} process(es)')
    self.last_eval, self.stopped_by = {}, None
    if step >= end:
      limit = 'train.steps' if end == c.train.steps else '--stop_after'
      metrics.say(f'{self.workdir} is already at step {step}: nothing to do ({limit}={end})')
      self.checkpointer.close()
      return self.last_eval
    self.writer = metrics.MetricWriter(self.workdir, step, c)
    batch = self.next_batch()
    start = time.perf_counter()
    with self.activate():
      compiled = self._train_step.lower(self.state, batch).compile()
    compile_s = time.perf_counter() - start
    self.writer.write(step, {'train/compile_seconds': compile_s, 'model/params': count_params(self.state.params),
                             'model/embedding_params': count_embedding_params(self.state.params),
                             'model/flops_per_token': metrics.flops_per_token(c.model, c.data),
                             'train/peak_flops_per_device': self.peak_flops}
                      | ({'model/mtp_params': mtp} if mtp else {}))
    metrics.say(f'compiled the train step in {compile_s:.1f} s')
    records, checkpointer = TrainRecords(c, step, self.peak_flops, self.mesh.size), hooks.Checkpoint()
    built_in = [hooks.NonFiniteGuard(), hooks.Progress(self), checkpointer, hooks.Evaluate()]
    built_in += [self._harness] if self._harness else []
    self.hooks[:0] = built_in
    try:
      with StopSignals() as signals:
        while step < end:
          if step > self.start_step:
            batch = self.next_batch()
          self.state, step_metrics = compiled(self.state, batch)
          step += 1
          stop, overdue = self._agree(step, signals.received, checkpointer.overdue(self))
          info = hooks.StepInfo(step, step_metrics, final=step == c.train.steps, last=step == end, stop=stop,
                                checkpoint_overdue=overdue)
          info.saving = step % c.checkpoint.every == 0 or info.last or bool(stop) or overdue
          # Whether a hook waits for the step decides when its record is made: every hook sees it.
          info.flush = any(hook.waits and hook.due(self, info) for hook in self.hooks)
          info.records = records.after_step(step, step_metrics, info.last, info.flush)
          for record_step, values in info.records:
            self.writer.write(record_step, {f'train/{k}': v for k, v in values.items() if k != 'nonfinite_streak'}
                              | self.realised_mixture())
          for hook in self.hooks:
            if hook.due(self, info):
              self._log(step, hook(self, info))
          if info.flush:
            records.restart_clock(step)  # Keep eval, saving and waiting hooks out of step times.
          if stop:
            self.stopped_by = stop
            metrics.say(f'{stop}: stopped at step {step} with a checkpoint; the same command resumes from it')
            break
    finally:
      for hook in self.hooks:
        hook.close(self)
      del self.hooks[:len(built_in)]
      self.checkpointer.close()
      self.writer.close()
    return self.last_eval

  def _log(self, step: int, produced: hooks.Produced) -> None:
    """Writes what a hook returned: numbers as metrics, strings as text; eval/ results are the run's last eval."""
    if not produced:
      return
    numbers = {k: v for k, v in produced.items() if not isinstance(v, str)}
    if numbers:
      self.writer.write(step, numbers)
    for tag, text in produced.items():
      if isinstance(text, str):
        self.writer.write_text(step, tag, text)
    if evals := {k[len('eval/'):]: v for k, v in numbers.items() if k.startswith('eval/') and k != 'eval/seconds'}:
      self.last_eval = evals

  def _agree(self, step: int, signal_name: str | None, checkpoint_due: bool) -> tuple[str | None, bool]:
    """(the stop signal, checkpoint due by time) as all processes see them: any process's signal or
    process 0's clock. A single process decides every step; several compare notes at log steps only."""
    if jax.process_count() == 1:
      return signal_name, checkpoint_due
    if step % self.config.train.log_every:
      return None, False
    names = ('', 'SIGTERM', 'SIGINT')
    local = np.array([names.index(signal_name or ''), checkpoint_due], np.int32)
    seen = np.asarray(multihost_utils.process_allgather(local))
    return names[int(seen[:, 0].max())] or None, bool(seen[0, 1])


def initialize_distributed(coordinator_address: str | None, num_processes: int | None,
                           process_id: int | None) -> None:
  """jax.distributed.initialize (None: found from Slurm or the TPU metadata); before any other JAX call."""
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  except Exception as e:  # No cluster found, coordinator unreachable, ...
    raise SystemExit(f'error: jax.distributed.initialize failed: {str(e).strip().splitlines()[0]}') from e


def hold_workdir(workdir: str | pathlib.Path) -> lock.Lock | None:
  """The workdir's lock, taken by process 0 for the whole job (the others hold None once they have
  checked that it names their job); FolderInUse on every process when another writer holds it."""
  if jax.process_count() == 1:
    return lock.acquire(workdir)
  job = f'{int(multihost_utils.broadcast_one_to_all(np.int32(secrets.randbits(31)))):08x}'
  held, problem = None, ''

  def agree() -> None:  # Every process goes on, or every process stops with a reason.
    if not np.asarray(multihost_utils.process_allgather(np.int32(problem == ''))).all():
      if held is not None:
        held.release()
      raise lock.FolderInUse(problem or f'{workdir}: another process of this job could not take or share the lock')

  try:
    if jax.process_index() == 0:
      held = lock.acquire(workdir, job=job)
  except ConfigError as e:
    problem = str(e)
  agree()
  try:
    if jax.process_index() != 0:
      lock.check_job(workdir, job)
  except ConfigError as e:
    problem = str(e)
  agree()
  return held


def train_command(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, stop_after: int | None = None,
                  distributed: tuple | None = None) -> str | None:
  """python -m lm.main once its config is valid: joins the other processes (distributed: the
  arguments of initialize_distributed), trains, prints the closing line. Returns the signal that
  stopped the run early (None: it reached its end); a refusal is a SystemExit with one line."""
  if distributed is not None:
    initialize_distributed(*distributed)
  held = None
  try:
    held = hold_workdir(workdir)
    trainer = Trainer(config, workdir)
    result = trainer.run(stop_after=stop_after)
  except (ConfigError, OSError, NonFiniteError) as e:  # OSError: an unusable workdir, a full disk, ...
    if isinstance(e, checkpoint.CheckpointWriteError):  # The failed save's writes are abandoned, not awaited.
      warnings.filterwarnings('ignore', message=r'coroutine .* was never awaited', category=RuntimeWarning)
    raise SystemExit(f'error: {e}') from e
  finally:
    if held is not None:
      held.release()
  if result and not trainer.stopped_by:
    metrics.say(f'done: validation loss {result["loss"]:.4f}, perplexity {result["perplexity"]:.2f}, '
                f'bits per byte {result["bits_per_byte"]:.4f}; outputs in {workdir}/')
  return trainer.stopped_by
