import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import config as config_lib
from lm.model import causal_attention, count_params, make_model


@pytest.fixture(scope='module')
def model_and_params():
  config = config_lib.base_config()
  config.model.update(vocab_size=97, max_len=16, num_layers=2, num_heads=2, d_model=16, mlp_dim=32)
  model = make_model(config.model)
  boxed = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))['params']
  return config, model, boxed


def test_changing_a_token_never_changes_earlier_logits(model_and_params):
  _, model, boxed = model_and_params
  params = nn.meta.unbox(boxed)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 97)
  base = model.apply({'params': params}, tokens)
  for t in (0, 5, 15):
    changed = model.apply({'params': params}, tokens.at[:, t].set((tokens[:, t] + 1) % 97))
    np.testing.assert_array_equal(base[:, :t], changed[:, :t])
    assert np.abs(base[:, t:] - changed[:, t:]).max() > 1e-4


def test_attention_matches_the_formula():
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((2, 5, 3, 4)).astype(np.float32) for _ in range(3))
  out = np.asarray(causal_attention(q, k, v))
  for b in range(2):
    for h in range(3):
      for i in range(5):
        scores = q[b, i, h] @ k[b, :i + 1, h].T / math.sqrt(4)
        probs = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
        np.testing.assert_allclose(out[b, i, h], probs @ v[b, :i + 1, h], rtol=1e-5, atol=1e-6)


def test_parameter_count_and_logical_axes(model_and_params):
  config, _, boxed = model_and_params
  m = config.model
  # q, k, v, out kernels; q, v, out biases (no key bias); MLP; two LayerNorms.
  per_block = 4 * m.d_model * m.d_model + 3 * m.d_model + 2 * m.d_model * m.mlp_dim + m.mlp_dim + m.d_model \
      + 4 * m.d_model
  expected = m.vocab_size * m.d_model + m.max_len * m.d_model + m.num_layers * per_block + 2 * m.d_model
  assert count_params(nn.meta.unbox(boxed)) == expected
  specs = nn.get_partition_spec(boxed)
  for path, spec in jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]:
    assert isinstance(spec, jax.sharding.PartitionSpec), path
    assert any(name in ('embed', 'vocab', 'mlp', 'heads', 'kv') for name in spec), path
  assert specs['token_embedding']['embedding'] == jax.sharding.PartitionSpec('vocab', 'embed')
  assert specs['block_0']['attention']['query']['kernel'] == jax.sharding.PartitionSpec('embed', 'heads', 'kv')


def test_logits_are_tied_to_the_embedding(model_and_params):
  _, model, boxed = model_and_params
  params = nn.meta.unbox(boxed)
  bumped = jax.tree.map(lambda x: x, params)
  bumped['token_embedding']['embedding'] = params['token_embedding']['embedding'].at[3].add(1.0)
  tokens = jnp.zeros((1, 4), jnp.int32)  # Token 3 is never an input here, so only the output row moves.
  delta = model.apply({'params': bumped}, tokens) - model.apply({'params': params}, tokens)
  assert np.abs(delta[..., 3]).min() > 0 and np.abs(np.delete(np.asarray(delta), 3, axis=-1)).max() == 0
