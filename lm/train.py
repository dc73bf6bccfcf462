"""The train state, the pure train and eval steps, and the loop that runs an experiment."""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import signal
import threading
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import struct
from jax.experimental import multihost_utils

from lm import checkpoint, decode, metrics, sharding
from lm.config import ConfigError
from lm.data import pipeline
from lm.config import target_len
from lm.layers import attention_implementation
from lm.model import apply_model, count_embedding_params, count_params, make_model, vocab_logits
from lm.optim import learning_rate_schedule, make_optimizer


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken.
  params: Any
  opt_state: Any
  rng: jax.Array  # Root key of in-training randomness (samples at step s use fold_in(rng, s)).
  skipped_steps: jax.Array  # int32: steps whose update was skipped for a non-finite loss, gradient or parameter.
  nonfinite_streak: jax.Array  # int32: consecutive such steps up to now (see train_step).


class NonFiniteError(RuntimeError):
  """Training diverged: more than train.max_nonfinite_steps consecutive non-finite steps."""


def _unbox(tree: Any) -> Any:
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree, is_leaf=is_box)


def example_batch(config: ml_collections.ConfigDict, batch_size: int = 1) -> dict[str, jax.Array]:
  """Zeros shaped like a batch of config's data (see lm/data/pipeline.py)."""
  if config.model.kind == 'encoder_decoder':
    return {'inputs': jnp.zeros((batch_size, config.data.seq_len), jnp.int32),
            'tokens': jnp.zeros((batch_size, target_len(config) + 1), jnp.int32)}
  return {'tokens': jnp.zeros((batch_size, config.data.seq_len + 1), jnp.int32)}


def _init_fn(config: ml_collections.ConfigDict, model: nn.Module, optimizer: optax.GradientTransformation):
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))

  def init_params():  # Boxed: each parameter carries its logical axis names.
    batch = example_batch(config)
    args = (batch['inputs'],) if 'inputs' in batch else ()
    return model.init(init_rng, *args, batch['tokens'][:, :-1])['params']

  def init():
    params = _unbox(init_params())
    return TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params), rng=state_rng,
                      skipped_steps=jnp.int32(0), nonfinite_streak=jnp.int32(0))

  return init_params, init


