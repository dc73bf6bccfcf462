import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
from optax.contrib import MuonDimensionNumbers
import pytest

from lm import config as config_lib
from lm import kinds
from lm.kinds import make_model
from lm.training import train
from lm.training.optim import learning_rate_schedule, make_optimizer, muon_dimension_numbers, weight_decay_mask


def _config(**optimizer):
  config = config_lib.base_config()
  config.optimizer.update(learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1, **optimizer)
  config.train.steps = 110
  return config


def _section(**optimizer):
  """The optimizer section and train.steps, as lm.training.optim takes them."""
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


def _rates(steps, **optimizer):
  schedule = learning_rate_schedule(*_section(**optimizer))
  return np.array([float(schedule(s)) for s in steps])


def test_each_schedule_follows_its_formula():
  # Peak 1e-3 after 10 warmup steps, train.steps 110, min_lr_ratio 0.1.
  np.testing.assert_allclose(_rates([5, 10, 60, 110], schedule='linear'), [5e-4, 1e-3, 5.5e-4, 1e-4], rtol=1e-5)
  np.testing.assert_allclose(_rates([5, 10, 110], schedule='constant'), [5e-4, 1e-3, 1e-3], rtol=1e-6)
  np.testing.assert_allclose(_rates([5, 10, 40, 90], schedule='inverse_sqrt'),
                             [5e-4, 1e-3, 1e-3 / 2, 1e-3 / 3], rtol=1e-6)
  # WSD: the last 20% (22 steps) decay from step 88.
  for shape, at_half in (('linear', 0.55), ('cosine', 0.55), ('sqrt', 0.1 + 0.9 * (1 - np.sqrt(0.5)))):
    rates = _rates([5, 10, 50, 88, 99, 110], schedule='wsd', decay_fraction=0.2, decay_shape=shape)
    np.testing.assert_allclose(rates, [5e-4, 1e-3, 1e-3, 1e-3, at_half * 1e-3, 1e-4], rtol=1e-5, err_msg=shape)


def test_schedule_and_optimizer_refusals_name_the_key():
  bad = {'optimizer.name': 'adam', 'optimizer.schedule': 'step', 'optimizer.decay_shape': 'exp'}
  for name, value in bad.items():
    with pytest.raises(config_lib.ConfigError, match=rf"^{name}='{value}': must be one of '"):
      config_lib.override(config_lib.base_config(), {name: value})
  config = config_lib.override(_config(), {'optimizer.schedule': 'wsd', 'optimizer.decay_fraction': 0.95})
  with pytest.raises(config_lib.ConfigError, match=r'^optimizer.decay_fraction=0.95 starts the decay before '
                                                    r'optimizer.warmup_steps=10 ends \(train.steps=110\)$'):
    config_lib.validate(config)
  with pytest.raises(config_lib.ConfigError, match=r"^checkpoint.init_mode='full' needs checkpoint.init_from"):
    config_lib.validate(config_lib.override(_config(), {'checkpoint.init_mode': 'full'}))


