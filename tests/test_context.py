"""Context parallelism: the mesh's `context` axis splits activations along the sequence (logical axis
`length`) and attention gathers keys and values over it. On 8 simulated devices training equals one
device, with RoPE, GQA, a sliding window and packed documents, and decoding still works."""

import itertools

import jax
import numpy as np
import pytest

from conftest import tiny_config
from lm.config import ConfigError, override
from lm.data import pipeline
from lm.inference import decode
from lm.kinds import make_model
from lm.parallel import sharding
from lm.training import train
from test_sharding import SHARDABLE, train_on

LONG = {'model.positions': 'rope', 'model.mlp': 'swiglu', 'model.num_kv_heads': 2, 'model.sliding_window': 12,
        'data.document_mask': True}


@pytest.fixture(scope='module')
def setup(tfds_dir, play_files, tmp_path_factory):
  config = tiny_config(tfds_dir, play_files, **SHARDABLE, **LONG)
  corpus = pipeline.load_corpus(config.data, config.model.vocab_size, tmp_path_factory.mktemp('tok'))
  batches = list(itertools.islice(iter(pipeline.train_dataset(config.data, corpus, config.seed)), 4))
  losses, state = train_on(config, jax.devices()[:1], batches)
  return config, batches, losses, state


@pytest.mark.slow
@pytest.mark.parametrize('mesh', [(1, 1, 8, 1), (2, 1, 2, 2), (1, 2, 4, 1)])
def test_training_over_the_context_axis_equals_one_device(setup, mesh):
  config, batches, reference, _ = setup
  losses, state = train_on(override(config, {'mesh.shape': mesh}), jax.devices(), batches)
  np.testing.assert_allclose(losses, reference, rtol=1e-5)
  assert reference[-1] < reference[0]


@pytest.mark.slow
def test_decoding_on_a_context_mesh_gives_the_one_device_tokens(setup):
  config, _, _, state = setup
  prompts = [np.arange(3, 10, dtype=np.int32), np.arange(20, 24, dtype=np.int32)]
  greedy = decode.Sampling(temperature=0.0)
  model = make_model(config.model, config.data)
  one = decode.generate_ids(model, state.params, prompts, max_new_tokens=12, sampling=greedy, rng=jax.random.PRNGKey(0))
  context = override(config, {'mesh.shape': (1, 1, 8, 1)})
  layout = train.make_layout(context, jax.devices())
  with sharding.activate(layout.mesh, layout.rules):
    params = jax.device_put(state.params, layout.shardings.params)
    many = decode.generate_ids(layout.model, params, prompts, max_new_tokens=12, sampling=greedy,
                               rng=jax.random.PRNGKey(0), mesh=layout.mesh)
  assert [r.tolist() for r in many] == [r.tolist() for r in one]
  # The training forward pass holds each device's stretch of the sequence only.
  tokens = np.zeros((8, config.data.seq_len), np.int32)
  with sharding.activate(layout.mesh, layout.rules):
    hidden = jax.jit(lambda p, t: layout.model.apply({'params': p}, t, hidden=True))(params, tokens)
  assert hidden.sharding.shard_shape(hidden.shape)[1] == config.data.seq_len // 8


def test_a_length_the_context_axis_does_not_split_is_refused(tfds_dir, play_files):
  with pytest.raises(ConfigError, match=r'data.seq_len=36 must be divisible by the context axis of '
                                        r'mesh.shape=\(1, 1, 8, 1\) \(8\)'):
    tiny_config(tfds_dir, play_files, **{'mesh.shape': (1, 1, 8, 1), 'data.seq_len': 36, 'model.max_len': 36})
  with pytest.raises(ConfigError, match="the context axis of mesh.shape=.* needs model.kind='decoder'"):
    tiny_config(tfds_dir, play_files, **{'mesh.shape': (1, 1, 2, 1), 'model.kind': 'encoder_decoder',
                                         'data.objective': 'span_corruption'})
