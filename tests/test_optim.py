import jax
import jax.numpy as jnp
import numpy as np
import optax

from lm import config as config_lib
from lm.optim import learning_rate_schedule, make_optimizer, weight_decay_mask


def _config(**optimizer):
  config = config_lib.base_config()
  config.optimizer.update(learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1, **optimizer)
  config.train.steps = 110
  return config


def _section(**optimizer):
  """The optimizer section and train.steps, as lm.optim takes them."""
  config = _config(**optimizer)
  return config_lib.section(config, 'optimizer'), config.train.steps


def test_schedule_warms_up_linearly_then_decays_by_cosine():
  schedule = learning_rate_schedule(*_section())
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(5)), 5e-4, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(10)), 1e-3, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(60)), 1e-4 + 0.5 * 9e-4, rtol=1e-5)  # Cosine midpoint.
  np.testing.assert_allclose(float(schedule(110)), 1e-4, rtol=1e-5)


def test_weight_decay_applies_to_kernels_only():
  params = {'block': {'mlp': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)}, 'ln': {'scale': jnp.ones(2)}},
            'token_embedding': {'embedding': jnp.ones((3, 2))}, 'position_embedding': jnp.ones((4, 2))}
  mask = weight_decay_mask(params)
  assert mask['block']['mlp']['kernel'] and not mask['block']['mlp']['bias']
  assert not mask['block']['ln']['scale'] and not mask['token_embedding']['embedding']
  assert not mask['position_embedding']
  # With zero gradients only decay moves a parameter, and only the kernel moves.
  optimizer = make_optimizer(*_section(weight_decay=0.5))
  state = optimizer.init(params)
  for _ in range(12):
    updates, state = optimizer.update(jax.tree.map(jnp.zeros_like, params), state, params)
  moved = jax.tree.map(lambda u: bool(jnp.any(u != 0)), updates)
  assert moved['block']['mlp']['kernel']
  assert not any(jax.tree.leaves({k: v for k, v in moved.items() if k != 'block'}))
  assert not moved['block']['mlp']['bias'] and not moved['block']['ln']['scale']


def test_gradients_are_clipped_by_global_norm():
  params = {'w': {'kernel': jnp.zeros(4)}}
  grads = {'w': {'kernel': jnp.full(4, 100.0)}}
  clipped = make_optimizer(*_section(grad_clip_norm=1.0, weight_decay=0.0))
  plain = make_optimizer(*_section(grad_clip_norm=0.0, weight_decay=0.0))
  # Adam normalises scale away on step one; compare the second moment the clipped gradient leaves.
  state = clipped.init(params)
  _, state = clipped.update(grads, state, params)
  nu = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)][0].nu
  np.testing.assert_allclose(np.asarray(nu['w']['kernel']), (1 - 0.95) * 0.25, rtol=1e-5)  # (1/2)^2 per entry.
  state = plain.init(params)
  _, state = plain.update(grads, state, params)
  nu = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)][0].nu
  np.testing.assert_allclose(np.asarray(nu['w']['kernel']), (1 - 0.95) * 1e4, rtol=1e-5)


def test_optimizer_state_keeps_its_structure_when_clipping_is_toggled():
  params = {'w': {'kernel': jnp.zeros((2, 2)), 'bias': jnp.zeros(2)}}
  structures = {jax.tree.structure(make_optimizer(*_section(grad_clip_norm=c)).init(params)) for c in (0.0, 1.0)}
  assert len(structures) == 1  # So a run may resume with clipping switched on or off.
