"""The encoder-decoder: attention directions, padding, span corruption, seq2seq data, training, fine-tuning."""

import itertools
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
import lm
from lm import config as config_lib
from lm import evaluate, generate, kinds
from lm.config import DEFAULT_LOGICAL_AXIS_RULES
from lm.data import pipeline, spans
from lm.inference import decode, harness
from lm.kinds import make_model
from lm.parallel import sharding
from lm.training import loop, saved, train
from test_sharding import SHARDABLE, assert_trees_close, train_on
from test_train import overfit

SPAN = {'model.kind': 'encoder_decoder', 'data.objective': 'span_corruption'}


# Models, their parameters and their jitted forward passes, made once per variant and shared by the tests.
_MODELS, _FORWARDS = {}, {}


def _model(**knobs):
  key = tuple(sorted(knobs.items()))
  if key not in _MODELS:
    config = config_lib.base_config()
    config.model.update(kind='encoder_decoder', vocab_size=260, max_len=16, num_layers=2, num_heads=2, d_model=16,
                        mlp_dim=32, **knobs)
    config.data.update(objective='seq2seq', tokenizer='byte')
    model = make_model(config.model, config.data)
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 12), jnp.int32),
                                               jnp.zeros((1, 10), jnp.int32))['params'])
    _MODELS[key] = model, params
  return _MODELS[key]


def _forward(model, method: str | None = None):
  """model.apply (or its `method`) under jit: one compile per shape, where op by op a scan compiles at each call."""
  if (model, method) not in _FORWARDS:
    _FORWARDS[model, method] = jax.jit(lambda params, *args: model.apply({'params': params}, *args, method=method))
  return _FORWARDS[model, method]


@pytest.fixture(scope='module')
def model_and_params():
  return _model()


def _tokens(seed, shape):
  return jax.random.randint(jax.random.PRNGKey(seed), shape, 0, 90)  # Never the byte tokenizer's pad (256).


def test_encoder_is_bidirectional(model_and_params):
  model, params = model_and_params
  inputs = _tokens(1, (2, 12))
  encode = _forward(model, 'encode')
  base, changed = encode(params, inputs), encode(params, inputs.at[:, 9].set((inputs[:, 9] + 1) % 90))
  assert np.abs(base[:, :9] - changed[:, :9]).max() > 1e-4  # Earlier positions see a later token.


@pytest.mark.parametrize('knobs', [{}, {'positions': 'rope', 'norm': 'rmsnorm', 'mlp': 'swiglu', 'num_kv_heads': 1},
                                   {'scan_layers': True}], ids=str)
def test_decoder_is_causal_and_reads_the_inputs(knobs):
  model, params = _model(**knobs)
  inputs, tokens = _tokens(1, (2, 12)), _tokens(2, (2, 10))
  forward = _forward(model)
  apply = lambda x, t: forward(params, x, t)
  base = apply(inputs, tokens)
  changed = apply(inputs, tokens.at[:, 6].set((tokens[:, 6] + 1) % 90))
  np.testing.assert_array_equal(base[:, :6], changed[:, :6])
  assert np.abs(base[:, 6:] - changed[:, 6:]).max() > 1e-4
  other_input = apply(inputs.at[:, 11].set((inputs[:, 11] + 1) % 90), tokens)
  assert np.abs(base[:, 0] - other_input[:, 0]).max() > 1e-4  # Cross-attention sees every input.


def test_input_padding_is_invisible(model_and_params):
  model, params = model_and_params
  inputs, tokens = _tokens(1, (2, 12)), _tokens(2, (2, 10))
  padded = jnp.concatenate([inputs[:, :8], jnp.full((2, 4), 256)], axis=1)  # Byte tokenizer's pad id.
  forward = _forward(model)
  short = forward(params, inputs[:, :8], tokens)
  np.testing.assert_allclose(forward(params, padded, tokens), short, rtol=1e-5, atol=1e-5)


