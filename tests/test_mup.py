"""muP: equal to SP at the base width; hidden matrices' init and learning rate, readouts and attention
scores scaled by the width multiplier elsewhere; activations that keep their size across widths."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from lm import config as config_lib
from lm import kinds
from lm.analysis import coordinates
from lm.config import ConfigError
from lm.data import pipeline
from lm.kinds import make_model
from lm.training import train

HIDDEN = {'query', 'key', 'value', 'out', 'up', 'gate', 'down', 'up_kernel', 'gate_kernel', 'down_kernel'}
LLAMA_MOE = {'model.positions': 'rope', 'model.norm': 'rmsnorm', 'model.mlp': 'swiglu', 'model.num_heads': 4,
             'model.num_kv_heads': 2, 'model.use_bias': False, 'model.tie_embeddings': False, 'model.moe_experts': 4,
             'model.moe_top_k': 2, 'model.scan_layers': True}


def _names(path) -> list[str]:
  return [getattr(k, 'key', str(k)) for k in path]


def _is_hidden(path) -> bool:
  """A hidden matrix's kernel, by name: attention and MLP projections and the experts' kernels."""
  names = _names(path)
  return (names[-1] == 'kernel' and names[-2] in HIDDEN) or names[-1] in HIDDEN


@pytest.fixture(scope='module')
def corpus(tfds_dir, play_files, tmp_path_factory):
  config = tiny_config(tfds_dir, play_files)
  return pipeline.load_corpus(config.data, config.model.vocab_size, tmp_path_factory.mktemp('tok'))


@pytest.mark.slow  # Over 9 s on 2 cores: the fast loop stays under 5 minutes.
@pytest.mark.parametrize('knobs', [{}, LLAMA_MOE | {'optimizer.name': 'adafactor'}], ids=['gpt2_adamw', 'llama_moe'])
def test_mup_at_the_base_width_equals_sp_bitwise(tfds_dir, play_files, corpus, knobs):
  runs = {}
  for parametrization in ('sp', 'mup'):
    config = tiny_config(tfds_dir, play_files, **knobs, **{'model.parametrization': parametrization,
                                                           'model.mup_base_width': 32})
    runs[parametrization] = coordinates.train_from_scratch(config, corpus, 3)
  (sp_losses, sp_state, _, _), (mup_losses, mup_state, _, _) = runs['sp'], runs['mup']
  assert sp_losses == mup_losses
  jax.tree.map(np.testing.assert_array_equal, sp_state.params, mup_state.params)


def _model_config(**knobs):
  config = config_lib.base_config()
  config.model.update(dict(vocab_size=384, max_len=16, num_layers=2, num_heads=4, d_model=32, mlp_dim=64) | knobs)
  return config


def _init(config):
  model = make_model(config.model, config.data)
  return model, nn.meta.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))['params'])


@pytest.mark.parametrize('moe', [False, True])
def test_hidden_matrices_init_with_variance_over_the_width_multiplier(moe):
  knobs = {'moe_experts': 4} if moe else {}
  _, sp = _init(_model_config(**knobs))
  _, mup = _init(_model_config(parametrization='mup', mup_base_width=8, **knobs))  # Width multiplier 4.
  hidden = []

  def check(path, a, b):
    if _is_hidden(path):
      hidden.append('/'.join(_names(path)))
      np.testing.assert_allclose(b, a / 2, rtol=1e-6)
    else:  # Embeddings, position table, router, norms, biases: SP's.
      np.testing.assert_array_equal(a, b)
  jax.tree_util.tree_map_with_path(check, sp, mup)
  assert len(hidden) == 2 * 6  # Per block: query, key, value, out; the MLP's or the experts' in and out.


@pytest.mark.parametrize('name', ['adamw', 'lion', 'adafactor'])
def test_hidden_matrices_learn_at_the_rate_over_the_width_multiplier(name):
  """One update from the same gradients: a muP model's hidden matrices move 1/m as far as SP's do,
  everything else as far; weight decay included."""
  updates = {}
  params = _init(_model_config(moe_experts=4))[1]
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(p.size), p.shape), params)
  for parametrization in ('sp', 'mup'):
    config = _model_config(parametrization=parametrization, mup_base_width=8, moe_experts=4)
    config.optimizer.update(name=name, weight_decay=0.1, warmup_steps=0)
    config.data.seq_len = 16
    layout = train.make_layout(config_lib.validate(config), jax.devices()[:1], check_batches=False)
    state = layout.optimizer.init(params)
    for _ in range(2):  # The second update has a learning rate (the schedule starts at step 0).
      updates[parametrization], state = layout.optimizer.update(grads, state, params)
  jax.tree_util.tree_map_with_path(
      lambda path, a, b: np.testing.assert_allclose(b, a / 4 if _is_hidden(path) else a, rtol=1e-5, atol=1e-12),
      updates['sp'], updates['mup'])
  assert float(jnp.abs(updates['sp']['block_0']['attention']['query']['kernel']).max()) > 0


def _as_sp(params, m: float):
  """Parameters with which an SP model computes m times the logits a muP model (multiplier m) computes
  from `params`: queries over sqrt(m) (scores over sqrt(head_dim * m)), router kernels over m."""
  def scale(path, p):
    names = _names(path)
    if 'query' in names:
      return p / math.sqrt(m)
    return p / m if names[-1] == 'router_kernel' else p
  return jax.tree_util.tree_map_with_path(scale, params)


@pytest.mark.parametrize('knobs', [{}, pytest.param({'positions': 'rope', 'mlp': 'swiglu', 'num_kv_heads': 2,
                                                      'moe_experts': 4, 'moe_capacity_factor': 0.0,
                                                      'tie_embeddings': False, 'scan_layers': True},
                                                     marks=pytest.mark.slow)], ids=['gpt2', 'llama_moe'])
def test_mup_divides_logits_router_logits_and_attention_scores(knobs):
  mup_model, params = _init(_model_config(parametrization='mup', mup_base_width=8, **knobs))
  sp_model, _ = _init(_model_config(**knobs))
  # Queries, keys and router as after some training: at init attention scores and router logits are
  # too small for their scale to show.
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: p * 30 if {'query', 'key', 'router_kernel'} & set(_names(path)) else p, params)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 97)
  mup_logits = mup_model.apply({'params': params}, tokens)
  sp_logits = sp_model.apply({'params': _as_sp(params, 4.0)}, tokens)
  np.testing.assert_allclose(mup_logits * 4, sp_logits, rtol=1e-4, atol=1e-5)
  assert np.abs(sp_logits - sp_model.apply({'params': params}, tokens)).max() > 1e-3  # The rescaling matters.


@pytest.mark.parametrize('overrides, message', [
    ({'optimizer.name': 'sgd'}, "not 'sgd'"),
    ({'optimizer.name': 'muon'}, "not 'muon'"),
    ({'optimizer.name': 'adafactor', 'optimizer.adafactor_parameter_scale': True}, 'adafactor_parameter_scale=False'),
    ({'model.parametrization': 'mu'}, "model.parametrization='mu': must be one of 'sp', 'mup'"),
    ({'model.mup_base_width': 0}, 'model.mup_base_width'),
])
def test_mup_refuses_what_its_recipe_does_not_cover(overrides, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(config_lib.override(config_lib.base_config(), {'model.parametrization': 'mup'} | overrides))


def test_a_mup_model_does_not_export_as_gpt2():
  config = config_lib.validate(config_lib.override(config_lib.base_config(), {'model.parametrization': 'mup'}))
  with pytest.raises(ConfigError, match="model.parametrization='mup': a GPT-2 checkpoint needs"):
    kinds.hf_family_of(config.model, 'gpt2')


@pytest.mark.slow
def test_coordinate_check_block_outputs_keep_their_size_across_widths_under_mup(tfds_dir, play_files, corpus):
  widths = (64, 512)  # SP's block outputs grow past 4x only at 8x the base width.
  sizes = {}
  for parametrization in ('sp', 'mup'):
    for width in widths:
      config = tiny_config(tfds_dir, play_files, **{
          'model.d_model': width, 'model.num_heads': 4, 'model.mlp_dim': 0, 'model.parametrization': parametrization,
          'model.mup_base_width': 64, 'optimizer.learning_rate': 1e-2, 'optimizer.warmup_steps': 0,
          'optimizer.grad_clip_norm': 0.0, 'data.batch_size': 8})
      sizes[parametrization, width] = coordinates.block_output_sizes(config, corpus)
  for block in ('block_0', 'block_1'):
    mup = [sizes['mup', w][block] for w in widths]
    sp = [sizes['sp', w][block] for w in widths]
    assert max(mup) / min(mup) < 2, (block, mup)
    assert sp[-1] / sp[0] > 4, (block, sp)  # SP's updates grow with the width (here about 10x at 8x the width).
