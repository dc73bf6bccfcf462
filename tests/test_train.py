import functools

import jax
import numpy as np
import pytest

from conftest import one_device_mesh, tiny_config
from lm import train
from lm.data import pipeline
from lm.model import make_model
from lm.optim import learning_rate_schedule, make_optimizer


@pytest.fixture(scope='module')
def setup(tfds_dir, play_files, tmp_path_factory):
  config = tiny_config(tfds_dir, play_files, **{'train.steps': 60, 'optimizer.learning_rate': 1e-2})
  corpus = pipeline.load_corpus(config, tmp_path_factory.mktemp('tok'))
  model = make_model(config.model)
  optimizer = make_optimizer(config)
  return config, corpus, model, optimizer


def test_loss_falls_when_overfitting_one_batch(setup):
  config, corpus, model, optimizer = setup
  batch = next(iter(pipeline.train_dataset(config, corpus)))
  step = jax.jit(functools.partial(train.train_step, model=model, optimizer=optimizer,
                                   schedule=learning_rate_schedule(config)), donate_argnums=0)
  state = train.init_train_state(config, model, optimizer, one_device_mesh(config))
  losses = []
  for _ in range(60):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert abs(losses[0] - np.log(config.model.vocab_size)) < 0.5  # Starts near uniform.
  assert losses[-1] < 0.5 * losses[0], losses
  assert int(state.step) == 60


def test_eval_counts_every_target_and_every_byte(setup):
  config, corpus, model, optimizer = setup
  state = train.init_train_state(config, model, optimizer, one_device_mesh(config))
  token_bytes = np.pad(corpus.tokenizer.token_bytes, (0, config.model.vocab_size - corpus.tokenizer.vocab_size))
  sums = {'loss_sum': 0.0, 'tokens': 0.0, 'bytes': 0.0}
  for batch in pipeline.eval_batches(config, corpus):
    out = train.eval_step(state.params, batch, token_bytes, model=model)
    sums = {k: sums[k] + float(v) for k, v in out.items()}
  texts = [corpus.eval_source[i]['text'].decode() for i in range(len(corpus.eval_source))]
  assert sums['bytes'] == sum(len(t.encode('utf-8')) for t in texts)  # bits/byte divides by the real size.
  num_tokens = sum(1 + len(corpus.tokenizer.encode(t)) for t in texts)
  assert sums['tokens'] == num_tokens - 1
  np.testing.assert_allclose(sums['loss_sum'] / sums['tokens'], np.log(config.model.vocab_size), atol=0.3)