def test_span_corruption_masks_the_configured_share_and_round_trips():
  raw_len, num_noise, num_spans, target_len = config_lib.span_lengths(128, 0.15, 3.0)
  assert raw_len - num_noise + num_spans <= 128 < raw_len + 1 - round((raw_len + 1) * 0.15) + num_spans
  assert num_noise == round(raw_len * 0.15) and num_spans == round(num_noise / 3)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 200, raw_len)
  for _ in range(20):
    mask = spans.noise_mask(raw_len, num_noise, num_spans, rng)
    assert mask.sum() == num_noise and not mask[0]
    assert np.sum(mask[1:] & ~mask[:-1]) == num_spans  # Span starts.
    inputs, target = spans.corrupt(tokens, mask, vocab_size=1000)
    assert len(inputs) == raw_len - num_noise + num_spans and len(target) == target_len
    # Put each span back where its sentinel is: the original window.
    pieces, rest = {}, list(target)
    while rest:
      sentinel, rest = rest[0], rest[1:]
      span = list(itertools.takewhile(lambda t: t < 1000 - num_spans, rest))
      pieces[sentinel], rest = span, rest[len(span):]
    restored = [t for i in inputs for t in (pieces[i] if i >= 1000 - num_spans else [i])]
    np.testing.assert_array_equal(restored, tokens)
    assert sorted(pieces) == list(range(1000 - num_spans, 1000))


@pytest.fixture(scope='module')
def span_setup(tfds_dir, play_files, tmp_path_factory):
  # One encoder and one decoder block: what span corruption trains does not depend on depth.
  config = tiny_config(tfds_dir, play_files, **SPAN, **{'train.steps': 40, 'optimizer.learning_rate': 1e-2,
                                                        'model.num_layers': 1})
  return config, pipeline.load_corpus(config.data, config.model.vocab_size, tmp_path_factory.mktemp('tok'))


def test_span_corruption_batches(span_setup):
  config, corpus = span_setup
  _, _, num_spans, target_len = config_lib.span_lengths(32, 0.15, 3.0)
  assert corpus.tokenizer.vocab_size <= config.model.vocab_size - num_spans  # Sentinels stay free.
  batches = list(itertools.islice(iter(pipeline.train_dataset(config.data, corpus, config.seed)), 3))
  again = list(itertools.islice(iter(pipeline.train_dataset(config.data, corpus, config.seed)), 3))
  for batch, same in zip(batches, again):
    assert batch['inputs'].shape == (4, 32) and batch['tokens'].shape == (4, target_len + 1)
    assert batch['loss_mask'].all()
    for key in batch:
      np.testing.assert_array_equal(batch[key], same[key])  # Seeded.
    sentinels = batch['inputs'] >= config.model.vocab_size - num_spans
    assert (sentinels.sum(axis=1) == num_spans).all()
    assert (batch['tokens'][:, 0] == corpus.tokenizer.bos_id).all()


def test_span_corruption_trains(span_setup):
  config, corpus = span_setup
  losses, _ = overfit(config, corpus, 40)
  assert losses[-1] < 0.5 * losses[0], losses


@pytest.fixture(scope='module')
def pairs_file(tmp_path_factory):
  """A learnable task: the target is the input in capitals."""
  rng = np.random.default_rng(0)
  words = ['the', 'king', 'queen', 'sword', 'crown', 'night', 'ghost', 'fool', 'love', 'death']
  path = tmp_path_factory.mktemp('pairs') / 'pairs.jsonl'
  lines = []
  for _ in range(200):
    chosen = list(rng.choice(words, size=3))
    lines.append(json.dumps({'input': ' '.join(chosen), 'target': ' '.join(chosen).upper()}))
  path.write_text('\n'.join(lines) + '\n')
  return str(path)


def _seq2seq_config(tfds_dir, play_files, pairs_file, **extra):
  return tiny_config(tfds_dir, play_files, **{
      'model.kind': 'encoder_decoder', 'data.objective': 'seq2seq', 'data.name': 'text_pairs',
      'data.paths': pairs_file, 'data.tokenizer': 'byte', 'model.vocab_size': 258, 'data.seq_len': 24,
      'data.target_len': 24, 'model.max_len': 32, 'eval.sample_prompt': 'king crown ghost'} | extra)


def test_seq2seq_examples_hold_the_pairs(tfds_dir, play_files, pairs_file, tmp_path):
  config = _seq2seq_config(tfds_dir, play_files, pairs_file)
  corpus = pipeline.load_corpus(config.data, config.model.vocab_size, tmp_path)
  batch = next(iter(pipeline.eval_batches(config.data, corpus, config.seed, config.eval.batch_size)))
  first = {k: corpus.eval_source[0][k].decode() for k in ('input', 'target')}
  t = corpus.tokenizer
  assert t.decode(batch['inputs'][0]) == first['input']
  length = len(first['target'].encode()) + 1  # The target, then the end token.
  np.testing.assert_array_equal(batch['loss_mask'][0], np.arange(24) < length)
  assert t.decode(batch['tokens'][0, 1:length]) == first['target'] and batch['tokens'][0, length] == t.bos_id


