"""The train state, its layout on the devices, and the pure train and eval steps (the loop: lm/training/loop.py)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

from flax import struct
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lm import kinds
from lm.config import ConfigError
from lm.data import pipeline
from lm.kinds import make_model
from lm.nn import mup
from lm.nn.attention import attention_implementation, segment_positions
from lm.nn.model import apply_model, vocab_logits
from lm.parallel import sharding
from lm.training import metrics
from lm.training.experts import balance_router_bias, moe_metrics, moe_sums
from lm.training.optim import learning_rate_schedule, make_optimizer


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken.
  params: Any
  opt_state: Any
  rng: jax.Array  # Root key of in-training randomness (samples at step s use fold_in(rng, s)).
  skipped_steps: jax.Array  # int32: steps whose update was skipped for a non-finite loss or gradient norm.
  nonfinite_streak: jax.Array  # int32: consecutive such steps up to now (see train_step).


def _unbox(tree: Any) -> Any:
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree, is_leaf=is_box)


def _init_functions(seed: int, model: nn.Module, batch: dict[str, jax.Array]
                    ) -> tuple[Callable[[], Any], Callable[[optax.GradientTransformation], TrainState]]:
  """(the boxed parameters' init, the whole train state's init given the optimizer) from the run's seed
  and a batch's shapes."""
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))

  def init_params():  # Boxed: each parameter carries its logical axis names.
    return model.init(init_rng, *model.arguments(batch)[0])['params']

  def init(optimizer):
    params = _unbox(init_params())
    return TrainState(step=jnp.int32(0), params=params, opt_state=optimizer.init(params), rng=state_rng,
                      skipped_steps=jnp.int32(0), nonfinite_streak=jnp.int32(0))

  return init_params, init


def _boxed_shapes(init_params: Callable[[], Any]) -> Any:
  """The boxed parameters as shapes: each carries its logical axis names."""
  with jax.set_mesh(None):  # Flax's DenseGeneral init would constrain its kernel before reshaping it.
    return jax.eval_shape(init_params)


def _dict_keys(path) -> tuple:
  return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def _state_shardings(boxed: Any, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh, rules,
                     m: ml_collections.ConfigDict) -> TrainState:
  """Where each part of the train state lives: parameters and the optimizer state shaped like them as
  the logical rules say; counters, keys and statistics of other shapes (Adafactor's factored moments)
  replicated. Raises ConfigError if a sharded dimension does not split."""
  sharding.check_divisible(boxed, mesh, rules, m)
  params = sharding.shardings_of(boxed, mesh, rules)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shapes = _unbox(boxed)
  by_path = {_dict_keys(path): (shape.shape, sh) for (path, shape), sh in
             zip(jax.tree_util.tree_leaves_with_path(shapes), jax.tree.leaves(params))}

  def place(path, leaf):  # A state leaf under a parameter's path (mu['block_0']...['kernel']) and of its shape.
    keys = _dict_keys(path)
    for start in range(len(keys)):
      shape, param_sharding = by_path.get(keys[start:], (None, None))
      if shape is not None:
        return param_sharding if shape == leaf.shape else replicated
    return replicated

  opt_state = jax.tree_util.tree_map_with_path(place, jax.eval_shape(optimizer.init, shapes))
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
  schedule: optax.Schedule
  shardings: TrainState
  init: Callable[[], TrainState]  # A fresh train state (traced: see init_train_state).


def make_layout(config: ml_collections.ConfigDict, devices: list[jax.Device] | None = None,
                check_batches: bool = True) -> Layout:
  """The mesh over `devices` (default: all), the model, optimizer and train-state shardings, after
  checking config against them: mesh size, batch (unless check_batches=False, for inference) and
  parameter divisibility, the attention kernel. Each misfit is a ConfigError naming the key.

  The one place that reads the whole config to lay out a run; what it builds takes sections."""
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.logical_axis_rules(config.mesh)
  if check_batches:
    sharding.check_batch('data.batch_size', config.data.batch_size, mesh, rules, config.train.microbatches)
    sharding.check_batch('eval.batch_size', config.eval.batch_size, mesh, rules)
  attention_implementation(config.model)
  model = make_model(config.model, config.data)
  init_params, init = _init_functions(config.seed, model, kinds.of(config.model).example_batch(config.data))
  boxed = _boxed_shapes(init_params)
  optimizer = make_optimizer(config.optimizer, config.train.steps, nn.get_partition_spec(boxed),
                             1.0 / mup.width_multiplier(config.model))
  shardings = _state_shardings(boxed, optimizer, mesh, rules, config.model)
  return Layout(mesh, rules, sharding.batch_sharding(mesh, rules), model, optimizer,
                learning_rate_schedule(config.optimizer, config.train.steps), shardings,
                functools.partial(init, optimizer))