def state_shardings(config: ml_collections.ConfigDict, model: nn.Module, optimizer: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh, rules) -> TrainState:
  """Where each part of the train state lives: parameters and their optimizer moments as the logical
  rules say, counters and keys replicated. Raises ConfigError if a sharded dimension does not split."""
  init_params, _ = _init_fn(config, model, optimizer)
  with jax.set_mesh(None):  # Flax's DenseGeneral init would constrain its kernel before reshaping it.
    boxed = jax.eval_shape(init_params)
  sharding.check_divisible(boxed, mesh, rules, config.model)
  params = sharding.shardings_of(boxed, mesh, rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  opt_state = optax.tree_map_params(optimizer, lambda _, s: s, jax.eval_shape(optimizer.init, _unbox(boxed)), params,
                                    transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=params, opt_state=opt_state, rng=replicated, skipped_steps=replicated,
                    nonfinite_streak=replicated)


@dataclasses.dataclass(frozen=True)
class Layout:
  """What a config on a set of devices trains with: nothing compiled yet, every fit checked."""
  mesh: jax.sharding.Mesh
  rules: tuple
  batch_sharding: jax.sharding.NamedSharding
  model: nn.Module
  optimizer: optax.GradientTransformation
  shardings: TrainState


def make_layout(config: ml_collections.ConfigDict, devices: list[jax.Device] | None = None) -> Layout:
  """The mesh over `devices` (default: all), the model, optimizer and train-state shardings, after
  checking config against them: mesh size, batch and parameter divisibility, the attention kernel.
  Each misfit is a ConfigError naming the key."""
  mesh = sharding.make_mesh(config, devices)
  rules = sharding.logical_axis_rules(config)
  sharding.check_batch('data.batch_size', config.data.batch_size, mesh, rules, config.train.microbatches)
  sharding.check_batch('eval.batch_size', config.eval.batch_size, mesh, rules)
  attention_implementation(config.model)
  model, optimizer = make_model(config), make_optimizer(config)
  shardings = state_shardings(config, model, optimizer, mesh, rules)
  return Layout(mesh, rules, sharding.batch_sharding(mesh, rules), model, optimizer, shardings)


def abstract_train_state(config: ml_collections.ConfigDict, model: nn.Module, optimizer: optax.GradientTransformation,
                         shardings: TrainState) -> TrainState:
  """The train state as shapes, dtypes and shardings only: what a restore or an AOT compile needs."""
  _, init = _init_fn(config, model, optimizer)
  with jax.set_mesh(None):  # As in state_shardings.
    shapes = jax.eval_shape(init)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def init_train_state(config: ml_collections.ConfigDict, model: nn.Module, optimizer: optax.GradientTransformation,
                     mesh: jax.sharding.Mesh, rules=None) -> TrainState:
  """A fresh train state, each array created directly in its shards (never whole on one device)."""
  rules = sharding.logical_axis_rules(config) if rules is None else rules
  shardings = state_shardings(config, model, optimizer, mesh, rules)
  _, init = _init_fn(config, model, optimizer)
  with jax.set_mesh(None):  # As in state_shardings.
    return jax.jit(init, out_shardings=shardings)()


def token_losses(logits_BLV: jax.Array, targets_BL: jax.Array, *, z_loss: float = 0.0,
                 label_smoothing: float = 0.0) -> jax.Array:
  """Per-target loss in nats: the cross-entropy, with label smoothing and z-loss (see loss_sums)."""
  log_z_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
  losses_BL = log_z_BL - jnp.take_along_axis(logits_BLV, targets_BL[..., None], axis=-1)[..., 0]
  if label_smoothing:
    losses_BL = (1 - label_smoothing) * losses_BL + label_smoothing * (log_z_BL - jnp.mean(logits_BLV, axis=-1))
  if z_loss:
    losses_BL = losses_BL + z_loss * jnp.square(log_z_BL)
  return losses_BL


def chunked_loss_sum(config, params, x_BLD: jax.Array, targets_BL: jax.Array, mask_BL: jax.Array, chunk: int,
                     **loss_options) -> jax.Array:
  """sum(token_losses * mask) over the logits of hidden states x_BLD, computed `chunk` positions at a
  time, forward and (recomputed) backward: the [B, L, V] logits never exist at once, only [B, chunk, V]."""
  batch, length = targets_BL.shape
  pad = -length % chunk  # Masked-out positions that fill the last chunk.
  def split(a):  # [B, L, ...] -> [L / chunk, B, chunk, ...]
    a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
    return jnp.moveaxis(a.reshape(batch, -1, chunk, *a.shape[2:]), 1, 0)

  @jax.checkpoint
  def chunk_sum(total, xs):
    x_BCD, targets_BC, mask_BC = xs
    losses_BC = token_losses(vocab_logits(config, params, x_BCD), targets_BC, **loss_options)
    return total + jnp.sum(losses_BC * mask_BC), None

  total, _ = jax.lax.scan(chunk_sum, jnp.float32(0), (split(x_BLD), split(targets_BL), split(mask_BL)))
  return total


def loss_sums(params, batch: dict[str, jax.Array], model: nn.Module, *, z_loss: float = 0.0,
              label_smoothing: float = 0.0, moe_balance_loss: float = 0.0,
              dropout_rng: jax.Array | None = None, logits_chunk: int = 0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(summed loss in nats over unmasked targets, count of those targets, mean MoE balance loss).

  With the defaults the loss is the cross-entropy; training may add label smoothing (a share of
  the target spread over the vocabulary), z-loss (z_loss * logsumexp(logits)^2), and the experts'
  load-balancing loss (moe_balance_loss * its mean over MoE layers, per target). A dropout_rng turns
  dropout on. logits_chunk > 0 computes the logits that many positions at a time (chunked_loss_sum).
  """
  train = dropout_rng is not None
  targets_BL, mask_BL = batch['tokens'][:, 1:], batch['loss_mask'].astype(jnp.float32)
  chunked = 0 < logits_chunk < targets_BL.shape[1]
  out, aux = apply_model(model, params, batch, train=train, rngs={'dropout': dropout_rng} if train else None,
                         mutable=['aux_loss'], hidden=chunked)
  options = {'z_loss': z_loss, 'label_smoothing': label_smoothing}
  if chunked:
    total = chunked_loss_sum(model.config, params, out, targets_BL, mask_BL, logits_chunk, **options)
  else:
    total = jnp.sum(token_losses(out, targets_BL, **options) * mask_BL)
  count = jnp.sum(mask_BL)
  balance_layers = jax.tree.leaves(aux.get('aux_loss', {}))
  balance = jnp.mean(jnp.concatenate([jnp.ravel(x) for x in balance_layers])) if balance_layers else jnp.float32(0)
  return total + moe_balance_loss * balance * count, count, balance


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule, microbatches: int = 1,
               z_loss: float = 0.0, label_smoothing: float = 0.0, moe_balance_loss: float = 0.0,
               logits_chunk: int = 0, max_nonfinite_steps: int = 0) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the mean loss over the batch's targets (see loss_sums).

  A step whose loss or gradient norm is not finite changes neither the parameters nor the optimizer
  state (the batch is spent, the step counted in skipped_steps). After more than max_nonfinite_steps
  such steps in a row the state freezes (every later step is skipped too) until the host, seeing
  nonfinite_streak, stops the run.

  With microbatches = k the batch is processed in k sequential passes whose summed gradients
  equal the whole batch's (microbatch j takes rows j, j + k, ..., so each stays spread over
  the data shards). Dropout masks come from fold_in(state.rng, step) (and the microbatch), so a
  resumed run draws the same ones.
  """
  step_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0)

  def loss_fn(params, b, rng):
    total, count, balance = loss_sums(params, b, model, z_loss=z_loss, label_smoothing=label_smoothing,
                                      moe_balance_loss=moe_balance_loss, dropout_rng=rng, logits_chunk=logits_chunk)
    return total, (count, balance * count)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if microbatches == 1:
    (total, (count, balance_sum)), grads = grad_fn(state.params, batch, step_rng)
  else:
    def split(x):
      x = x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
      return nn.with_logical_constraint(x, (None, 'batch') + (None,) * (x.ndim - 2))

    def accumulate(carry, xs):
      index, microbatch = xs
      (t, (c, b)), g = grad_fn(state.params, microbatch, jax.random.fold_in(step_rng, index))
      return jax.tree.map(jnp.add, carry, (t, c, b, g)), None

    zeros = (jnp.float32(0), jnp.float32(0), jnp.float32(0), jax.tree.map(jnp.zeros_like, state.params))
    (total, count, balance_sum, grads), _ = jax.lax.scan(
        accumulate, zeros, (jnp.arange(microbatches), jax.tree.map(split, batch)))
  scale = 1.0 / jnp.maximum(count, 1.0)
  loss, grads = total * scale, jax.tree.map(lambda g: g * scale, grads)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # Known before the update, so the choice below fuses into it. Finite gradients cannot make the
  # parameters overflow (Adam's steps are about the learning rate); Trainer checks before each save.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  tripped = state.nonfinite_streak > max_nonfinite_steps
  streak = jnp.where(tripped, state.nonfinite_streak + 1, jnp.where(finite, 0, state.nonfinite_streak + 1))
  keep_update = streak == 0
  params, opt_state = jax.tree.map(lambda new, old: jnp.where(keep_update, new, old),
                                   (params, opt_state), (state.params, state.opt_state))
  skipped = state.skipped_steps + (~keep_update).astype(jnp.int32)
  metrics_ = {'loss': loss, 'grad_norm': grad_norm, 'learning_rate': schedule(state.step), 'skipped_steps': skipped,
              'nonfinite_streak': streak}
  if model.config.moe_experts:
    metrics_['moe_balance_loss'] = balance_sum * scale
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, skipped_steps=skipped,
                       nonfinite_streak=streak), metrics_