@pytest.mark.slow
def test_span_corruption_pretraining_then_seq2seq_fine_tuning(tfds_dir, play_files, pairs_file, tmp_path):
  one_block = {'model.num_layers': 1, 'model.vocab_size': 272}  # One encoder and one decoder block learn the task.
  pretrain = _seq2seq_config(tfds_dir, play_files, pairs_file, **one_block, **{
      'data.objective': 'span_corruption', 'data.name': 'text_files', 'data.paths': play_files,
      'train.steps': 4, 'eval.num_samples': 0})
  devices = jax.devices()[:1]
  trainer = loop.Trainer(pretrain, tmp_path / 'pretrain', devices)
  trainer.run()
  pretrained = jax.device_get(trainer.state.params)
  finetune = _seq2seq_config(tfds_dir, play_files, pairs_file, **one_block, **{
      'train.steps': 100, 'optimizer.learning_rate': 5e-3, 'eval.every': 100,
      'checkpoint.every': 100,
      'checkpoint.init_from': str(tmp_path / 'pretrain'), 'eval.num_samples': 1, 'eval.sample_temperature': 0.01})
  tuner = loop.Trainer(finetune, tmp_path / 'finetune', devices)
  assert int(tuner.state.step) == 0
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(tuner.state.params), pretrained)
  result = tuner.run()
  losses = [r['train/loss'] for r in map(json.loads, (tmp_path / 'finetune' / 'metrics.jsonl').open())
            if 'train/loss' in r]
  assert losses[-1] < 0.5 * losses[0], losses
  assert result['loss'] < 0.4 * np.log(272), result  # Well below the 5.6 nats of a uniform guess.
  sample = (tmp_path / 'finetune' / 'samples' / 'step_0000100.txt').read_text()
  assert sample.startswith('king crown ghost\n=>\n')
  # What reads text as one sequence refuses it, in the same words (lm.kinds.require_decoder).
  run = saved.load(tmp_path / 'finetune')
  calls = {'lm.generate': lambda: generate.generate(run, ['king']), 'lm.evaluate': lambda: evaluate.evaluate(run),
           'the harness backend': lambda: harness.RunModel(run),
           "the 'text-generation' pipeline": lambda: lm.pipeline('text-generation', str(tmp_path / 'finetune'))}
  for task, call in calls.items():
    with pytest.raises(config_lib.ConfigError, match=f"holds a model.kind='encoder_decoder' model, whose prompt is "
                                                     f"its encoder's input: {re.escape(task)} takes decoders"):
      call()


def test_bad_encoder_decoder_configs_name_both_keys(tfds_dir, play_files):
  cases = [
      ({'model.kind': 'encoder_decoder'}, "model.kind='encoder_decoder' needs data.objective"),
      ({'data.objective': 'span_corruption'}, "needs model.kind='encoder_decoder'"),
      ({'model.num_encoder_layers': 2}, "model.num_encoder_layers=2 needs model.kind='encoder_decoder'"),
      (SPAN | {'model.vocab_size': 258, 'data.tokenizer': 'byte'}, 'model.vocab_size=258 must be >= 258 + 2'),
      ({'model.kind': 'encoder_decoder', 'data.objective': 'seq2seq', 'data.target_len': 40},
       'data.target_len=40 need 40 decoder positions: must be <= model.max_len=32'),
      ({'model.moe_experts': 2, 'model.moe_top_k': 3}, 'model.moe_top_k=3 must be <= model.moe_experts=2'),
      ({'model.moe_experts': 2, 'model.moe_every': 2, 'model.scan_layers': True}, 'model.moe_every=2 mixes'),
  ]
  for overrides, message in cases:
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
      tiny_config(tfds_dir, play_files, **overrides)


