"""The expert mesh axis on 8 simulated devices: dropless experts exchanged all-to-all train like one device."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import tiny_config
from lm.config import ConfigError
from lm.data import pipeline
from lm.nn import expert_parallel
from lm.nn.moe import MoeMlp
from lm.parallel import sharding
from lm.training import checkpoint, train
from test_moe import _moe_config
from test_sharding import SHARDABLE, assert_trees_close, corpus_and_batches, train_on  # noqa: F401 (a fixture)

# DeepSeek-V3's recipe in small: sigmoid routing over 8 fine-grained experts, a shared expert, bias balancing.
EXPERTS = {'model.moe_experts': 8, 'model.moe_top_k': 2, 'model.moe_impl': 'dropless', 'model.mlp': 'swiglu',
           'model.moe_mlp_dim': 16, 'model.moe_shared_experts': 1, 'model.moe_router_score': 'sigmoid',
           'model.moe_router_bias': True, 'model.moe_bias_rate': 0.01, 'model.moe_capacity_factor': 0.0}


def _config(tfds_dir, play_files, **extra):
  return tiny_config(tfds_dir, play_files, **(SHARDABLE | EXPERTS | extra))


@pytest.fixture(scope='module')
def one_device(tfds_dir, play_files, corpus_and_batches):  # noqa: F811 (the fixture imported above)
  return train_on(_config(tfds_dir, play_files), jax.devices()[:1], corpus_and_batches[1])


@pytest.mark.slow
@pytest.mark.parametrize('shape', ['expert=8', 'fsdp=2,expert=4', 'data=2,expert=2,tensor=2'])
def test_expert_meshes_train_like_one_device(tfds_dir, play_files, corpus_and_batches, one_device, shape):  # noqa: F811
  losses, state = train_on(_config(tfds_dir, play_files, **{'mesh.shape': shape}), jax.devices(),
                           corpus_and_batches[1])
  ref_losses, ref_state = one_device
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert losses[-1] < losses[0]
  assert_trees_close(state.params, ref_state.params)
  assert_trees_close(state.opt_state, ref_state.opt_state)
  bias = np.asarray(state.params['block_0']['moe']['router_bias'])
  assert np.abs(bias).max() > 0  # The balancing moved it, the same on every mesh.
  assert jax.tree.leaves(state.params['block_0']['moe']['up_kernel'])[0].sharding.spec[0] == 'expert'


@pytest.mark.slow
def test_a_checkpoint_from_an_expert_mesh_restores_on_others(tfds_dir, play_files, corpus_and_batches,  # noqa: F811
                                                             tmp_path):
  corpus, batches = corpus_and_batches
  config = _config(tfds_dir, play_files, **{'mesh.shape': 'expert=8'})
  _, state = train_on(config, jax.devices(), batches[:3])
  checkpointer = checkpoint.Checkpointer(tmp_path, config.checkpoint)
  checkpointer.save(3, state, iter(pipeline.train_dataset(config.data, corpus, config.seed)))
  checkpointer.close()
  expected, _ = train_on(config, jax.devices(), batches[3:], state)
  for shape, devices in [('fsdp=2,expert=4', jax.devices()), ('data=1', jax.devices()[:1])]:
    other = _config(tfds_dir, play_files, **{'mesh.shape': shape})
    layout = train.make_layout(other, devices)
    restorer = checkpoint.Checkpointer(tmp_path, other.checkpoint)
    restored = restorer.restore(3, train.abstract_train_state(layout),
                                iter(pipeline.train_dataset(other.data, corpus, other.seed)))
    restorer.close()
    losses, _ = train_on(other, devices, batches[3:], restored)
    np.testing.assert_allclose(losses, expected, rtol=1e-5, err_msg=shape)


def _layer(**knobs):
  config = _moe_config(moe_experts=8, moe_top_k=2, moe_impl='dropless', mlp='swiglu', **knobs)
  return MoeMlp(ml_collections.FrozenConfigDict(config.model)), config


def test_the_exchange_buffers_hold_the_worst_case_unless_bounded():
  # 12 tokens, top-2 of 8 experts on 4 shards (2 each): a token sends at most 2 pairs to one shard.
  assert expert_parallel.exchange_rows(12, 2, 8, 4, 0.0) == 24
  assert expert_parallel.exchange_rows(12, 2, 8, 8, 0.0) == 12  # One expert per shard: one pair per token.
  assert expert_parallel.exchange_rows(12, 2, 8, 4, 1.5) == 9  # 1.5 x 12 x 2 / 4.
  assert expert_parallel.exchange_rows(12, 2, 8, 4, 100.0) == 24


@pytest.mark.slow  # 13 s on 2 cores.
def test_a_bounded_exchange_drops_and_counts_what_overflows():
  """expert=8 with moe_ep_capacity_factor=1: the rows over each device pair's buffer are dropped (their
  pairs contribute nothing, the others are exact) and counted."""
  layer, config = _layer(moe_ep_capacity_factor=1.0, use_bias=False)
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 6, 16))
  params = nn.meta.unbox(layer.init(jax.random.PRNGKey(2), x)['params'])
  apply = lambda p, x: layer.apply({'params': p}, x, mutable=['moe_stats'])
  exact, _ = apply(params, x)
  config.mesh.shape = 'expert=8'
  mesh, rules = sharding.make_mesh(config.mesh), sharding.logical_axis_rules(config.mesh)
  with sharding.activate(mesh, rules):
    bounded, stats = jax.jit(apply)(params, x)
  dropped = float(stats['moe_stats']['dropped'][0])
  changed = np.abs(np.asarray(bounded - exact)).max(-1) > 1e-6
  assert 0 < dropped <= 2 * 48 and 0 < changed.sum() <= dropped
  unbounded_layer, _ = _layer(use_bias=False)
  with sharding.activate(mesh, rules):
    unbounded, stats = jax.jit(lambda p, x: unbounded_layer.apply({'params': p}, x, mutable=['moe_stats']))(params, x)
  np.testing.assert_allclose(unbounded, exact, rtol=1e-5, atol=1e-6)
  assert 'dropped' not in stats['moe_stats']


@pytest.mark.parametrize('overrides, message', [
    ({'mesh.shape': 'expert=8', 'model.moe_experts': 4, 'model.moe_top_k': 2},
     'model.moe_experts=4 does not split over mesh expert=8'),
    ({'mesh.shape': 'expert=8', 'data.batch_size': 4}, 'data.batch_size=4 must be divisible by the 8 batch shards'),
])
def test_expert_meshes_that_do_not_fit_are_refused(tfds_dir, play_files, overrides, message):
  with pytest.raises(ConfigError) as error:
    train.make_layout(_config(tfds_dir, play_files, **overrides))
  assert str(error.value).startswith(message), str(error.value)


@pytest.mark.slow  # 9 s on 2 cores.
def test_without_an_expert_axis_each_device_sorts_its_own_pairs_equal_to_no_mesh():
  """fsdp=4,tensor=2: the dropless layer runs per device (nothing exchanged, hidden units split over
  tensor), forward and gradients equal to no mesh (1e-5)."""
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 6, 16))
  layer, config = _layer(use_bias=True)
  params = nn.meta.unbox(layer.init(jax.random.PRNGKey(2), x)['params'])
  loss = lambda p: jnp.sum(layer.apply({'params': p}, x) ** 2)
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  config.mesh.shape = 'fsdp=4,tensor=2'
  mesh, rules = sharding.make_mesh(config.mesh), sharding.logical_axis_rules(config.mesh)
  with sharding.activate(mesh, rules):
    plan = expert_parallel.plan_of(layer.config)
    assert plan.shards == 1 and plan.batch_axes == ('fsdp',) and plan.mlp_axes == ('tensor',)
    value_mesh, grads_mesh = jax.jit(jax.value_and_grad(loss))(params)
  np.testing.assert_allclose(value_mesh, value, rtol=1e-5)
  assert_trees_close(grads_mesh, grads)
