"""KV-cache decoding equals full forward passes; sampling is seeded."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import config as config_lib
from lm.inference import decode
from lm.kinds import init_cache, make_model

_DECODERS = {}


def _decoder(**knobs):
  """A small decoder and its parameters, made once per set of knobs (shared by the tests asking for the
  same). Initialised op by op: each op compiles once per shape, most of them shared by all the variants,
  where a jitted init would compile whole for each (for longer than the forward pass takes to compile)."""
  key = tuple(sorted(knobs.items()))
  if key not in _DECODERS:
    config = config_lib.base_config()
    config.model.update(dict(vocab_size=97, max_len=16, num_layers=2, num_heads=4, d_model=16, mlp_dim=32) | knobs)
    model = make_model(config.model, config.data)
    _DECODERS[key] = model, nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))['params'])
  return _DECODERS[key]


_FORWARDS = {}


def forward(model, params, tokens):
  """model.apply under jit, compiled once per model and shape."""
  return _FORWARDS.setdefault(model, jax.jit(lambda p, t: model.apply({'params': p}, t)))(params, tokens)


VARIANTS = {'learned_mha': {}, 'rope_gqa': {'positions': 'rope', 'num_kv_heads': 2},
            'mqa_window': {'num_kv_heads': 1, 'sliding_window': 3, 'positions': 'rope'}, 'scan': {'scan_layers': True},
            'llama_like': {'positions': 'rope', 'norm': 'rmsnorm', 'mlp': 'swiglu', 'num_kv_heads': 2, 'qk_norm': True,
                           'use_bias': False, 'tie_embeddings': False},
            'mup': {'parametrization': 'mup', 'mup_base_width': 8, 'positions': 'rope', 'num_kv_heads': 2},
            # The open families' knobs (lm.hf): Qwen's q/k/v biases, qk-norm and free head_dim; Mixtral's
            # experts without dropping and window; Llama 3's RoPE scaling.
            'qwen_like': {'positions': 'rope', 'qkv_bias': True, 'use_bias': False, 'qk_norm': True, 'head_dim': 8,
                          'num_kv_heads': 2},
            'mixtral_like': {'positions': 'rope', 'mlp': 'swiglu', 'moe_experts': 4, 'moe_top_k': 2,
                             'moe_capacity_factor': 0.0, 'num_kv_heads': 2, 'sliding_window': 5},
            'llama3_rope': {'positions': 'rope', 'rope_scaling': 'llama3', 'rope_scaling_factor': 8.0,
                            'rope_original_max_len': 4, 'num_kv_heads': 2}}


@pytest.mark.parametrize('name', VARIANTS)
def test_cached_decoding_gives_the_full_forward_logits(name):
  model, params = _decoder(**VARIANTS[name])
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, 97)
  full = forward(model, params, tokens)
  apply = jax.jit(lambda cache, t, pos: model.apply({'params': params, 'cache': cache}, t, False, True, pos,
                                                    jnp.ones_like(t, bool), mutable=['cache']))
  positions = jnp.broadcast_to(jnp.arange(12), (2, 12))
  logits, variables = apply(init_cache(model, 2), tokens[:, :5], positions[:, :5])  # Prefill five.
  np.testing.assert_allclose(logits, full[:, :5], rtol=1e-5, atol=1e-5)
  for t in range(5, 12):  # Then one at a time.
    logits, variables = apply(variables['cache'], tokens[:, t:t + 1], positions[:, t:t + 1])
    np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5)


def test_left_padding_changes_nothing():
  model, params = _decoder(positions='rope', num_kv_heads=2)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 6), 0, 97)
  padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), tokens], axis=1)
  valid = jnp.arange(9)[None] >= 3
  prefill = jax.jit(lambda cache, t, pos, valid: model.apply({'params': params, 'cache': cache}, t, False, True, pos,
                                                             valid, mutable=['cache']))
  logits, _ = prefill(init_cache(model, 1), padded, jnp.maximum(jnp.arange(9)[None] - 3, 0), valid)
  np.testing.assert_allclose(logits[:, 3:], forward(model, params, tokens), rtol=1e-5, atol=1e-5)


def greedy_full(model, params, prompt, num_new: int) -> list[int]:
  """num_new tokens, each the argmax of a full forward pass over the sequence so far (padded on
  the right to max_len, which a causal model does not see)."""
  tokens = np.zeros((1, model.config.max_len), np.int32)
  tokens[0, :len(prompt)] = prompt
  for t in range(len(prompt), len(prompt) + num_new):
    tokens[0, t] = int(jnp.argmax(forward(model, params, tokens)[0, t - 1]))
  return list(tokens[0, len(prompt):len(prompt) + num_new])


def test_greedy_sampling_is_repeated_argmax_over_full_passes():
  model, params = _decoder(positions='rope')
  prompt = np.array([5, 17, 3], np.int32)
  out = decode.sample(model, params, prompt, num_samples=2, num_tokens=8, temperature=0.0, rng=jax.random.PRNGKey(0))
  np.testing.assert_array_equal(out, np.tile(greedy_full(model, params, prompt, 8), (2, 1)))


def test_sampling_is_seeded():
  model, params = _decoder()
  draw = lambda seed: decode.sample(model, params, np.array([1, 2]), num_samples=3, num_tokens=6, temperature=1.0,
                                    rng=jax.random.PRNGKey(seed))
  np.testing.assert_array_equal(draw(0), draw(0))
  assert (draw(0) != draw(1)).any()
