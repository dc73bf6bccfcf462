"""model.attention_impl='splash': Pallas splash attention (interpreted on CPU) gives the loss and
gradients of the XLA path, for a RoPE + GQA + sliding-window decoder with packed documents, on one
device and under jit with the train step's shardings on a (2, 2, 2) mesh and on (2, 1, 2, 2), whose
context axis gives each device half of the queries."""

import itertools

import jax
import numpy as np
import pytest

from conftest import tiny_config
from lm.config import ConfigError, override
from lm.data import pipeline
from lm.nn import attention as attention_module
from lm.nn.attention import splash_attention
from lm.parallel import sharding
from lm.training import train

SPLASH = {'model.positions': 'rope', 'model.mlp': 'swiglu', 'model.num_heads': 4, 'model.num_kv_heads': 2,
          'model.sliding_window': 96, 'model.max_len': 256, 'data.seq_len': 256, 'data.batch_size': 8,
          'data.document_mask': True, 'model.splash_block_q': 128, 'model.splash_block_kv': 128}


def _loss_and_grads(config, devices, batch):
  layout = train.make_layout(config, devices)
  loss = lambda params, batch: train.loss_sums(params, batch, layout.model)[0] / batch['loss_mask'].sum()
  step = jax.jit(jax.value_and_grad(loss), in_shardings=(layout.shardings.params, layout.batch_sharding))
  with sharding.activate(layout.mesh, layout.rules):
    params = train.init_train_state(layout).params
    value, grads = step(params, sharding.global_batch(batch, layout.batch_sharding, config.data.batch_size))
  return float(value), jax.tree.map(np.asarray, grads)


@pytest.mark.slow
def test_splash_gives_the_loss_and_gradients_of_xla(tfds_dir, play_files, tmp_path, monkeypatch):
  traced = []
  counted = lambda *args, **kwargs: traced.append(args[0].shape) or splash_attention(*args, **kwargs)
  monkeypatch.setattr(attention_module, 'splash_attention', counted)
  config = tiny_config(tfds_dir, play_files, **SPLASH, **{'model.attention_impl': 'xla'})
  corpus = pipeline.load_corpus(config.data, config.model.vocab_size, tmp_path / 'tok')
  batch = next(itertools.islice(iter(pipeline.train_dataset(config.data, corpus, config.seed)), 1))
  assert int(batch['segment_ids'].max()) >= 1  # Rows holding more than one document.
  ref_loss, ref_grads = _loss_and_grads(config, jax.devices()[:1], batch)
  splash = override(config, {'model.attention_impl': 'splash'})
  for devices, mesh in ((jax.devices()[:1], (1, 1, 1)), (jax.devices(), (2, 2, 2)), (jax.devices(), (2, 1, 2, 2))):
    loss, grads = _loss_and_grads(override(splash, {'mesh.shape': mesh}), devices, batch)
    assert loss == pytest.approx(ref_loss, rel=1e-5), mesh
    for path, ref in jax.tree_util.tree_leaves_with_path(ref_grads):
      got = dict(jax.tree_util.tree_leaves_with_path(grads))[path]
      np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=str((mesh, path)))
  assert traced.count((8, 256, 4, 8)) == 6  # Both layers on every mesh went through splash.


def test_what_splash_cannot_run_is_refused_naming_the_keys(tfds_dir, play_files):
  def refused(**overrides):
    with pytest.raises(ConfigError) as e:
      tiny_config(tfds_dir, play_files, **(SPLASH | {'model.attention_impl': 'splash'} | overrides))
    return str(e.value)
  assert 'data.seq_len=192 to be a multiple of 128 and of model.splash_block_q=128' in refused(
      **{'data.seq_len': 192})
  assert 'data.seq_len=384 to be a multiple of 128 and of model.splash_block_q=256' in refused(
      **{'data.seq_len': 384, 'model.max_len': 384, 'model.splash_block_q': 256})
  assert 'model.splash_block_kv=200 must be a multiple of 128' in refused(**{'model.splash_block_kv': 200})
  assert "cannot apply model.attention_dropout=0.1" in refused(**{'model.attention_dropout': 0.1})
  assert ('the 64 tokens per device along the context axis of mesh.shape=(1, 1, 4, 2) to be a multiple of 128'
          in refused(**{'mesh.shape': (1, 1, 4, 2)}))
  # Sequences shorter than a block are one block.
  one_block = {'model.attention_impl': 'splash', 'model.splash_block_q': 512, 'model.splash_block_kv': 512}
  config = tiny_config(tfds_dir, play_files, **(SPLASH | one_block))
  assert config.model.splash_block_q == 512
