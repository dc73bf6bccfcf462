import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import config as config_lib
from lm.kinds import make_model
from lm.nn.attention import attention, causal_mask, fused_attention
from lm.nn.layers import dropout, norm_layer, rotary
from lm.nn.model import count_params


@pytest.fixture(scope='module')
def model_and_params():
  config = config_lib.base_config()
  config.model.update(vocab_size=97, max_len=16, num_layers=2, num_heads=2, d_model=16, mlp_dim=32)
  model = make_model(config.model, config.data)
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


@pytest.mark.parametrize('window', [0, 2])
def test_attention_matches_the_formula(window):
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((2, 5, 3, 4)).astype(np.float32) for _ in range(3))
  out = np.asarray(attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), causal_mask(5, window)))
  for b in range(2):
    for h in range(3):
      for i in range(5):
        first = max(0, i - window + 1) if window else 0  # A window of w sees positions i - w + 1 .. i.
        scores = q[b, i, h] @ k[b, first:i + 1, h].T / math.sqrt(4)
        probs = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
        np.testing.assert_allclose(out[b, i, h], probs @ v[b, first:i + 1, h], rtol=1e-5, atol=1e-6)


def test_grouped_query_attention_shares_each_kv_head():
  rng = np.random.default_rng(1)
  q = rng.standard_normal((2, 5, 6, 4)).astype(np.float32)
  k, v = (rng.standard_normal((2, 2, 5, 4)).astype(np.float32) for _ in range(2))  # 2 kv heads for 6 query heads.
  out = np.asarray(attention(q, k, v, causal_mask(5)))
  repeated = [np.repeat(x, 3, axis=1) for x in (k, v)]  # Query head h reads kv head h // 3.
  np.testing.assert_allclose(out, attention(q, *repeated, causal_mask(5)), rtol=1e-6, atol=1e-6)


def test_parameter_count_and_logical_axes(model_and_params):
  config, _, boxed = model_and_params
  m = config.model
  # q, k, v, out kernels and biases; MLP; two LayerNorms.
  per_block = 4 * m.d_model * m.d_model + 4 * m.d_model + 2 * m.d_model * m.mlp_dim + m.mlp_dim + m.d_model \
      + 4 * m.d_model
  expected = m.vocab_size * m.d_model + m.max_len * m.d_model + m.num_layers * per_block + 2 * m.d_model
  assert count_params(nn.meta.unbox(boxed)) == expected
  specs = nn.get_partition_spec(boxed)
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
  for path, spec in jax.tree_util.tree_flatten_with_path(specs, is_leaf=is_spec)[0]:
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


# One value changed from the defaults per variant; causality and training must hold for each.
VARIANTS = {
    'rope': {'positions': 'rope'}, 'no_positions': {'positions': 'none'}, 'rmsnorm': {'norm': 'rmsnorm'},
    'relu': {'mlp': 'relu'}, 'swiglu': {'mlp': 'swiglu'}, 'multi_query': {'num_kv_heads': 1},
    'untied': {'tie_embeddings': False}, 'post_norm': {'norm_position': 'post'}, 'qk_norm': {'qk_norm': True},
    'window': {'sliding_window': 4}, 'no_bias': {'use_bias': False},
    'llama_like': {'positions': 'rope', 'norm': 'rmsnorm', 'mlp': 'swiglu', 'num_kv_heads': 1, 'tie_embeddings': False},
    'moe': {'moe_experts': 4, 'moe_top_k': 2, 'moe_capacity_factor': 1.0},  # Capacity 8 of 16 tokens: some dropped.
    'moe_scanned': {'moe_experts': 4, 'moe_top_k': 1, 'moe_capacity_factor': 1.0, 'scan_layers': True},
}


def _variant(shapes_only: bool = False, **knobs):
  config = config_lib.base_config()
  config.model.update(vocab_size=97, max_len=16, num_layers=2, num_heads=4, d_model=16, mlp_dim=32, **knobs)
  model = make_model(config.model, config.data)
  init = lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))
  params = nn.meta.unbox((jax.eval_shape(init) if shapes_only else init())['params'])
  return config, model, params


@pytest.mark.parametrize('name', VARIANTS)
def test_every_variant_is_causal(name):
  _, model, params = _variant(**VARIANTS[name])
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 97)
  base = model.apply({'params': params}, tokens)
  changed = model.apply({'params': params}, tokens.at[:, 7].set((tokens[:, 7] + 1) % 97))
  np.testing.assert_array_equal(base[:, :7], changed[:, :7])
  assert np.abs(base[:, 7:] - changed[:, 7:]).max() > 1e-4