def abstract_train_state(layout: Layout) -> TrainState:
  """The train state as shapes, dtypes and shardings only: what a restore or an AOT compile needs."""
  with jax.set_mesh(None):  # As in _boxed_shapes.
    shapes = jax.eval_shape(layout.init)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, layout.shardings)


def init_train_state(layout: Layout) -> TrainState:
  """A fresh train state, each array created directly in its shards (never whole on one device)."""
  with jax.set_mesh(None):  # As in _boxed_shapes.
    return jax.jit(layout.init, out_shardings=layout.shardings)()


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
              dropout_rng: jax.Array | None = None, logits_chunk: int = 0,
              stats: dict | None = None, mtp_weight: float = 0.0) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(summed loss in nats over unmasked targets, count of those targets, mean MoE balance loss); a
  `stats` dict receives the experts' moe_sums.

  With the defaults the loss is the cross-entropy; training may add label smoothing (a share of
  the target spread over the vocabulary), z-loss (z_loss * logsumexp(logits)^2), and the experts'
  load-balancing loss (moe_balance_loss * its mean over MoE layers, per target) and the multi-token
  losses (model.mtp_depth: mtp_weight / depth times the sum of theirs, each summed over its targets,
  which `stats` gets as mtp_{k}/loss_sum and mtp_{k}/count). A dropout_rng turns dropout on.
  logits_chunk > 0 computes the logits that many positions at a time (chunked_loss_sum).
  """
  train = dropout_rng is not None
  targets_BL, mask_BL = batch['tokens'][:, 1:], batch['loss_mask'].astype(jnp.float32)
  chunked = 0 < logits_chunk < targets_BL.shape[1]
  out, aux = apply_model(model, params, batch, train=train, rngs={'dropout': dropout_rng} if train else None,
                         mutable=['aux_loss', 'moe_stats', 'mtp'], hidden=chunked)
  if stats is not None:
    stats.update(moe_sums(aux.get('moe_stats', {})))
  options = {'z_loss': z_loss, 'label_smoothing': label_smoothing}
  if chunked:
    total = chunked_loss_sum(model.config, params, out, targets_BL, mask_BL, logits_chunk, **options)
  else:
    total = jnp.sum(token_losses(out, targets_BL, **options) * mask_BL)
  count = jnp.sum(mask_BL)
  depth = model.config.get('mtp_depth', 0)
  for k in range(1, depth + 1):
    # Position i predicts token i + k + 1: its target and mask k further along, within i's document.
    ahead_BL = lambda x: jnp.pad(x[:, k:], ((0, 0), (0, k)))  # noqa: E731
    mtp_mask_BL = ahead_BL(mask_BL)
    if 'segment_ids' in batch:
      segments_BL = batch['segment_ids'][:, :-1]
      mtp_mask_BL = mtp_mask_BL * (ahead_BL(batch['segment_ids'][:, 1:]) == segments_BL)
    [hidden_BLD] = aux['mtp'][f'hidden_{k}']
    logits = lambda x: vocab_logits(model.config, params, x)  # noqa: E731
    if chunked:
      mtp_sum = chunked_loss_sum(model.config, params, hidden_BLD, ahead_BL(targets_BL), mtp_mask_BL, logits_chunk,
                                 **options)
    else:
      mtp_sum = jnp.sum(token_losses(logits(hidden_BLD), ahead_BL(targets_BL), **options) * mtp_mask_BL)
    total = total + mtp_weight / depth * mtp_sum
    if stats is not None:
      stats[f'mtp_{k}/loss_sum'], stats[f'mtp_{k}/count'] = mtp_sum, jnp.sum(mtp_mask_BL)
  balance_layers = jax.tree.leaves(aux.get('aux_loss', {}))
  balance = jnp.mean(jnp.concatenate([jnp.ravel(x) for x in balance_layers])) if balance_layers else jnp.float32(0)
  return total + moe_balance_loss * balance * count, count, balance


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               optimizer: optax.GradientTransformation, schedule: optax.Schedule, microbatches: int = 1,
               z_loss: float = 0.0, label_smoothing: float = 0.0, moe_balance_loss: float = 0.0,
               logits_chunk: int = 0, max_nonfinite_steps: int = 0,
               mtp_weight: float = 0.0) -> tuple[TrainState, dict[str, jax.Array]]:
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
    stats = {}
    total, count, balance = loss_sums(params, b, model, z_loss=z_loss, label_smoothing=label_smoothing,
                                      moe_balance_loss=moe_balance_loss, dropout_rng=rng, logits_chunk=logits_chunk,
                                      stats=stats, mtp_weight=mtp_weight)
    return total, (count, balance * count, stats)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if microbatches == 1:
    (total, (count, balance_sum, stats)), grads = grad_fn(state.params, batch, step_rng)
  else:
    def split(x):
      x = x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)
      return nn.with_logical_constraint(x, (None, 'batch') + (None,) * (x.ndim - 2))

    def accumulate(carry, xs):
      index, microbatch = xs
      (t, (c, b, s)), g = grad_fn(state.params, microbatch, jax.random.fold_in(step_rng, index))
      return jax.tree.map(jnp.add, carry, (t, c, b, s, g)), None

    microbatch_stats = jax.eval_shape(lambda: grad_fn(state.params, jax.tree.map(lambda x: split(x)[0], batch),
                                                      step_rng)[0][1][2])
    zeros = (jnp.float32(0), jnp.float32(0), jnp.float32(0),
             jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), microbatch_stats),
             jax.tree.map(jnp.zeros_like, state.params))
    (total, count, balance_sum, stats, grads), _ = jax.lax.scan(
        accumulate, zeros, (jnp.arange(microbatches), jax.tree.map(split, batch)))
  scale = 1.0 / jnp.maximum(count, 1.0)
  loss, grads = total * scale, jax.tree.map(lambda g: g * scale, grads)
  grad_norm = optax.tree.norm(grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  if model.config.moe_bias_rate:
    params = balance_router_bias(params, stats['layer_load'], model.config.moe_bias_rate)
  # Known before the update, so XLA can fuse the choice below into it. Finite gradients cannot make the
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
  for k in range(1, model.config.mtp_depth + 1):  # Each depth's own mean loss; 'loss' is the objective's.
    metrics_[f'mtp_{k}/loss'] = stats[f'mtp_{k}/loss_sum'] / jnp.maximum(stats[f'mtp_{k}/count'], 1.0)
  if model.config.moe_experts:
    metrics_['moe_balance_loss'] = balance_sum * scale
    drops = model.config.moe_impl == 'capacity' or bool(model.config.moe_ep_capacity_factor)
    metrics_ |= moe_metrics(stats, drops=drops)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, skipped_steps=skipped,
                       nonfinite_streak=streak), metrics_


def all_finite(tree: Any) -> jax.Array:
  """True (a bool scalar) when every element of every floating-point array in tree is finite."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def jit_train_step(layout: Layout, t: ml_collections.ConfigDict):
  """train_step of the layout's model and optimizer under jit with explicit shardings, the state
  donated; `t` is the train section. Trace it inside sharding.activate."""
  replicated = jax.sharding.NamedSharding(layout.mesh, jax.sharding.PartitionSpec())
  return jax.jit(functools.partial(train_step, model=layout.model, optimizer=layout.optimizer,
                                   schedule=layout.schedule, microbatches=t.microbatches, z_loss=t.z_loss,
                                   label_smoothing=t.label_smoothing, moe_balance_loss=t.moe_balance_loss,
                                   logits_chunk=t.logits_chunk, max_nonfinite_steps=t.max_nonfinite_steps,
                                   mtp_weight=t.mtp_weight),
                 in_shardings=(layout.shardings, layout.batch_sharding), out_shardings=(layout.shardings, replicated),
                 donate_argnums=0)


