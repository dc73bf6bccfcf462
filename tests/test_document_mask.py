"""data.document_mask: packed documents never see each other, positions restart, and the loss never
predicts a document's first token from the one before; the same on a mesh as on one device."""

from __future__ import annotations

import itertools

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, tiny_config
from lm import config as config_lib
from lm.config import ConfigError
from lm.data import pipeline, spans
from lm.data.builders import normalize_text, shakespeare_plays_dir
from lm.data.packing import PackIterDataset
from lm.kinds import make_model
from lm.nn.attention import attention, causal_mask, fused_attention, same_segment, segment_positions
from test_sharding import SHARDABLE, train_on

BOS = 9


def _windows(docs, seq_len, **kwargs):
  source = grain.MapDataset.source([np.array(d, np.int32) for d in docs]).to_iter_dataset()
  return PackIterDataset(source, seq_len=seq_len, pad_id=0, **kwargs)


def test_packed_windows_number_their_documents_and_mask_first_tokens():
  docs = [[BOS, 1, 2], [BOS, 3], [BOS, 4, 5, 6, 7]]
  windows = list(_windows(docs, 4, pad_final=True, segment_ids=True))
  plain = list(_windows(docs, 4, pad_final=True))
  for w, p in zip(windows, plain, strict=True):  # The same tokens as without document masking.
    np.testing.assert_array_equal(w['tokens'], p['tokens'])
  np.testing.assert_array_equal(windows[0]['tokens'], [BOS, 1, 2, BOS, 3])
  np.testing.assert_array_equal(windows[0]['segment_ids'], [1, 1, 1, 2, 2])
  np.testing.assert_array_equal(windows[0]['loss_mask'], [True, True, False, True])  # Not 2 -> BOS.
  np.testing.assert_array_equal(windows[1]['segment_ids'], [1, 2, 2, 2, 2])
  np.testing.assert_array_equal(windows[1]['loss_mask'], [False, True, True, True])
  np.testing.assert_array_equal(windows[2]['segment_ids'], [1, 1, 0, 0, 0])  # The padded tail.
  np.testing.assert_array_equal(windows[2]['loss_mask'], [True, False, False, False])
  # Restored mid-stream, the windows go on with the same documents and numbers.
  it = iter(_windows(docs, 4, pad_final=True, segment_ids=True))
  next(it)
  state = it.get_state()
  resumed = iter(_windows(docs, 4, pad_final=True, segment_ids=True))
  resumed.set_state(state)
  for w, r in zip(windows[1:], resumed, strict=True):
    for name in w:
      np.testing.assert_array_equal(r[name], w[name])


def test_segment_positions_restart_at_each_document():
  segments = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
  np.testing.assert_array_equal(segment_positions(segments), [[0, 1, 2, 0, 1, 0, 0, 1], list(range(8))])


