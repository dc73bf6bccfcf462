"""The optax optimizer: AdamW with linear warmup, cosine decay and global-norm clipping."""

from __future__ import annotations

import jax
import optax

from lm.config import Optimizer


def learning_rate_schedule(o: Optimizer, steps: int) -> optax.Schedule:
  """0 -> peak over warmup_steps, then cosine to peak * min_lr_ratio at `steps` (train.steps).
  `o` is the optimizer section (lm.config.section(config, 'optimizer'), or config.optimizer)."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.learning_rate, warmup_steps=o.warmup_steps,
      decay_steps=steps, end_value=o.learning_rate * o.min_lr_ratio)


def weight_decay_mask(params) -> object:
  """True for matmul kernels only (`kernel`, and the experts' `*_kernel`): biases, norm scales and
  embeddings are not decayed."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key.endswith('kernel'), params)


def make_optimizer(o: Optimizer, steps: int) -> optax.GradientTransformation:
  """AdamW as the optimizer section `o` says, its schedule ending at `steps` (train.steps)."""
  # Clipping is always in the chain (at infinity when off) so that turning it on or off on
  # resume leaves the optimizer state's structure unchanged.
  clip = optax.clip_by_global_norm(o.grad_clip_norm if o.grad_clip_norm > 0 else float('inf'))
  return optax.chain(clip, optax.adamw(learning_rate_schedule(o, steps), b1=o.b1, b2=o.b2, eps=o.eps,
                                       weight_decay=o.weight_decay, mask=weight_decay_mask))