@pytest.mark.slow
def test_encoder_decoder_with_expert_parallel_moe_matches_one_device(tfds_dir, play_files, tmp_path):
  """The encoder-decoder and the mixture of experts under the same sharding: experts split over
  `data` (expert parallelism), the rest as the default rules say."""
  # First, so that in the dispatched activations [expert, batch, slot, embed] the experts take `data`.
  rules = (('expert', 'data'),) + tuple(rule for rule in DEFAULT_LOGICAL_AXIS_RULES if rule[0] != 'expert')
  # One block each in the encoder and the decoder: experts in both, and shorter compiles than with two.
  knobs = SHARDABLE | {'model.kind': 'encoder_decoder', 'data.objective': 'span_corruption', 'model.moe_experts': 4,
                       'model.moe_top_k': 2, 'mesh.logical_axis_rules': rules, 'model.num_layers': 1}
  config = tiny_config(tfds_dir, play_files, **knobs)
  corpus = pipeline.load_corpus(config.data, config.model.vocab_size, tmp_path)
  batches = list(itertools.islice(iter(pipeline.train_dataset(config.data, corpus, config.seed)), 3))
  # Both runs start from the same state (how init shards is test_sharding's; each jitted init costs a compile).
  layout = train.make_layout(config, jax.devices()[:1])
  with sharding.activate(layout.mesh, layout.rules):
    initial = jax.device_get(train.init_train_state(layout))
  ref_losses, ref_state = train_on(config, jax.devices()[:1], batches, initial)
  config = tiny_config(tfds_dir, play_files, **knobs, **{'mesh.shape': (2, 2, 2)})
  losses, state = train_on(config, jax.devices(), batches, initial)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert_trees_close(state.params, ref_state.params)
  up = state.params['encoder']['block_0']['moe']['up_kernel']
  assert up.sharding.spec[0] == 'data' and up.addressable_shards[0].data.shape[0] == 2  # Two experts per shard.
  # The dispatched tokens [expert, batch, slot, embed]: split by expert over `data` (all-to-all, not all-gather).
  assert nn.logical_to_mesh_axes(('expert', 'batch', None, 'embed'), rules)[0] == 'data'


@pytest.mark.parametrize('knobs', [{}, {'positions': 'rope', 'num_kv_heads': 1, 'sliding_window': 3,
                                        'scan_layers': True}], ids=['learned', 'rope_mqa_window_scan'])
def test_cached_decoding_gives_the_full_forward_logits(knobs):
  """The decoder reads its tokens through the KV cache, the input encoded once (lm.kinds), and gets
  the logits of the full forward pass over inputs and tokens."""
  model, params = _model(**knobs)
  kind = kinds.of_model(model)
  inputs = _tokens(3, (2, 12)).at[1, 9:].set(256)  # Row 1 ends in padding.
  tokens = _tokens(4, (2, 10))
  full = _forward(model)(params, inputs, tokens)
  context = jax.jit(lambda p, i: kind.decoding_context(model, p, i))(params, inputs)
  step = jax.jit(lambda p, cache, t, pos, ctx: kind.decode_step(model, p, cache, t, pos, jnp.ones_like(t, bool), ctx))
  positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
  logits, cache = step(params, kind.init_cache(model, 2), tokens[:, :4], positions[:, :4], context)  # Prefill four.
  np.testing.assert_allclose(logits, full[:, :4], rtol=1e-5, atol=1e-5)
  for t in range(4, 10):  # Then one at a time.
    logits, cache = step(params, cache, tokens[:, t:t + 1], positions[:, t:t + 1], context)
    np.testing.assert_allclose(logits[:, 0], full[:, t], rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # Over 9 s on 2 cores: the fast loop stays under 5 minutes.
def test_greedy_sampling_through_the_cache_equals_repeated_argmax(model_and_params):
  model, params = model_and_params
  inputs = _tokens(5, (12,))
  new = decode.sample(model, params, np.array([2]), num_samples=2, num_tokens=6, temperature=1.0,
                      rng=jax.random.PRNGKey(0), input_ids=inputs, sampling=decode.Sampling(temperature=0.0))
  tokens = jnp.array([[2]])
  for _ in range(6):  # Each the argmax of a full forward pass over the tokens so far.
    logits = _forward(model)(params, inputs[None], tokens)
    tokens = jnp.concatenate([tokens, jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32)], axis=1)
  np.testing.assert_array_equal(new, np.repeat(np.asarray(tokens[:, 1:]), 2, axis=0))