def _decoder(**model):
  config = config_lib.base_config()
  config.model.update(vocab_size=101, max_len=192, num_layers=2, num_heads=4, d_model=32, mlp_dim=64, **model)
  net = make_model(config.model, config.data)
  params = jax.jit(net.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params']
  return net, params


@pytest.mark.parametrize('model', [
    {'positions': 'learned'},
    {'positions': 'rope', 'num_kv_heads': 2, 'sliding_window': 12},
    {'positions': 'rope', 'num_kv_heads': 1, 'qk_norm': True, 'scan_layers': True},
], ids=['learned', 'rope-gqa-window', 'mqa-scan'])
def test_a_packed_row_gives_each_document_the_logits_it_has_alone(model):
  """Three documents in 160 positions (more than one block of blocked causal attention), the last cut
  by the window's end: each one's logits equal those of it run alone, from position 0."""
  net, params = _decoder(**model)
  lengths = (50, 70, 40)
  docs = [np.asarray(jax.random.randint(jax.random.PRNGKey(i), (n,), 1, 101)) for i, n in enumerate(lengths)]
  tokens = np.concatenate(docs)[None]
  segments = np.repeat([1, 2, 3], lengths)[None]
  packed = jax.jit(lambda t, s: net.apply({'params': params}, t, segments_BL=s))(tokens, segments)[0]
  unmasked = jax.jit(lambda t: net.apply({'params': params}, t))(tokens)[0]
  start = 0
  for doc in docs:
    alone = jax.jit(lambda t: net.apply({'params': params}, t))(doc[None])[0]
    np.testing.assert_allclose(packed[start:start + len(doc)], alone, rtol=1e-5, atol=1e-5)
    start += len(doc)
  assert np.abs(unmasked[60:70] - packed[60:70]).max() > 1e-3  # Without the mask, documents mix.


@pytest.mark.parametrize('window, kv_heads', [(0, 4), (5, 2)])
def test_attention_kernels_apply_the_document_mask_alike(window, kv_heads):
  """`attention` blocked and whole, and jax.nn.dot_product_attention as attention_impl='cudnn' calls
  it (with its XLA kernel here), under causal + document masks."""
  q = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 4, 8))
  k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, 12, kv_heads, 8)) for i in (1, 2))
  segments = jnp.array([[1] * 5 + [2] * 7, [1] * 3 + [2] * 3 + [3] * 6])
  mask = causal_mask(12, window) & same_segment(segments, segments)
  k_heads, v_heads = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  whole = attention(q, k_heads, v_heads, mask)
  blocked = attention(q, k_heads, v_heads, mask, causal_block=4, window=window)
  fused = fused_attention(q, k, v, mask, True, window, 'xla')
  np.testing.assert_allclose(blocked, whole, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(fused, whole, rtol=1e-6, atol=1e-6)
  # Row 0's second document, alone.
  alone = attention(q[:1, 5:], k_heads[:1, :, 5:], v_heads[:1, :, 5:], causal_mask(7, window))
  np.testing.assert_allclose(whole[:1, 5:], alone, rtol=1e-6, atol=1e-6)


def test_encoder_decoder_packed_pairs_equal_each_pair_alone():
  """Two (input, target) pairs packed into one row with segment ids: each pair's logits equal its
  own, encoder, decoder and cross-attention all kept within the pair."""
  config = config_lib.load_experiment(ROOT / 'experiments' / 't5.py')
  config.model.update(num_layers=2, num_encoder_layers=2, d_model=32, num_heads=2, vocab_size=101, max_len=32,
                      residual_dropout=0.0)
  net = make_model(config.model, config.data)
  rng = np.random.default_rng(0)
  inputs = [rng.integers(1, 101, n).astype(np.int32) for n in (9, 7)]
  targets = [rng.integers(1, 101, n).astype(np.int32) for n in (5, 6)]
  params = jax.jit(net.init)(jax.random.PRNGKey(0), inputs[0][None], targets[0][None])['params']
  pad = np.zeros(2, np.int32)  # Encoder padding (pad_id 0) after both inputs.
  packed_inputs = np.concatenate(inputs + [pad])[None]
  input_segments = np.repeat([1, 2, 0], [9, 7, 2])[None]
  packed_targets = np.concatenate(targets)[None]
  segments = np.repeat([1, 2], [5, 6])[None]
  apply = jax.jit(lambda *a, **k: net.apply({'params': params}, *a, **k))
  packed = apply(packed_inputs, packed_targets, input_segments_BS=input_segments, segments_BL=segments)[0]
  np.testing.assert_allclose(packed[:5], apply(inputs[0][None], targets[0][None])[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed[5:], apply(inputs[1][None], targets[1][None])[0], rtol=1e-5, atol=1e-5)


def test_span_corruption_keeps_each_token_with_its_document():
  """Window 0 1 2 | 3 4 5 6 (two documents) with spans at 2-3 (crossing the boundary) and at 5."""
  tokens = np.arange(7)
  segments = np.array([1, 1, 1, 2, 2, 2, 2])
  mask = np.array([0, 0, 1, 1, 0, 1, 0], bool)
  inputs, target = spans.corrupt(tokens, mask, vocab_size=100)
  np.testing.assert_array_equal(inputs, [0, 1, 99, 4, 98, 6])
  np.testing.assert_array_equal(target, [99, 2, 3, 98, 5])
  out = spans.corrupt_segments(segments, mask, seq_len=8)
  np.testing.assert_array_equal(out['input_segment_ids'], [1, 1, 1, 2, 2, 2, 0, 0])
  # The decoder reads start, 99, 2, 3, 98 to predict 99, 2, 3, 98, 5; token 3 begins document 2.
  np.testing.assert_array_equal(out['segment_ids'], [1, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(out['loss_mask'], [True, True, False, True, True])


@pytest.fixture(scope='module')
def short_docs(tmp_path_factory) -> str:
  """48 files of 40-160 characters of the plays: documents shorter than a sequence."""
  folder = tmp_path_factory.mktemp('short_docs')
  text = normalize_text(sorted(shakespeare_plays_dir().glob('*/*.md'))[0].read_text(encoding='utf-8'))
  start = 0
  for i in range(48):
    size = 40 + 120 * (i * 7 % 11) // 10
    (folder / f'{i:02d}.txt').write_text(text[start:start + size] + '\n', encoding='utf-8')
    start += size
  return str(folder / '*.txt')


@pytest.fixture(scope='module')
def masked_batches(tfds_dir, short_docs, tmp_path_factory):
  config = tiny_config(tfds_dir, short_docs, **SHARDABLE, **{'data.document_mask': True})
  corpus = pipeline.load_corpus(config.data, config.model.vocab_size, tmp_path_factory.mktemp('tok'))
  batches = list(itertools.islice(iter(pipeline.train_dataset(config.data, corpus, config.seed)), 5))
  plain = tiny_config(tfds_dir, short_docs, **SHARDABLE)
  plain_batches = list(itertools.islice(iter(pipeline.train_dataset(plain.data, corpus, plain.seed)), 5))
  return config, corpus, batches, plain_batches


def test_batches_mark_documents_where_the_separators_are(masked_batches):
  config, corpus, batches, plain_batches = masked_batches
  for batch, plain in zip(batches, plain_batches):
    np.testing.assert_array_equal(batch['tokens'], plain['tokens'])  # The same stream, only marked.
    tokens, segments = batch['tokens'], batch['segment_ids']
    starts = segments[:, 1:] != segments[:, :-1]
    np.testing.assert_array_equal(starts, tokens[:, 1:] == corpus.tokenizer.bos_id)
    np.testing.assert_array_equal(batch['loss_mask'], plain['loss_mask'] & ~starts)
  assert min(int(b['segment_ids'].max()) for b in batches) >= 2  # Rows holding several documents.
  eval_batch = next(pipeline.eval_batches(config.data, corpus, config.seed, 16))
  assert eval_batch['segment_ids'].shape == eval_batch['tokens'].shape


@pytest.mark.slow
def test_masked_training_on_mesh_222_equals_one_device(tfds_dir, short_docs, masked_batches):
  config, _, batches, plain_batches = masked_batches
  ref, _ = train_on(config, jax.devices()[:1], batches)
  sharded, _ = train_on(config_lib.override(config, {'mesh.shape': (2, 2, 2)}), jax.devices(), batches)
  np.testing.assert_allclose(sharded, ref, rtol=1e-5)
  assert ref[-1] < ref[0]
  plain, _ = train_on(tiny_config(tfds_dir, short_docs, **SHARDABLE), jax.devices()[:1], plain_batches)
  assert np.abs(plain - ref).max() > 1e-4  # The mask changes what is computed.


def test_masked_span_corruption_batches_keep_each_token_with_its_document(tfds_dir, short_docs, tmp_path):
  """Span corruption over documents shorter than a window: each input and target token carries its
  document, padding none, and the loss skips each target that begins a document; the encoder-decoder
  takes such batches (its sharded training equals one device's as the decoder's does, above)."""
  config = tiny_config(tfds_dir, short_docs, **SHARDABLE, **{
      'model.kind': 'encoder_decoder', 'data.objective': 'span_corruption', 'data.document_mask': True})
  corpus = pipeline.load_corpus(config.data, config.model.vocab_size, tmp_path)
  batches = list(itertools.islice(iter(pipeline.train_dataset(config.data, corpus, config.seed)), 4))
  for batch in batches:
    np.testing.assert_array_equal(batch['input_segment_ids'] == 0, batch['inputs'] == corpus.tokenizer.pad_id)
    assert batch['segment_ids'].shape == batch['tokens'].shape and batch['input_segment_ids'].max() >= 2
    starts = batch['segment_ids'][:, 1:] != batch['segment_ids'][:, :-1]
    np.testing.assert_array_equal(batch['loss_mask'], ~starts)
  net = make_model(config.model, config.data)
  params = jax.jit(net.init)(jax.random.PRNGKey(0), batches[0]['inputs'][:1], batches[0]['tokens'][:1, :-1])
  logits = jax.jit(lambda b: net.apply(params, b['inputs'], b['tokens'][:, :-1], input_segments_BS=b[
      'input_segment_ids'], segments_BL=b['segment_ids'][:, :-1]))(batches[0])
  assert logits.shape[:2] == batches[0]['loss_mask'].shape and np.isfinite(np.asarray(logits)).all()


def test_document_mask_with_one_pair_per_row_is_refused(tfds_dir, play_files):
  config = config_lib.load_experiment(f"{ROOT / 'experiments' / 't5.py'}:seq2seq")
  config = config_lib.override(config, {'data.document_mask': True, 'data.name': 'text_pairs',
                                        'data.paths': play_files})
  with pytest.raises(ConfigError, match=r"data.document_mask=True .* data.objective='seq2seq'"):
    config_lib.validate(config)
