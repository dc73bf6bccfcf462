"""Sharded training on 8 simulated CPU devices equals the single-device run."""

from __future__ import annotations

import itertools
import json

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from conftest import tiny_config
from lm.config import ConfigError, flatten
from lm.data import pipeline
from lm.nn.model import stack_layers
from lm.parallel import sharding
from lm.training import checkpoint, train
from lm.training.optim import make_optimizer

# Sizes that split over every mesh below: 4 heads, widths and vocab divisible by 8, 8 rows per batch.
SHARDABLE = {'model.num_heads': 4, 'data.batch_size': 8, 'train.steps': 20}
STEPS = 5


@pytest.fixture(scope='module')
def corpus_and_batches(tfds_dir, play_files, tmp_path_factory):
  config = tiny_config(tfds_dir, play_files, **SHARDABLE)
  corpus = pipeline.load_corpus(config.data, config.model.vocab_size, tmp_path_factory.mktemp('tok'))
  batches = list(itertools.islice(iter(pipeline.train_dataset(config.data, corpus, config.seed)), STEPS))
  return corpus, batches


_STEPS = {}


def _jitted_step(config, devices):
  """(mesh, rules, model, optimizer, state shardings, batch sharding, jitted train step) for config on a
  mesh over devices: one per config and mesh (the mesh.shape key aside, which the mesh itself says), so
  that tests training the same model on the same mesh share one compile."""
  mesh = sharding.make_mesh(config.mesh, devices)
  flat = {k: v for k, v in flatten(config).items() if k != 'mesh.shape'}
  key = (json.dumps(flat, sort_keys=True, default=str), tuple(d.id for d in mesh.devices.flat),
         tuple(mesh.shape.items()))
  if key not in _STEPS:
    layout = train.make_layout(config, devices)
    _STEPS[key] = (layout, train.jit_train_step(layout, config.train))
  return _STEPS[key]


def train_on(config, devices, batches, state=None):
  """STEPS (or len(batches)) train steps on a mesh over `devices`, from a fresh state initialised in its
  shards on that mesh, or from `state` placed there: (losses, final state)."""
  layout, step = _jitted_step(config, devices)
  with sharding.activate(layout.mesh, layout.rules):
    state = train.init_train_state(layout) if state is None else jax.device_put(state, layout.shardings)
    losses = []
    for batch in batches:
      state, metrics = step(state, sharding.global_batch(batch, layout.batch_sharding, config.data.batch_size))
      losses.append(float(metrics['loss']))
  return np.array(losses), state


@pytest.fixture(scope='module')
def initial_state(tfds_dir, play_files):
  """The SHARDABLE model's fresh train state, on the host: where tests start that are not about
  initialisation (each jitted init costs a compile as long as a train step's)."""
  config = tiny_config(tfds_dir, play_files, **SHARDABLE)
  layout = train.make_layout(config, jax.devices()[:1])
  with sharding.activate(layout.mesh, layout.rules):
    return jax.device_get(train.init_train_state(layout))


@pytest.fixture(scope='module')
def single_device(tfds_dir, play_files, corpus_and_batches, initial_state):
  config = tiny_config(tfds_dir, play_files, **SHARDABLE)
  return train_on(config, jax.devices()[:1], corpus_and_batches[1], initial_state)


def assert_trees_close(a, b, rtol=1e-5):
  """Every array of a within rtol of b's, relative to b's norm (elementwise, a value near zero
  would count rounding noise as a large relative error)."""
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    assert x.shape == y.shape
    error = np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)
    assert error <= rtol, f'{jax.tree_util.keystr(path)}: relative error {error:.2e}'


@pytest.mark.parametrize('shape', [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)])
def test_every_mesh_matches_one_device(tfds_dir, play_files, corpus_and_batches, single_device, initial_state,
                                       shape):
  config = tiny_config(tfds_dir, play_files, **SHARDABLE, **{'mesh.shape': shape})
  # Initialised in its shards on each mesh that splits the parameters (data parallelism replicates them).
  start = initial_state if shape == (8, 1, 1) else None
  losses, state = train_on(config, jax.devices(), corpus_and_batches[1], start)
  ref_losses, ref_state = single_device
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert losses[-1] < losses[0]
  assert_trees_close(state.params, ref_state.params)
  assert_trees_close(state.opt_state, ref_state.opt_state)