def eval_step(params, batch: dict[str, jax.Array], token_bytes_V: jax.Array, *,
              model: nn.Module) -> dict[str, jax.Array]:
  """Sums for loss, perplexity and bits per byte: nats, target tokens, and bytes those targets spell."""
  total, count, _ = loss_sums(params, batch, model)
  target_bytes_BL = token_bytes_V[batch['tokens'][:, 1:]] * batch['loss_mask']
  return {'loss_sum': total, 'tokens': count, 'bytes': jnp.sum(target_bytes_BL.astype(jnp.float32))}


def position_sums(params, batch: dict[str, jax.Array], token_bytes_V: jax.Array, *,
                  model: nn.Module) -> dict[str, jax.Array]:
  """eval_step's sums split by the context each target had: [L] arrays whose entry i sums the targets
  predicted from i + 1 tokens (of their document, with segment ids; else of the row)."""
  targets_BL, mask_BL = batch['tokens'][:, 1:], batch['loss_mask'].astype(jnp.float32)
  losses_BL = token_losses(apply_model(model, params, batch), targets_BL) * mask_BL
  length = targets_BL.shape[1]
  if 'segment_ids' in batch:
    positions_BL = segment_positions(batch['segment_ids'][:, :-1])
  else:
    positions_BL = jnp.broadcast_to(jnp.arange(length), targets_BL.shape)
  by_position = lambda values_BL: jnp.zeros(length, jnp.float32).at[positions_BL].add(values_BL)
  return {'loss_sum': by_position(losses_BL), 'tokens': by_position(mask_BL),
          'bytes': by_position(token_bytes_V[targets_BL] * mask_BL)}


