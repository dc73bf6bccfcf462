"""The training loop: one experiment in one workdir, from its config to checkpoints, metrics and
samples; stopping on signals, divergence or a step limit."""

from __future__ import annotations

import pathlib
import signal
import threading
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from lm import checkpoint, decode, metrics, sharding
from lm.config import target_len
from lm.data import pipeline
from lm.model import count_embedding_params, count_params
from lm.train import (abstract_train_state, all_finite, evaluate_params, init_train_state, jit_eval_step,
                      jit_train_step, make_layout, padded_token_bytes)


class NonFiniteError(RuntimeError):
  """Training diverged: more than train.max_nonfinite_steps consecutive non-finite steps."""


_all_finite_jit = jax.jit(lambda *trees: all_finite(trees))


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


def _until(ids: np.ndarray, end_id: int) -> np.ndarray:
  ends = np.flatnonzero(ids == end_id)
  return ids[:ends[0]] if len(ends) else ids


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
    self.config = config
    self.workdir = pathlib.Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    layout = make_layout(config, devices)
    self.mesh, self.rules, self.batch_sharding, self.model = layout.mesh, layout.rules, layout.batch_sharding, layout.model
    optimizer, shardings = layout.optimizer, layout.shardings
    device = self.mesh.devices.flat[0]
    # The denominator of train/mfu: the device's peak from the table, else (CPU) its measured matmul rate.
    self._peak_flops = (metrics.peak_flops_per_device(config, device)
                        or metrics.measure_matmul_flops(device, config.model.dtype, sizes=(1024,)))
    self._config_changes = checkpoint.check_workdir(self.workdir, config)
    init_from = pathlib.Path(config.checkpoint.init_from) if config.checkpoint.init_from else None
    init_step = checkpoint.check_init_from(init_from, config) if init_from else None
    self.data_shard = sharding.data_shard(self.batch_sharding, config.data.batch_size)
    checkpoint.check_data_shards(self.workdir, self.data_shard[1])
    self.corpus = _one_process_first(lambda: pipeline.load_corpus(
        config, self.workdir / 'tokenizer', checkpoint.checkpointed_dataset(self.workdir)))
    self._train_step = jit_train_step(config, self.model, optimizer, shardings, self.batch_sharding)
    self._eval_step = jit_eval_step(self.model, shardings.params, self.batch_sharding)
    self._token_bytes = padded_token_bytes(self.corpus.tokenizer, config.model.vocab_size)
    self.train_iter = iter(pipeline.train_dataset(config, self.corpus, *self.data_shard))
    self.checkpointer = checkpoint.Checkpointer(self.workdir / 'checkpoints', config)
    if self.checkpointer.latest_step() is None:
      self.state = init_train_state(config, self.model, optimizer, self.mesh, self.rules)
      if init_from:  # Fine-tuning: that run's parameters, a fresh optimizer and step 0.
        source = checkpoint.Checkpointer(init_from / 'checkpoints', config)
        self.state = self.state.replace(params=source.restore_params(init_step, self.state.params))
        source.close()
        metrics.say(f'parameters from step {init_step} of {init_from}')
    else:  # Straight into the shards of this mesh, whatever mesh wrote it.
      abstract = abstract_train_state(config, self.model, optimizer, shardings)
      latest, self.state, problems = self.checkpointer.restore_latest(
          abstract, self.train_iter, lambda s: bool(sharding.to_host(_all_finite_jit(s.params, s.opt_state))))
      for problem in problems:
        metrics.say(f'warning: {problem}')
      metrics.say(f'resumed from step {latest} in {self.workdir}')
    self.start_step = int(sharding.to_host(self.state.step))
    checkpoint.save_config(self.workdir, config, self._config_changes, self.start_step, self.corpus.dataset,
                           self.data_shard[1])

  def activate(self):
    """The mesh and logical rules in context (needed wherever a step is traced)."""
    return sharding.activate(self.mesh, self.rules)

  def next_batch(self) -> dict[str, jax.Array]:
    """The next global training batch, assembled from this process's rows."""
    return sharding.global_batch(next(self.train_iter), self.batch_sharding, self.config.data.batch_size)

  def evaluate(self, num_batches: int = 0) -> dict[str, float]:
    with self.activate():
      return evaluate_params(self.config, self.corpus, self.state.params, self._eval_step, self.batch_sharding,
                             self._token_bytes, num_batches)

  def samples(self, step: int) -> list[str]:
    e, tokenizer = self.config.eval, self.corpus.tokenizer
    if not e.num_samples:
      return []
    rng = jax.random.fold_in(jax.random.fold_in(self.state.rng, step), 1)
    prompt, input_ids = np.concatenate([[tokenizer.bos_id], tokenizer.encode(e.sample_prompt)]), None
    if self.config.model.kind == 'encoder_decoder':  # The prompt is the input; the decoder starts afresh.
      seq_len = self.config.data.seq_len
      input_ids = np.pad(prompt[1:seq_len + 1], (0, max(0, seq_len - len(prompt) + 1)), constant_values=tokenizer.pad_id)
      prompt = prompt[:1]
    new = decode.sample(self.model, self.state.params, prompt, num_samples=e.num_samples,
                        num_tokens=min(e.sample_tokens, target_len(self.config)), temperature=e.sample_temperature,
                        rng=rng, mesh=self.mesh, input_ids=input_ids)
    if input_ids is not None:  # Shows the input, then what the decoder made of it (up to its end token).
      return [f'{e.sample_prompt}\n=>\n{tokenizer.decode(_until(row, tokenizer.bos_id))}' for row in new]
    return [e.sample_prompt + tokenizer.decode(row) for row in new]

  def _eval_and_sample(self, step: int, writer: metrics.MetricWriter, final: bool) -> dict[str, float]:
    start = time.perf_counter()
    num_batches = self.config.eval.final_num_batches if final else self.config.eval.num_batches
    result = self.evaluate(num_batches)
    writer.write(step, {f'eval/{k}': v for k, v in result.items()} | {'eval/seconds': time.perf_counter() - start})
    scope = f'{num_batches} batches' if num_batches else 'whole split'
    metrics.say(f'step {step}: eval loss {result["loss"]:.4f}  perplexity {result["perplexity"]:.2f}  '
                f'bits/byte {result["bits_per_byte"]:.4f}  ({scope}, {result["tokens"]:.0f} tokens)')
    texts = self.samples(step)
    if texts and jax.process_index() == 0:
      sample_dir = self.workdir / 'samples'
      sample_dir.mkdir(exist_ok=True)
      joined = '\n\n----------\n\n'.join(texts)
      (sample_dir / f'step_{step:07d}.txt').write_text(joined, encoding='utf-8')
      writer.write_text(step, 'samples', joined)
      metrics.say(f'--- sample at step {step} ---\n{texts[0]}\n---')
    return result

  def run(self, stop_after: int | None = None) -> dict[str, float]:
    """Trains from the current step; returns the last eval (the whole split if training finished)."""
    c = self.config
    end = c.train.steps if stop_after is None else min(stop_after, c.train.steps)
    step = self.start_step
    writer = metrics.MetricWriter(self.workdir, step)
    metrics.say(f'model: {count_params(self.state.params):,} parameters; '
                f'tokenizer: {c.data.tokenizer}, {self.corpus.tokenizer.vocab_size} tokens; mesh: '
                + ' x '.join(f'{k}={v}' for k, v in self.mesh.shape.items())
                + f' over {self.mesh.size} {jax.devices()[0].platform} devices, {jax.process_count()} process(es)')
    result: dict[str, float] = {}
    if step >= end:
      limit = 'train.steps' if end == c.train.steps else '--stop_after'
      metrics.say(f'{self.workdir} is already at step {step}: nothing to do ({limit}={end})')
      writer.close()
      self.checkpointer.close()
      return result
    batch = self.next_batch()
    start = time.perf_counter()
    with self.activate():
      compiled = self._train_step.lower(self.state, batch).compile()
    compile_s = time.perf_counter() - start
    writer.write(step, {'train/compile_seconds': compile_s, 'model/params': count_params(self.state.params),
                        'model/embedding_params': count_embedding_params(self.state.params),
                        'model/flops_per_token': metrics.flops_per_token(c),
                        'train/peak_flops_per_device': self._peak_flops})
    metrics.say(f'compiled the train step in {compile_s:.1f} s')
    bar = tqdm.tqdm(total=c.train.steps, initial=step, desc='train', unit='step', dynamic_ncols=True,
                    disable=jax.process_index() != 0, mininterval=1.0)
    mark = (time.perf_counter(), step)  # When the device had finished which step.
    pending = None  # The last log step's metrics, on their way to the host.
    last_save = time.monotonic()
    self.stopped_by = None
    try:
      with StopSignals() as signals:
        while step < end:
          if step > self.start_step:
            batch = self.next_batch()
          self.state, step_metrics = compiled(self.state, batch)
          step += 1
          if pending:  # Fetched one step late, when the device has long finished them: no stall.
            mark, pending = self._log(*pending, mark, writer, bar), None
          if step % c.train.log_every == 0 or step == end:
            for value in jax.tree.leaves(step_metrics):
              value.copy_to_host_async()
            pending = (step, step_metrics)
          minutes = c.checkpoint.every_minutes
          overdue = bool(minutes) and time.monotonic() - last_save >= 60 * minutes
          stop, overdue = self._agree(step, signals.received, overdue)
          save = step % c.checkpoint.every == 0 or step == end or stop or overdue
          # A stop skips the periodic eval (to exit soon), not the final one.
          evaluate = step == c.train.steps or (step % c.eval.every == 0 and not stop)
          if pending and (save or evaluate):  # Those wait for the step anyway: log it first, timed right.
            mark, pending = self._log(*pending, mark, writer, bar), None
          if save:
            self._check_finite(step)  # Waits for the step.
            self.checkpointer.save(step, self.state, self.train_iter)  # Writes in the background.
            last_save = time.monotonic()
          if evaluate:
            result = self._eval_and_sample(step, writer, final=step == c.train.steps)
          if save or evaluate:
            mark = (time.perf_counter(), step)  # Keep eval and saving out of step times.
          if stop:
            self.stopped_by = stop
            metrics.say(f'{stop}: stopped at step {step} with a checkpoint; the same command resumes from it')
            break
    finally:
      bar.close()
      self.checkpointer.close()
      writer.close()
    return result

  def _check_streak(self, step: int, streak: int) -> None:
    limit = self.config.train.max_nonfinite_steps
    if streak > limit:
      last = self.checkpointer.latest_step()
      kept = f'the last checkpoint (step {last}) is kept' if last is not None else 'no checkpoint was written'
      raise NonFiniteError(
          f'training diverged: the loss, gradients or parameters were not finite at every step since step '
          f'{step - streak + 1} (more than train.max_nonfinite_steps={limit} in a row); stopped at step {step} '
          f'without saving; {kept}. Lower optimizer.learning_rate, lengthen optimizer.warmup_steps or set '
          'train.z_loss, then rerun to resume from that checkpoint')

  def _check_finite(self, step: int) -> None:
    """Stops the run rather than checkpoint a diverged or non-finite state."""
    self._check_streak(step, int(sharding.to_host(self.state.nonfinite_streak)))
    if not bool(sharding.to_host(_all_finite_jit(self.state.params, self.state.opt_state))):
      raise NonFiniteError(f'the train state at step {step} holds NaN or Inf values: not checkpointed')

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

  def _log(self, step: int, step_metrics: dict[str, jax.Array], mark: tuple[float, int],
           writer: metrics.MetricWriter, bar: tqdm.tqdm) -> tuple[float, int]:
    """Records a log step's metrics, timed from the last mark to when they reached the host.

    The host fetches them after queuing the next step, so the device never waits for the host; as
    the host runs ahead of the device, their arrival marks when the device finished the step.
    """
    values = {k: float(v) for k, v in sharding.to_host(step_metrics).items()}
    streak = int(values.pop('nonfinite_streak'))
    now = time.perf_counter()
    values['step_seconds'] = (now - mark[0]) / (step - mark[1])
    values['tokens_per_second'] = self.config.data.batch_size * metrics.tokens_per_example(self.config) / values['step_seconds']
    # Model FLOPs utilisation: the share of the devices' peak the model's FLOPs use.
    values['mfu'] = metrics.flops_per_token(self.config) * values['tokens_per_second'] / (self._peak_flops * self.mesh.size)
    writer.write(step, {f'train/{k}': v for k, v in values.items()})
    self._check_streak(step, streak)  # After the record: the run's last one shows the divergence.
    bar.update(step - bar.n)
    bar.set_postfix(loss=f'{values["loss"]:.3f}', tok_s=f'{values["tokens_per_second"]:,.0f}',
                    step_ms=f'{1e3 * values["step_seconds"]:.0f}', mfu=f'{100 * values["mfu"]:.0f}%', refresh=False)
    return now, step
