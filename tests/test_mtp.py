"""Multi-token prediction (model.mtp_depth, train.mtp_weight): DeepSeek-V3's sequential modules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm import config as config_lib
from lm import kinds
from lm.config import ConfigError
from lm.kinds import gpt2, llama
from lm.nn.attention import causal_mask
from lm.nn.block import Block
from lm.nn.model import MultiToken, count_mtp_params
from lm.parallel import sharding
from lm.training import train
from test_sharding import assert_trees_close


def _config(**knobs):
  config = config_lib.base_config()
  config.model.update(vocab_size=97, max_len=16, num_layers=2, num_heads=2, d_model=16, mlp_dim=32, scan_layers=False,
                      **knobs)
  config.data.seq_len = 16
  return config


def _loss_sums(params, batch, model, **options):
  """train.loss_sums, jitted (eagerly, its many small ops take seconds), with its stats."""
  def sums(params, batch):
    stats = {}
    return train.loss_sums(params, batch, model, stats=stats, **options), stats
  return jax.jit(sums)(params, batch)


def _init(config, tokens):
  model = kinds.make_model(config.model, config.data)
  return model, nn.meta.unbox(model.init(jax.random.PRNGKey(1), tokens[:, :-1])['params'])


def test_the_objective_adds_each_depths_loss_and_generation_ignores_them():
  config = _config(mtp_depth=2)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (4, 17), 0, 97)
  model, params = _init(config, tokens)
  assert {'mtp_1', 'mtp_2'} <= set(params)
  batch = {'tokens': tokens, 'loss_mask': jnp.ones((4, 16), bool)}
  (total, count, _), stats = _loss_sums(params, batch, model, mtp_weight=0.3)
  # Depth k scores positions whose token k + 1 ahead exists: 4 x (16 - k).
  assert (float(stats['mtp_1/count']), float(stats['mtp_2/count'])) == (60.0, 56.0)
  plain = _config()
  plain_model = kinds.make_model(plain.model, plain.data)
  main_params = {k: v for k, v in params.items() if not k.startswith('mtp_')}
  assert count_mtp_params(params) == sum(x.size for x in jax.tree.leaves(params)) - sum(
      x.size for x in jax.tree.leaves(main_params))
  (main, main_count, _), _ = _loss_sums(main_params, batch, plain_model)
  assert float(count) == float(main_count) == 64.0
  np.testing.assert_allclose(total - main, 0.3 / 2 * (stats['mtp_1/loss_sum'] + stats['mtp_2/loss_sum']), rtol=1e-5)
  # The logits (all generation reads) are the model's without the modules.
  np.testing.assert_array_equal(model.apply({'params': params}, tokens[:, :-1]),
                                plain_model.apply({'params': main_params}, tokens[:, :-1]))


@pytest.mark.parametrize('tie', [True, False])
def test_depth_1_predicts_the_token_two_ahead_from_the_last_block_and_the_next_embedding(tie):
  """By hand: the last block's output h, the embedding of token i + 1, the module, the output layer;
  cross-entropy against token i + 2 wherever it exists."""
  config = _config(mtp_depth=1, tie_embeddings=tie)
  tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 17), 0, 97)
  model, params = _init(config, tokens)
  _, stats = _loss_sums(params, {'tokens': tokens, 'loss_mask': jnp.ones((2, 16), bool)}, model)
  _, captured = model.apply({'params': params}, tokens[:, :-1], mutable=['intermediates'],
                            capture_intermediates=lambda m, _: isinstance(m, Block) and m.name == 'block_1')
  h_BLD = captured['intermediates']['block_1']['__call__'][0]
  table_VD = params['token_embedding']['embedding']
  next_BLD = table_VD[jnp.pad(tokens[:, 1:16], ((0, 0), (0, 1)))]
  frozen = config_lib.ml_collections.FrozenConfigDict(config.model)
  _, out_BLD = MultiToken(frozen).apply({'params': params['mtp_1']}, h_BLD, next_BLD, causal_mask(16, 0), None, None)
  logits_BLV = np.asarray(out_BLD @ (table_VD.T if tie else params['output']['kernel']), np.float64)[:, :15]
  targets_BL = np.asarray(tokens[:, 2:])
  log_z = np.log(np.exp(logits_BLV).sum(-1))
  hand = (log_z - np.take_along_axis(logits_BLV, targets_BL[..., None], -1)[..., 0]).sum()
  np.testing.assert_allclose(float(stats['mtp_1/loss_sum']), hand, rtol=1e-5)
  assert float(stats['mtp_1/count']) == 2 * 15


def test_a_target_in_another_document_is_not_scored():
  config = _config(mtp_depth=1)
  config.data.document_mask = True
  tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 17), 0, 97)
  segments = jnp.asarray([[0] * 8 + [1] * 9, [0] * 17])
  model, params = _init(config, tokens)
  mask = jnp.ones((2, 16), bool).at[0, 7].set(False)  # The main loss's own mask at the boundary.
  _, stats = _loss_sums(params, {'tokens': tokens, 'loss_mask': mask, 'segment_ids': segments}, model)
  # Row 0: position i scores token i + 2 when token i + 1's target is scored and i + 2 is in i's document:
  # i = 6 and 7 are not (token 8 starts the second document), nor i = 15 (no token 17); row 1: 15.
  assert float(stats['mtp_1/count']) == 13 + 15


def _sequences_config(**mesh):
  config = _config(mtp_depth=2)
  config.optimizer.update(name='adamw', learning_rate=3e-2, warmup_steps=2)
  config.data.update(batch_size=8, tokenizer='byte')
  config.model.vocab_size = 258
  config.train.steps = 40
  config.mesh.update(mesh)
  return config_lib.validate(config)


# Rows of an arithmetic sequence mod 97: each token fixes every later one.
SEQUENCES = {'tokens': jnp.asarray((np.arange(8)[:, None] * 11 + 3 * np.arange(17)) % 97, jnp.int32),
             'loss_mask': jnp.ones((8, 16), bool)}


def _train(config, devices, steps: int, state):
  """The metrics of `steps` train steps on SEQUENCES over devices from `state`, and the parameters
  after the third step, on the host."""
  layout = train.make_layout(config, devices)
  step = train.jit_train_step(layout, config.train)
  with sharding.activate(layout.mesh, layout.rules):
    state = jax.device_put(state, layout.shardings)
    history, third = [], None
    for i in range(steps):
      state, metrics = step(state, sharding.global_batch(SEQUENCES, layout.batch_sharding, 8))
      history.append({k: float(metrics[k]) for k in ('loss', 'mtp_1/loss', 'mtp_2/loss')})
      if i == 2:
        third = jax.device_get(state.params)
  return history, third


@pytest.mark.slow
def test_training_lowers_the_loss_of_every_depth_and_a_mesh_trains_as_one_device():
  config = _sequences_config()
  start = jax.device_get(train.init_train_state(train.make_layout(config, jax.devices()[:1])))
  one, one_params = _train(config, jax.devices()[:1], 40, start)
  for key in ('loss', 'mtp_1/loss', 'mtp_2/loss'):
    assert one[-1][key] < 0.3 * one[0][key], (key, one[0], one[-1])
  assert one[0]['mtp_2/loss'] == pytest.approx(np.log(258), abs=0.5)
  mesh, mesh_params = _train(_sequences_config(shape=(2, 2, 2)), jax.devices(), 3, start)
  for a, b in zip(one[:3], mesh):
    assert a == pytest.approx(b, rel=1e-5)
  # Adam's first steps divide each gradient by its own size: where a gradient is near zero (a norm's
  # bias), rounding differences grow to ~2e-5 of the array at this rate.
  assert_trees_close(mesh_params, one_params, rtol=1e-4)


def test_mtp_is_refused_where_it_cannot_go():
  config = _config(mtp_depth=1)
  config.model.kind = 'encoder_decoder'
  with pytest.raises(ConfigError, match="model.mtp_depth=1 needs model.kind='decoder'"):
    config_lib.validate(config)
  gpt2_knobs = {}
  llama_knobs = {'positions': 'rope', 'norm': 'rmsnorm', 'mlp': 'swiglu', 'use_bias': False}
  for knobs, family in [(gpt2_knobs, gpt2.GPT2), (llama_knobs, llama.LLAMA)]:
    assert family.problem(_config(**knobs).model) is None
    problem = family.problem(_config(mtp_depth=1, **knobs).model)
    assert problem.startswith('model.mtp_depth=1: a ') and problem.endswith('needs model.mtp_depth=0'), problem
