import functools

import jax
import numpy as np
import pytest

from conftest import one_device_layout, tiny_config
from lm.data import pipeline
from lm.kinds import make_model
from lm.training import train
from lm.training.optim import learning_rate_schedule, make_optimizer


@pytest.fixture(scope='module')
def setup(tfds_dir, play_files, tmp_path_factory):
  config = tiny_config(tfds_dir, play_files, **{'train.steps': 60, 'optimizer.learning_rate': 1e-2})
  corpus = pipeline.load_corpus(config.data, config.model.vocab_size, tmp_path_factory.mktemp('tok'))
  model = make_model(config.model, config.data)
  optimizer = make_optimizer(config.optimizer, config.train.steps)
  return config, corpus, model, optimizer


@pytest.fixture(scope='module')
def initial_state(setup):
  """The setup model's fresh train state, on the host, for the tests that start from one (each jitted
  init costs a compile as long as a train step's)."""
  return jax.device_get(train.init_train_state(one_device_layout(setup[0])))


def overfit(config, corpus, steps: int, state=None):
  """Losses and final state of `steps` train steps on one fixed batch, from a fresh state or `state`."""
  layout = one_device_layout(config)
  batch = next(iter(pipeline.train_dataset(config.data, corpus, config.seed)))
  step = train.jit_train_step(layout, config.train)
  state = train.init_train_state(layout) if state is None else jax.device_put(state, layout.shardings)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  return losses, state


def test_loss_falls_when_overfitting_one_batch(setup, initial_state):
  config, corpus, _, _ = setup
  losses, state = overfit(config, corpus, 60, initial_state)
  assert abs(losses[0] - np.log(config.model.vocab_size)) < 0.5  # Starts near uniform.
  assert losses[-1] < 0.5 * losses[0], losses
  assert int(state.step) == 60


def test_eval_counts_every_target_and_every_byte(setup, initial_state):
  config, corpus, model, _ = setup
  token_bytes = np.pad(corpus.tokenizer.token_bytes, (0, config.model.vocab_size - corpus.tokenizer.vocab_size))
  sums = {'loss_sum': 0.0, 'tokens': 0.0, 'bytes': 0.0}
  eval_step = jax.jit(functools.partial(train.eval_step, model=model))
  for batch in pipeline.eval_batches(config.data, corpus, config.seed, config.eval.batch_size):
    out = eval_step(initial_state.params, batch, token_bytes)
    sums = {k: sums[k] + float(v) for k, v in out.items()}
  texts = [corpus.eval_source[i]['text'].decode() for i in range(len(corpus.eval_source))]
  assert sums['bytes'] == sum(len(t.encode('utf-8')) for t in texts)  # bits/byte divides by the real size.
  num_tokens = sum(1 + len(corpus.tokenizer.encode(t)) for t in texts)
  assert sums['tokens'] == num_tokens - 1
  np.testing.assert_allclose(sums['loss_sum'] / sums['tokens'], np.log(config.model.vocab_size), atol=0.3)


# Every knob in at least one of these (each combination compiles once, so knobs share the cost).
@pytest.mark.parametrize('knobs', [
    {'model.positions': 'rope', 'model.norm': 'rmsnorm', 'model.mlp': 'swiglu', 'model.num_kv_heads': 1,
     'model.tie_embeddings': False, 'model.use_bias': False,
     'model.embed_dropout': 0.1, 'model.attention_dropout': 0.1, 'model.residual_dropout': 0.1},
    {'model.positions': 'none', 'model.mlp': 'relu', 'model.norm_position': 'post', 'model.qk_norm': True},
    {'model.sliding_window': 8, 'model.embed_multiplier': 5.657, 'model.init': 'normal', 'train.z_loss': 1e-3,
     'train.label_smoothing': 0.1, 'model.moe_experts': 4, 'model.moe_top_k': 2},
], ids=lambda knobs: '-'.join(f'{k.split(".")[1]}={v}' for k, v in knobs.items()))
def test_every_architecture_variant_trains(setup, tfds_dir, play_files, knobs):
  _, corpus, _, _ = setup
  config = tiny_config(tfds_dir, play_files, **{'train.steps': 30, 'optimizer.learning_rate': 1e-2}, **knobs)
  losses, _ = overfit(config, corpus, 30)
  assert losses[-1] < 0.6 * losses[0], losses