def jit_eval_step(model: nn.Module, param_shardings, batch_sharding: jax.sharding.NamedSharding):
  replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec())
  return jax.jit(functools.partial(eval_step, model=model), in_shardings=(param_shardings, batch_sharding, replicated),
                 out_shardings=replicated)


def evaluate_params(d: ml_collections.ConfigDict, corpus: pipeline.Corpus | pipeline.Mixture, params,
                    jitted_eval_step, batch_sharding: jax.sharding.NamedSharding, token_bytes_V: np.ndarray, *,
                    seed: int, batch_size: int, num_batches: int = 0) -> dict[str, float]:
  """Loss, perplexity and bits per byte of params on the eval split of data section `d` (num_batches=0:
  all of it), in batches of batch_size, each process feeding its rows of every batch. Call inside
  sharding.activate. A mixture is evaluated on each source's split ('SOURCE/loss', ... for each,
  num_batches each) and on all of them together ('loss', ...)."""
  start, stop = sharding.process_rows(batch_sharding, batch_size)

  def sums_of(c: pipeline.Corpus) -> dict[str, float]:
    outs = [jitted_eval_step(params,  # Fetched once, at the end.
                             sharding.global_batch({k: v[start:stop] for k, v in batch.items()}, batch_sharding,
                                                   batch_size),
                             token_bytes_V)
            for batch in pipeline.eval_batches(d, c, seed, batch_size, num_batches)]
    if not outs:
      raise ConfigError(f'data.eval_split={d.eval_split!r} holds no text to evaluate on')
    return {k: float(np.sum([np.float64(o[k]) for o in sharding.to_host(outs)])) for k in outs[0]}

  def summary(sums: dict[str, float]) -> dict[str, float]:
    return metrics.eval_summary(sums['loss_sum'], sums['tokens'], sums['bytes'])

  if not isinstance(corpus, pipeline.Mixture):
    return summary(sums_of(corpus))
  each = {label: sums_of(c) for label, c in corpus.corpora.items()}
  together = summary({k: sum(s[k] for s in each.values()) for k in ('loss_sum', 'tokens', 'bytes')})
  return together | {f'{label}/{k}': v for label, sums in each.items() for k, v in summary(sums).items()}


def padded_token_bytes(tokenizer, vocab_size: int) -> np.ndarray:
  """Bytes per token id for all vocab_size rows of the model (0 beyond the tokenizer's)."""
  return np.pad(tokenizer.token_bytes, (0, vocab_size - tokenizer.vocab_size))