def all_finite(tree: Any) -> jax.Array:
  """True (a bool scalar) when every element of every floating-point array in tree is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


_all_finite_jit = jax.jit(lambda *trees: all_finite(trees))


def jit_train_step(config: ml_collections.ConfigDict, model: nn.Module, optimizer: optax.GradientTransformation,
                   shardings: TrainState, batch_sharding: jax.sharding.NamedSharding):
  """train_step under jit with explicit shardings, the state donated. Trace it inside sharding.activate."""
  replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
  return jax.jit(functools.partial(train_step, model=model, optimizer=optimizer, schedule=learning_rate_schedule(config),
                                   microbatches=config.train.microbatches, z_loss=config.train.z_loss,
                                   label_smoothing=config.train.label_smoothing,
                                   moe_balance_loss=config.train.moe_balance_loss,
                                   logits_chunk=config.train.logits_chunk,
                                   max_nonfinite_steps=config.train.max_nonfinite_steps),
                 in_shardings=(shardings, batch_sharding), out_shardings=(shardings, replicated), donate_argnums=0)


def eval_step(params, batch: dict[str, jax.Array], token_bytes_V: jax.Array, *,
              model: nn.Module) -> dict[str, jax.Array]:
  """Sums for loss, perplexity and bits per byte: nats, target tokens, and bytes those targets spell."""
  total, count, _ = loss_sums(params, batch, model)
  target_bytes_BL = token_bytes_V[batch['tokens'][:, 1:]] * batch['loss_mask']
  return {'loss_sum': total, 'tokens': count, 'bytes': jnp.sum(target_bytes_BL.astype(jnp.float32))}


def jit_eval_step(model: nn.Module, param_shardings, batch_sharding: jax.sharding.NamedSharding):
  replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
  return jax.jit(functools.partial(eval_step, model=model), in_shardings=(param_shardings, batch_sharding, replicated),
                 out_shardings=replicated)


def evaluate_params(config: ml_collections.ConfigDict, corpus: pipeline.Corpus, params, jitted_eval_step,
                    batch_sharding: jax.sharding.NamedSharding, token_bytes_V: np.ndarray,
                    num_batches: int = 0) -> dict[str, float]:
  """Loss, perplexity and bits per byte of params on the eval split (num_batches=0: all of it),
  each process feeding its rows of every batch. Call inside sharding.activate."""
  size = config.eval.batch_size
  start, stop = sharding.process_rows(batch_sharding, size)
  outs = [jitted_eval_step(params,  # Fetched once, at the end.
                           sharding.global_batch({k: v[start:stop] for k, v in batch.items()}, batch_sharding, size),
                           token_bytes_V)
          for batch in pipeline.eval_batches(config, corpus, num_batches)]
  if not outs:
    raise ConfigError(f'data.eval_split={config.data.eval_split!r} holds no text to evaluate on')
  sums = {k: float(np.sum([np.float64(o[k]) for o in sharding.to_host(outs)])) for k in outs[0]}
  return metrics.eval_summary(sums['loss_sum'], sums['tokens'], sums['bytes'])


def padded_token_bytes(tokenizer, vocab_size: int) -> np.ndarray:
  """Bytes per token id for all vocab_size rows of the model (0 beyond the tokenizer's)."""
  return np.pad(tokenizer.token_bytes, (0, vocab_size - tokenizer.vocab_size))


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