def test_variants_have_the_parameters_they_should():
  shapes = lambda **knobs: _variant(shapes_only=True, **knobs)[2]  # Names and shapes: nothing need run.
  names = lambda params: {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
  base = names(shapes())
  assert names(shapes(positions='rope')) == base - {"['position_embedding']"}
  assert names(shapes(norm='rmsnorm')) == {n for n in base if not ("['ln_" in n and n.endswith("['bias']"))}
  assert names(shapes(mlp='swiglu')) == base | {f"['block_{i}']['mlp']['gate']['{w}']" for i in (0, 1)
                                                for w in ('kernel', 'bias')}
  assert names(shapes(tie_embeddings=False)) == base | {"['output']['kernel']"}
  assert shapes(num_kv_heads=1)['block_0']['attention']['key']['kernel'].shape == (16, 1, 4)
  assert names(shapes(norm_position='post')) == {n for n in base if not n.startswith("['ln_final']")}
  assert names(shapes(qk_norm=True)) == base | {f"['block_{i}']['attention']['{q}_norm']['scale']"
                                                for i in (0, 1) for q in ('query', 'key')}
  assert names(shapes(use_bias=False)) == {n for n in base if not (n.endswith("['bias']") and "['ln_" not in n)}


@pytest.mark.parametrize('init, down_std', [('gpt2', 0.02 / math.sqrt(2 * 2)), ('normal', 0.02)])
def test_init_scheme_sets_the_residual_projection_std(init, down_std):
  config = config_lib.base_config()
  config.model.update(vocab_size=97, max_len=16, num_layers=2, num_heads=4, d_model=256, mlp_dim=1024, init=init)
  model = make_model(config.model, config.data)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))['params'])
  for name, std in [('down', down_std), ('up', 0.02)]:
    np.testing.assert_allclose(np.std(params['block_0']['mlp'][name]['kernel']), std, rtol=0.02)
  np.testing.assert_allclose(np.std(params['block_1']['attention']['out']['kernel']), down_std, rtol=0.02)


def test_embed_multiplier_scales_the_input_embedding_only():
  knobs = {'positions': 'none', 'tie_embeddings': False}
  _, scaled, params = _variant(embed_multiplier=3.0, **knobs)
  _, plain, _ = _variant(**knobs)
  tripled = dict(params, token_embedding={'embedding': 3.0 * params['token_embedding']['embedding']})
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 97)
  np.testing.assert_allclose(scaled.apply({'params': params}, tokens), plain.apply({'params': tripled}, tokens),
                             rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
  rng = np.random.default_rng(0)
  q, k = rng.standard_normal((2, 8)).astype(np.float32)
  scores = {}
  for shift in (0, 5):  # The same q at position 2 + shift, the same k at position 0 + shift.
    q_BLHK = np.zeros((1, 12, 1, 8), np.float32)
    k_BLHK = np.zeros((1, 12, 1, 8), np.float32)
    q_BLHK[0, 2 + shift, 0], k_BLHK[0, shift, 0] = q, k
    scores[shift] = float(rotary(q_BLHK, 10000.0)[0, 2 + shift, 0] @ rotary(k_BLHK, 10000.0)[0, shift, 0])
  np.testing.assert_allclose(scores[0], scores[5], rtol=1e-5)
  assert abs(scores[0] - float(q @ k)) > 1e-3  # But it does depend on position.


def test_grouped_query_attention_equals_multi_head_with_shared_kv_weights():
  _, gqa, params = _variant(num_kv_heads=2)  # 4 query heads, 2 kv heads.
  _, mha, _ = _variant()
  full = jax.tree.map(lambda x: x, params)
  for i in (0, 1):
    attention = dict(full[f'block_{i}']['attention'])
    for name in ('key', 'value'):  # Kernels [D, G, K] and biases [G, K]: each kv head serves two query heads.
      attention[name] = {w: jnp.repeat(x, 2, axis=-2) for w, x in attention[name].items()}
    full[f'block_{i}'] = dict(full[f'block_{i}'], attention=attention)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 97)
  np.testing.assert_allclose(gqa.apply({'params': params}, tokens), mha.apply({'params': full}, tokens),
                             rtol=1e-5, atol=1e-5)