def test_parameter_shardings_follow_the_rules(tfds_dir, play_files):
  config = tiny_config(tfds_dir, play_files, **SHARDABLE, **{'mesh.shape': (1, 2, 4)})
  layout = train.make_layout(config)
  mesh, model = layout.mesh, layout.model
  with sharding.activate(mesh, layout.rules):
    state = train.init_train_state(layout)
  # What the default rules say, written out by hand: fsdp splits `embed`, tensor splits heads/mlp/vocab.
  expected = {
      "['token_embedding']['embedding']": P('tensor', 'fsdp'),
      "['position_embedding']": P(None, 'fsdp'),
      "['block_0']['attention']['query']['kernel']": P('fsdp', 'tensor', None),
      "['block_0']['attention']['query']['bias']": P('tensor', None),
      "['block_0']['attention']['out']['kernel']": P('tensor', None, 'fsdp'),
      "['block_0']['attention']['out']['bias']": P('fsdp'),
      "['block_0']['mlp']['up']['kernel']": P('fsdp', 'tensor'),
      "['block_0']['mlp']['up']['bias']": P('tensor'),
      "['block_0']['mlp']['down']['kernel']": P('tensor', 'fsdp'),
      "['block_0']['ln_mlp']['scale']": P('fsdp'),
      "['ln_final']['bias']": P('fsdp'),
  }
  specs = {jax.tree_util.keystr(path): leaf.sharding.spec
           for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)}
  for name, spec in expected.items():
    assert tuple(specs[name]) + (None,) * (len(spec) - len(specs[name])) == tuple(spec), name
  # Every parameter: placed as its logical names say, in shards of the expected size.
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, 8), np.int32))['params'])
  logical = nn.get_partition_spec(boxed)
  for (path, leaf), names in zip(jax.tree_util.tree_leaves_with_path(state.params), jax.tree.leaves(
      logical, is_leaf=lambda x: isinstance(x, P))):
    axes = nn.logical_to_mesh_axes(tuple(names), sharding.logical_axis_rules(config.mesh))
    assert leaf.sharding.spec == axes, jax.tree_util.keystr(path)
    shard = leaf.addressable_shards[0].data.shape
    for size, piece, a in zip(leaf.shape, shard, axes):
      a = () if a is None else (a,) if isinstance(a, str) else a
      assert piece * np.prod([mesh.shape[x] for x in a]) == size
  # Adam's moments are sharded like the parameters they belong to.
  adam = state.opt_state[1][0]
  for p, mu, nu in zip(jax.tree.leaves(state.params), jax.tree.leaves(adam.mu), jax.tree.leaves(adam.nu)):
    assert mu.sharding == p.sharding and nu.sharding == p.sharding


def test_gradient_accumulation_matches_the_whole_batch(tfds_dir, play_files, corpus_and_batches, single_device,
                                                       initial_state):
  config = tiny_config(tfds_dir, play_files, **SHARDABLE, **{'mesh.shape': (2, 2, 2), 'train.microbatches': 2})
  losses, state = train_on(config, jax.devices(), corpus_and_batches[1], initial_state)
  np.testing.assert_allclose(losses, single_device[0], rtol=1e-5)
  assert_trees_close(state.params, single_device[1].params)


# Each policy and each way of wrapping the blocks: remat alone (prevent_cse on), and remat inside a scan
# (prevent_cse off), which runs the scan's own code too. Neither: test_every_mesh_matches_one_device.
@pytest.mark.parametrize('remat, scan', [('full', False), ('dots', True)])
def test_remat_policies_and_scan_give_the_same_training(tfds_dir, play_files, corpus_and_batches, single_device,
                                                         initial_state, remat, scan):
  config = tiny_config(tfds_dir, play_files, **SHARDABLE,
                       **{'mesh.shape': (2, 2, 2), 'model.remat': remat, 'model.scan_layers': scan})
  params = initial_state.params
  params = stack_layers(params, config.model) if scan else params  # Same values, layers stacked.
  optimizer = make_optimizer(config.optimizer, config.train.steps)
  state = initial_state.replace(params=params, opt_state=optimizer.init(params))
  losses, _ = train_on(config, jax.devices(), corpus_and_batches[1][:3], jax.device_get(state))
  np.testing.assert_allclose(losses, single_device[0][:3], rtol=1e-5, err_msg=f'remat={remat} scan={scan}')


@pytest.mark.slow  # 8 s on 2 cores: room in the fast loop for the dropless experts' tests.
def test_bfloat16_trains_and_keeps_float32_parameters(tfds_dir, play_files, corpus_and_batches, initial_state):
  config = tiny_config(tfds_dir, play_files, **SHARDABLE,
                       **{'mesh.shape': (2, 2, 2), 'model.dtype': 'bfloat16', 'optimizer.learning_rate': 1e-2})
  batch = corpus_and_batches[1][0]
  layout, _ = _jitted_step(config, jax.devices())
  model = layout.model
  fresh = train.abstract_train_state(layout)  # What init makes: float32 parameters.
  assert {x.dtype for x in jax.tree.leaves(fresh.params)} == {np.dtype('float32')}
  assert jax.tree.structure(fresh) == jax.tree.structure(initial_state)
  losses, state = train_on(config, jax.devices(), [batch] * 30, initial_state)
  assert losses[-1] < 0.6 * losses[0], losses
  assert {x.dtype for x in jax.tree.leaves(state.params)} == {np.dtype('float32')}
  hidden = jax.jit(lambda params, tokens: model.apply({'params': params}, tokens, capture_intermediates=True,
                                                     mutable=['intermediates']))(state.params, batch['tokens'][:, :-1])
  hidden = hidden[1]['intermediates']
  assert hidden['block_0']['mlp']['up']['__call__'][0].dtype == np.dtype('bfloat16')


