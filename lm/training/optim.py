"""The optax optimizer: AdamW, Lion, Adafactor, Muon or SGD behind global-norm clipping, under one of
the learning-rate schedules, with weight decay on matmul kernels only."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import optax

from lm.config.run import decay_start

BATCH_AXES = ('layers', 'expert')  # Logical axes along which a parameter stacks independent matrices.


def learning_rate_schedule(o: ml_collections.ConfigDict, steps: int) -> optax.Schedule:
  """0 -> peak (o.learning_rate) over warmup_steps, then o.schedule until `steps` (train.steps):

  cosine, linear: down to peak * min_lr_ratio at `steps`; constant: the peak; inverse_sqrt:
  peak * sqrt(warmup_steps / step); wsd: the peak until decay_start, then down to peak * min_lr_ratio
  at `steps` in decay_shape (linear; cosine; sqrt: 1 - sqrt of the decay's progress). The stable
  phase does not depend on `steps`, so a WSD run may be extended by raising train.steps."""
  peak, end, warmup = o.learning_rate, o.learning_rate * o.min_lr_ratio, o.warmup_steps
  if o.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=peak, warmup_steps=warmup,
                                              decay_steps=steps, end_value=end)
  if o.schedule == 'inverse_sqrt':
    def inverse_sqrt(step):
      step = jnp.asarray(step, jnp.float32)
      after = peak * jnp.sqrt(max(warmup, 1) / jnp.maximum(step, 1.0))
      return jnp.where(step < warmup, peak * step / max(warmup, 1), after) if warmup else after
    return inverse_sqrt
  if o.schedule == 'constant':
    after, start = optax.constant_schedule(peak), warmup
  elif o.schedule == 'linear':
    after, start = optax.linear_schedule(peak, end, steps - warmup), warmup
  else:  # wsd
    start = decay_start(o, steps)
    length = steps - start
    shape = {'linear': lambda f: 1 - f, 'cosine': lambda f: 0.5 * (1 + jnp.cos(jnp.pi * f)),
             'sqrt': lambda f: 1 - jnp.sqrt(f)}[o.decay_shape]
    def after(step):  # Steps counted from the start of the decay.
      progress = jnp.clip(jnp.asarray(step, jnp.float32) / max(length, 1), 0.0, 1.0)
      return end + (peak - end) * shape(progress)
  warmup_schedule = optax.linear_schedule(0.0, peak, warmup)
  if o.schedule == 'wsd':
    stable = optax.constant_schedule(peak)
    return optax.join_schedules([warmup_schedule, stable, after], [warmup, start])
  return optax.join_schedules([warmup_schedule, after], [start])


def weight_decay_mask(params) -> object:
  """True for matmul kernels only (`kernel`, and the experts' `*_kernel`): biases, norm scales and
  embeddings are not decayed."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key.endswith('kernel'), params)


def _matrix_axes(axes: jax.sharding.PartitionSpec) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
  """(input axes, output axes) of a hidden matmul kernel with logical axes `axes` (one that reads or
  writes the residual stream, `embed`, from or to heads or MLP units), or None for a parameter that is
  not one: a bias or norm scale, an embedding table or output layer (a vocab axis), the position table
  (None, embed) and the MoE router (embed, None)."""
  names = tuple(axes)
  own = [i for i, name in enumerate(names) if name not in BATCH_AXES]
  if len(own) < 2 or 'embed' not in names or 'vocab' in names or None in names:
    return None
  if names[own[0]] == 'embed':  # [embed, ...]: the residual stream in, heads or MLP units out.
    return (own[0],), tuple(own[1:])
  return tuple(own[:-1]), (own[-1],)  # [..., embed]: back into the residual stream.


def hidden_matrix_mask(param_axes) -> object:
  """True for each hidden matrix (`_matrix_axes`): what Muon orthogonalises and muP scales by width."""
  return jax.tree.map(lambda axes: _matrix_axes(axes) is not None, param_axes)


def muon_dimension_numbers(param_axes) -> object:
  """For each parameter (param_axes: their logical axes, as PartitionSpecs), Muon's
  MuonDimensionNumbers (input axes contract, output axes stay; 'layers' and 'expert' axes are
  batched: each layer's and each expert's matrix is orthogonalised on its own), or None where AdamW
  updates it instead: embeddings, output layer, router, norms and biases."""
  def numbers(axes):
    matrix = _matrix_axes(axes)
    return None if matrix is None else optax.contrib.MuonDimensionNumbers(*matrix)
  return jax.tree.map(numbers, param_axes)


def _scale_muon_update(dimension_numbers, consistent_rms: float) -> optax.GradientTransformation:
  """Orthogonalised updates have RMS about 1/sqrt(max(fan_in, fan_out)): times consistent_rms *
  sqrt(max(fan_in, fan_out)) their RMS is consistent_rms, like AdamW's (Liu et al. 2025), so one
  learning rate serves both parts; consistent_rms=0 takes Jordan's sqrt(max(1, fan_out / fan_in)).
  (optax's muon has this scaling but does not export it apart from its own AdamW side.)"""
  def scale(update, numbers):
    if not isinstance(numbers, optax.contrib.MuonDimensionNumbers):
      return update
    fan_in = math.prod(update.shape[i] for i in numbers.reduction_axis)
    fan_out = math.prod(update.shape[i] for i in numbers.output_axis)
    factor = consistent_rms * math.sqrt(max(fan_in, fan_out)) if consistent_rms else math.sqrt(max(1, fan_out / fan_in))
    return update * factor

  def update_fn(updates, state, params=None):
    del params
    is_leaf = lambda x: isinstance(x, (optax.contrib.MuonDimensionNumbers, optax.MaskedNode))
    return jax.tree.map(lambda n, u: scale(u, n), dimension_numbers, updates, is_leaf=is_leaf), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _muon(o: ml_collections.ConfigDict, schedule: optax.Schedule, adam_schedule: optax.Schedule,
          param_axes) -> optax.GradientTransformation:
  """Muon on the hidden matrices, AdamW (o.b1, o.b2, o.eps) on the rest; decoupled weight decay on both,
  masked as everywhere."""
  numbers = muon_dimension_numbers(param_axes)
  is_leaf = lambda n: n is None or isinstance(n, optax.contrib.MuonDimensionNumbers)
  labels = jax.tree.map(lambda n: 'adam' if n is None else 'muon', numbers, is_leaf=is_leaf)
  masked = lambda tree: jax.tree.map(lambda n: optax.MaskedNode() if n is None else n, tree, is_leaf=is_leaf)
  muon = optax.chain(
      optax.contrib.scale_by_muon(ns_steps=o.muon_ns_steps, beta=o.muon_momentum, nesterov=o.muon_nesterov,
                                  weight_dimension_numbers=masked(numbers)),
      _scale_muon_update(masked(numbers), o.muon_consistent_rms),
      optax.add_decayed_weights(o.weight_decay),  # Muon's parameters are all kernels.
      optax.scale_by_learning_rate(schedule))
  adam = optax.adamw(adam_schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=weight_decay_mask)
  return optax.partition({'muon': muon, 'adam': adam}, labels)


def make_optimizer(o: ml_collections.ConfigDict, steps: int, param_axes=None,
                   hidden_learning_rate_scale: float = 1.0) -> optax.GradientTransformation:
  """The optimizer section `o` says, its schedule ending at `steps` (train.steps). param_axes (the
  parameters' logical axes as PartitionSpecs, from the model's boxed init) tell Muon, and muP's
  hidden_learning_rate_scale (1 / its width multiplier; 1 leaves the chain as it is), which parameters
  are hidden matrices.

  Weight decay is decoupled and multiplied by the learning rate for all (AdamW's convention; for SGD
  it is L2 added to the gradient), masked by weight_decay_mask."""
  # Clipping is always in the chain (at infinity when off) so that turning it on or off on
  # resume leaves the optimizer state's structure unchanged.
  clip = optax.clip_by_global_norm(o.grad_clip_norm if o.grad_clip_norm > 0 else float('inf'))
  schedule = learning_rate_schedule(o, steps)
  if o.name == 'adamw':
    inner = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=weight_decay_mask)
  elif o.name == 'lion':
    inner = optax.lion(schedule, b1=o.lion_b1, b2=o.lion_b2, weight_decay=o.weight_decay, mask=weight_decay_mask)
  elif o.name == 'adafactor':
    # optax.adafactor adds its decay after the learning rate: here the rate scales both, as for AdamW.
    inner = optax.chain(
        optax.adafactor(None, decay_rate=o.adafactor_decay_rate, factored=o.adafactor_factored,
                        multiply_by_parameter_scale=o.adafactor_parameter_scale,
                        clipping_threshold=o.adafactor_clipping_threshold or None,
                        momentum=o.adafactor_momentum or None, weight_decay_rate=o.weight_decay or None,
                        weight_decay_mask=weight_decay_mask),
        optax.scale_by_learning_rate(schedule, flip_sign=False))
  elif o.name == 'sgd':
    inner = optax.chain(optax.add_decayed_weights(o.weight_decay, weight_decay_mask),
                        optax.sgd(schedule, momentum=o.sgd_momentum, nesterov=o.sgd_nesterov))
  else:  # muon
    if param_axes is None:
      raise ValueError("optimizer.name='muon' needs param_axes: the parameters' logical axes")
    ratio = o.muon_adam_learning_rate / o.learning_rate if o.muon_adam_learning_rate else 1.0
    adam_schedule = schedule if ratio == 1.0 else (lambda step: schedule(step) * ratio)
    inner = _muon(o, schedule, adam_schedule, param_axes)
  if hidden_learning_rate_scale == 1.0:
    return optax.chain(clip, inner)
  if param_axes is None:
    raise ValueError('a hidden_learning_rate_scale needs param_axes: the parameters\' logical axes')
  # After the inner update, so that decoupled weight decay (learning rate times decay) scales with it.
  hidden = optax.masked(optax.scale(hidden_learning_rate_scale), hidden_matrix_mask(param_axes))
  return optax.chain(clip, inner, hidden)