def test_rmsnorm_matches_its_formula():
  x = np.random.default_rng(0).standard_normal((2, 3, 16)).astype(np.float32)
  scale = np.linspace(0.5, 1.5, 16).astype(np.float32)
  config = config_lib.base_config().model
  config.norm = 'rmsnorm'
  out = norm_layer('n', config).apply({'params': {'scale': scale}}, x)
  expected = x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-5) * scale
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_dropout_zeroes_the_given_share_and_rescales_the_rest():

  class Drop(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      return dropout(self, x, 0.3, train)

  x = jnp.ones((100_000,))
  out = np.asarray(Drop().apply({}, x, True, rngs={'dropout': jax.random.PRNGKey(0)}))
  assert abs(np.mean(out == 0) - 0.3) < 0.01
  np.testing.assert_allclose(out[out != 0], 1 / 0.7, rtol=1e-6)
  np.testing.assert_array_equal(Drop().apply({}, x, False), x)


@pytest.mark.parametrize('rate_key', ['embed_dropout', 'attention_dropout', 'residual_dropout'])
def test_each_dropout_acts_in_training_only(rate_key):
  _, plain, params = _variant()
  _, dropped, _ = _variant(**{rate_key: 0.2})
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 97)
  reference = plain.apply({'params': params}, tokens)
  np.testing.assert_array_equal(dropped.apply({'params': params}, tokens), reference)  # Eval: off.
  run = lambda seed: dropped.apply({'params': params}, tokens, True, rngs={'dropout': jax.random.PRNGKey(seed)})
  np.testing.assert_array_equal(run(0), run(0))  # Same key, same masks.
  assert np.abs(run(0) - reference).max() > 1e-3 and np.abs(run(0) - run(1)).max() > 1e-3
  # Training without dropout is the eval function.
  np.testing.assert_array_equal(plain.apply({'params': params}, tokens, True, rngs={'dropout': jax.random.PRNGKey(0)}),
                                reference)


@pytest.mark.parametrize('knobs, learns', [({}, False), ({'positions': 'rope'}, True), ({'qk_norm': True}, True)])
def test_key_bias_learns_only_where_softmax_does_not_ignore_it(knobs, learns):
  _, model, params = _variant(**knobs)
  params['block_0']['attention']['key']['bias'] = jnp.full((4, 4), 0.5)  # Nonzero, so it matters where it can.
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 97)
  loss = lambda p: jnp.mean(jax.nn.log_softmax(model.apply({'params': p}, tokens))[..., 0])
  grads = jax.grad(loss)(params)
  key_bias_grad = np.abs(grads['block_0']['attention']['key']['bias']).max()
  assert (key_bias_grad > 1e-6) == learns, key_bias_grad
  assert np.abs(grads['block_0']['attention']['query']['bias']).max() > 1e-6


@pytest.mark.parametrize('window, kv_heads', [(0, 4), (3, 4), (0, 2), (6, 1)])
def test_blocked_causal_attention_equals_the_full_square(window, kv_heads):
  """Blocks of 4 queries (the last one short) against only the keys their mask keeps: the same outputs
  and gradients as all 10 x 10 scores under the mask."""
  q = jax.random.normal(jax.random.PRNGKey(0), (2, 10, 4, 8))
  k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, kv_heads, 10, 8)) for i in (1, 2))
  mask = causal_mask(10, window)
  full = jax.jit(lambda q, k, v: attention(q, k, v, mask))  # Jitted: one compile, not one per op.
  blocked = jax.jit(lambda q, k, v: attention(q, k, v, mask, causal_block=4, window=window))
  np.testing.assert_allclose(blocked(q, k, v), full(q, k, v), rtol=1e-6, atol=1e-6)
  grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(jnp.sin(f(*a))), argnums=(0, 1, 2)))(q, k, v)
           for f in (full, blocked)]
  for a, b in zip(*grads):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('causal, window, kv_heads, divisor', [(True, 0, 4, None), (True, 3, 2, None),
                                                                (False, 0, 1, None), (True, 0, 2, 8.0)])
def test_fused_attention_passes_the_mask_as_attention_reads_it(causal, window, kv_heads, divisor):
  """jax.nn.dot_product_attention as model.attention_impl='cudnn' calls it (here with its XLA kernel,
  the only one a CPU has): a causal mask and its window as flags, a padding mask as an array, and muP's
  score divisor."""
  q = jax.random.normal(jax.random.PRNGKey(0), (2, 10, 4, 8))
  k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 10, kv_heads, 8)) for i in (1, 2))
  mask = causal_mask(10, window) if causal else (jnp.arange(10) < jnp.array([[7], [10]]))[:, None, :]
  expected = attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask, divisor=divisor)
  fused = fused_attention(q, k, v, mask, causal, window, 'xla', divisor)
  np.testing.assert_allclose(fused, expected, rtol=1e-6, atol=1e-6)
  if divisor:  # Not the default 1 / sqrt(8).
    assert np.abs(fused - fused_attention(q, k, v, mask, causal, window, 'xla')).max() > 1e-2