def test_checkpoint_restores_onto_other_meshes(tfds_dir, play_files, corpus_and_batches, initial_state, tmp_path):
  corpus, batches = corpus_and_batches
  config = tiny_config(tfds_dir, play_files, **SHARDABLE, **{'mesh.shape': (8, 1, 1)})
  _, state = train_on(config, jax.devices(), batches[:3], initial_state)
  checkpointer = checkpoint.Checkpointer(tmp_path, config.checkpoint)
  data = iter(pipeline.train_dataset(config.data, corpus, config.seed))
  checkpointer.save(3, state, data)
  checkpointer.close()
  expected, _ = train_on(config, jax.devices(), batches[3:], state)
  for shape, devices in [((2, 2, 2), jax.devices()), ((1, 1, 1), jax.devices()[:1])]:
    other = tiny_config(tfds_dir, play_files, **SHARDABLE, **{'mesh.shape': shape})
    layout, _ = _jitted_step(other, devices)
    like = train.abstract_train_state(layout)  # Shapes and shardings on that mesh.
    restorer = checkpoint.Checkpointer(tmp_path, other.checkpoint)
    restored = restorer.restore(3, like, iter(pipeline.train_dataset(other.data, corpus, other.seed)))
    restorer.close()
    assert jax.tree.leaves(restored.params)[0].sharding.mesh.shape == layout.mesh.shape
    assert int(restored.step) == 3
    losses, _ = train_on(other, devices, batches[3:], restored)
    np.testing.assert_allclose(losses, expected, rtol=1e-5, err_msg=str(shape))


@pytest.mark.parametrize('overrides, message', [
    ({'mesh.shape': (3, 1, 1)}, 'mesh.shape=(3, 1, 1) uses 3 devices but there are 8'),
    ({'mesh.shape': (-1, 3, 1)}, 'mesh.shape=(-1, 3, 1): 8 devices do not split'),
    ({'data.batch_size': 12}, 'data.batch_size=12 must be divisible by the 8 batch shards'),
    ({'mesh.shape': (1, 1, 8)}, 'model.num_heads=4 does not split over mesh tensor=8'),
    ({'mesh.shape': (1, 8, 1), 'model.d_model': 36}, 'model.d_model=36 does not split over mesh fsdp=8'),
])
def test_bad_meshes_are_refused_before_compiling(tfds_dir, play_files, overrides, message):
  config = tiny_config(tfds_dir, play_files, **(SHARDABLE | overrides))
  with pytest.raises(ConfigError) as error:
    train.make_layout(config)
  assert str(error.value).startswith(message), str(error.value)
  assert '\n' not in str(error.value)


def test_unknown_mesh_axis_in_a_rule_is_refused(tfds_dir, play_files):
  rules = (('batch', ('data', 'pipeline')),)
  axes = 'data, fsdp, context, expert, tensor'
  with pytest.raises(ConfigError, match=f"names unknown mesh axis 'pipeline'; mesh axes: {axes}"):
    tiny_config(tfds_dir, play_files, **{'mesh.logical_axis_rules': rules})


@pytest.mark.parametrize('name', ['lion', pytest.param('adafactor', marks=pytest.mark.slow),
                                  pytest.param('muon', marks=pytest.mark.slow), 'sgd'])
def test_each_optimizer_on_fsdp_equals_one_device(tfds_dir, play_files, corpus_and_batches, initial_state, name):
  # AdamW: test_fsdp_and_tensor_parallel_match_one_device. Learning rates each optimizer trains at.
  lr = {'lion': 3e-3, 'adafactor': 1e-2, 'muon': 1e-2, 'sgd': 0.3}[name]
  knobs = {'optimizer.name': name, 'optimizer.learning_rate': lr}
  one = tiny_config(tfds_dir, play_files, **SHARDABLE, **knobs)
  layout = train.make_layout(one, jax.devices()[:1])
  with sharding.activate(layout.mesh, layout.rules):  # This optimizer's state, on the host.
    state = jax.device_get(train.init_train_state(layout))
  batches = corpus_and_batches[1]
  losses_one, state_one = train_on(one, jax.devices()[:1], batches, state)
  fsdp = tiny_config(tfds_dir, play_files, **SHARDABLE, **knobs, **{'mesh.shape': (1, 8, 1)})
  losses_fsdp, state_fsdp = train_on(fsdp, jax.devices(), batches, state)
  np.testing.assert_allclose(losses_fsdp, losses_one, rtol=1e-5)
  assert losses_one[-1] < losses_one[0] - 0.05, losses_one  # It trains.
  assert_trees_close(state_fsdp.params, state_one.params, rtol=1e-4)
  # The optimizer state lives in the parameters' shards: each sharded parameter has its moment(s) sharded.
  shardings = _jitted_step(fsdp, jax.devices())[0].shardings
  is_split = lambda s: 'fsdp' in jax.tree.leaves(tuple(s.spec))
  split_params = sum(map(is_split, jax.tree.leaves(shardings.params)))
  assert split_params and sum(map(is_split, jax.tree.leaves(shardings.opt_state))) >= split_params