def _param_axes(**model):
  config = config_lib.override(config_lib.base_config(), {'model.num_layers': 2, 'model.d_model': 64,
                                                          'model.mlp_dim': 128, **model})
  m = make_model(config.model, config.data)
  batch = kinds.of(config.model).example_batch(config.data)
  boxed = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), batch['tokens'][:, :-1])['params'])
  return nn.get_partition_spec(boxed)


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
  axes = _param_axes(**{'model.scan_layers': True, 'model.tie_embeddings': False, 'model.num_kv_heads': 2})
  numbers = {jax.tree_util.keystr(path): n for path, n in jax.tree_util.tree_flatten_with_path(
      muon_dimension_numbers(axes), is_leaf=lambda n: n is None or isinstance(n, MuonDimensionNumbers))[0]}
  blocks = "['blocks']"  # Scanned: axis 0 is the layer, each layer's matrix on its own.
  assert numbers[f"{blocks}['attention']['query']['kernel']"] == MuonDimensionNumbers((1,), (2, 3))
  assert numbers[f"{blocks}['attention']['key']['kernel']"] == MuonDimensionNumbers((1,), (2, 3))
  assert numbers[f"{blocks}['attention']['out']['kernel']"] == MuonDimensionNumbers((1, 2), (3,))
  assert numbers[f"{blocks}['mlp']['up']['kernel']"] == MuonDimensionNumbers((1,), (2,))
  assert numbers[f"{blocks}['mlp']['down']['kernel']"] == MuonDimensionNumbers((1,), (2,))
  adamw = [k for k, n in numbers.items() if n is None]
  assert sorted(adamw) == sorted(k for k in numbers if not k.endswith("['kernel']") or 'output' in k)
  assert "['output']['kernel']" in adamw and "['token_embedding']['embedding']" in adamw
  assert "['position_embedding']" in adamw and f"{blocks}['ln_mlp']['scale']" in adamw
  moe = muon_dimension_numbers(_param_axes(**{'model.moe_experts': 4}))['block_0']['moe']
  assert moe['up_kernel'] == MuonDimensionNumbers((1,), (2,))  # Per expert.
  assert moe['down_kernel'] == MuonDimensionNumbers((1,), (2,)) and moe['router_kernel'] is None


def test_muon_orthogonalises_matrix_updates_and_adamw_updates_the_rest():
  axes = {'w': {'kernel': P('embed', 'mlp')}, 'b': P('mlp'), 'e': {'embedding': P('vocab', 'embed')}}
  rng = np.random.default_rng(0)
  params = {'w': {'kernel': jnp.zeros((64, 32))}, 'b': jnp.zeros(32), 'e': {'embedding': jnp.zeros((16, 64))}}
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  common = dict(weight_decay=0.0, grad_clip_norm=0.0, schedule='constant')
  muon = make_optimizer(*_section(name='muon', muon_consistent_rms=0.0, **common), param_axes=axes)
  state = muon.init(params)
  for _ in range(10):  # Past the 10 warmup steps: learning rate 1e-3.
    updates, state = muon.update(grads, state, params)
  singular = np.linalg.svd(np.asarray(updates['w']['kernel']) / -1e-3, compute_uv=False)  # Learning rate 1e-3.
  assert 0.6 < singular.min() and singular.max() < 1.3  # Orthogonalised: all singular values near 1 ...
  raw = np.linalg.svd(np.asarray(grads['w']['kernel']), compute_uv=False)
  assert raw.max() / raw.min() > 3  # ... which the gradient's are not.
  adamw = make_optimizer(*_section(name='adamw', **common))
  state = adamw.init(params)
  for _ in range(10):
    expected, state = adamw.update(grads, state, params)
  for name in ('b', 'e'):
    np.testing.assert_allclose(jax.tree.leaves(updates[name]), jax.tree.leaves(expected[name]), rtol=1e-6)


def test_adafactor_factored_moments_are_replicated_and_the_rest_sharded():
  config = config_lib.override(config_lib.base_config(), {
      'optimizer.name': 'adafactor', 'model.d_model': 128, 'model.mlp_dim': 256, 'model.num_layers': 1,
      'model.vocab_size': 512, 'mesh.shape': (1, 8, 1), 'data.batch_size': 8, 'eval.batch_size': 8})
  layout = train.make_layout(config_lib.validate(config))
  shapes = jax.eval_shape(layout.init).opt_state
  named = [(jax.tree_util.keystr(path), sh.spec) for (path, _), sh in
           zip(jax.tree_util.tree_leaves_with_path(shapes), jax.tree.leaves(layout.shardings.opt_state), strict=True)]
  spec = lambda suffix: [spec for path, spec in named if path.endswith(suffix)]
  # The [128, 256] MLP kernel's row and column statistics: small, replicated; its full-size slot unused.
  assert spec(".v_row['block_0']['mlp']['up']['kernel']") == spec(".v_col['block_0']['mlp']['up']['kernel']") == [P()]
  assert spec(".v['block_0']['ln_mlp']['scale']") == [P('fsdp')]  # Unfactored: sharded like the parameter.
  assert spec(".v['block_0']['attention']['query']['kernel']") == [P('fsdp', 'tensor', None)]