def test_z_loss_and_label_smoothing_follow_their_formulas(setup, initial_state):
  config, corpus, model, _ = setup
  params = initial_state.params
  batch = next(iter(pipeline.train_dataset(config.data, corpus, config.seed)))
  logits = np.asarray(model.apply({'params': params}, batch['tokens'][:, :-1]), np.float64)
  log_z = np.log(np.exp(logits).sum(-1))
  target = np.take_along_axis(logits, batch['tokens'][:, 1:, None], -1)[..., 0]
  mask = batch['loss_mask']
  ce = ((log_z - target) * mask).sum()
  smooth = ((log_z - logits.mean(-1)) * mask).sum()
  for z, a in [(0.0, 0.0), (1e-2, 0.0), (0.0, 0.1), (1e-2, 0.1)]:
    total, count, _ = train.loss_sums(params, batch, model, z_loss=z, label_smoothing=a)
    expected = (1 - a) * ce + a * smooth + z * (np.square(log_z) * mask).sum()
    np.testing.assert_allclose(float(total), expected, rtol=1e-5)
    assert float(count) == mask.sum()


@pytest.mark.parametrize('chunk', [5, 16])  # 5 leaves a short last chunk, padded and masked.
def test_chunked_loss_equals_the_plain_one(setup, initial_state, chunk):
  config, corpus, model, _ = setup
  params = initial_state.params
  batch = next(iter(pipeline.train_dataset(config.data, corpus, config.seed)))
  batch['loss_mask'][0, 20:] = False  # Masked targets, inside chunks.
  options = {'z_loss': 1e-2, 'label_smoothing': 0.1}
  value_and_grad = lambda chunk: jax.jit(jax.value_and_grad(
      lambda p: train.loss_sums(p, batch, model, logits_chunk=chunk, **options)[0]))(params)
  (plain, plain_grads), (chunked, chunked_grads) = value_and_grad(0), value_and_grad(chunk)
  np.testing.assert_allclose(float(chunked), float(plain), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(plain_grads), jax.tree.leaves(chunked_grads)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(a))))


def test_dropout_masks_are_seeded_by_the_step(setup, initial_state, tfds_dir, play_files):
  _, corpus, _, _ = setup
  config = tiny_config(tfds_dir, play_files, **{'model.residual_dropout': 0.3, 'model.attention_dropout': 0.3})
  model, optimizer = make_model(config.model, config.data), make_optimizer(config.optimizer, config.train.steps)
  step = jax.jit(functools.partial(train.train_step, model=model, optimizer=optimizer,
                                   schedule=learning_rate_schedule(config.optimizer, config.train.steps)))
  batch = next(iter(pipeline.train_dataset(config.data, corpus, config.seed)))
  state = jax.device_put(initial_state, jax.devices()[0])  # Dropout adds no parameters: the same state fits.
  loss = lambda s: float(step(s, batch)[1]['loss'])
  assert loss(state) == loss(state)  # The same step draws the same masks ...
  later = state.replace(step=state.step + 1)
  assert loss(later) != loss(state)  # ... another step other masks (same params, same batch).
  eval_loss = jax.jit(functools.partial(train.eval_step, model=model))(
      state.params, batch, np.ones(config.model.vocab_size, np.int32))
  plain_config = tiny_config(tfds_dir, play_files)
  plain = jax.jit(functools.partial(train.eval_step, model=make_model(plain_config.model, plain_config.data)))(
      state.params, batch, np.ones(config.model.vocab_size, np.int32))
  assert float(eval_loss['loss_sum']) == float(plain['loss_sum'])  # Eval sees no dropout.
