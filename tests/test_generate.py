"""Generation: top-k / top-p / repetition penalty, batched prompts of different lengths, one compile
per shape bucket, stop strings, sharded decoding, the CLI and lm.evaluate on a trained workdir."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import ROOT, tiny_config
from lm.analysis import results
from lm.config import ConfigError, flatten, override
from lm.data.builders import normalize_text, shakespeare_plays_dir
from lm.evaluate import evaluate
from lm.generate import generate
from lm.inference import decode
from lm.nn.layers import LowPrecisionKernel
from lm.nn.model import stack_layers
from lm.training import checkpoint, loop, saved
from test_decode import _decoder, greedy_full

PROBS = np.array([0.5, 0.3, 0.15, 0.05])


def _draws(sampling: decode.Sampling, seen=(False,) * 4, n: int = 4000) -> np.ndarray:
  logits_NV = jnp.tile(jnp.log(PROBS), (n, 1))
  seen_NV = jnp.tile(jnp.array(seen), (n, 1))
  return np.asarray(decode.next_token(logits_NV, seen_NV, jax.random.PRNGKey(0), sampling))


def test_top_k_and_top_p_never_draw_outside():
  counts = lambda d: np.bincount(d, minlength=4) / len(d)
  top_p = counts(_draws(decode.Sampling(top_p=0.75)))  # 0.5 + 0.3 reach 0.75: the nucleus is {0, 1}.
  assert top_p[2:].sum() == 0 and abs(top_p[0] - 0.5 / 0.8) < 0.03
  top_k = counts(_draws(decode.Sampling(top_k=3)))
  assert top_k[3] == 0 and abs(top_k[2] - 0.15 / 0.95) < 0.02
  assert set(_draws(decode.Sampling(top_p=0.01))) == {0}  # The most likely token always stays.
  both = counts(_draws(decode.Sampling(top_k=3, top_p=0.9)))  # Over the top 3: 0.5/0.95 + 0.3/0.95 < 0.9.
  assert both[3] == 0 and both[2] > 0.1
  cold = counts(_draws(decode.Sampling(temperature=0.5)))
  np.testing.assert_allclose(cold, PROBS ** 2 / np.sum(PROBS ** 2), atol=0.03)


def test_repetition_penalty_divides_seen_logits():
  logits = jnp.array([[2.0, -1.0, 0.5]])
  out = decode.filter_logits(logits, jnp.array([[True, True, False]]), decode.Sampling(repetition_penalty=2.0))
  np.testing.assert_allclose(out, [[1.0, -2.0, 0.5]])
  greedy = decode.Sampling(temperature=0.0, repetition_penalty=1e3)
  assert int(decode.next_token(logits, jnp.array([[True, False, False]]), jax.random.PRNGKey(0), greedy)[0]) == 2


def test_batched_prompts_of_different_lengths_decode_as_if_alone():
  model, params = _decoder(positions='rope', num_kv_heads=2)
  prompts = [np.array([5, 17, 3], np.int32), np.array([9], np.int32), np.arange(1, 8, dtype=np.int32)]
  out = decode.generate_ids(model, params, prompts, max_new_tokens=6, sampling=decode.Sampling(temperature=0.0),
                            rng=jax.random.PRNGKey(0))
  for prompt, row in zip(prompts, out):
    assert list(row) == greedy_full(model, params, prompt, 6)


def test_cache_grows_by_buckets_and_still_decodes_exactly():
  model, params = _decoder(max_len=300, positions='rope', sliding_window=100)
  assert [decode.cache_bucket(n, 300) for n in (40, 129, 257)] == [128, 256, 300]
  prompt = np.array([5, 17, 3], np.int32)
  [out] = decode.generate_ids(model, params, [prompt], max_new_tokens=200, sampling=decode.Sampling(temperature=0.0),
                              rng=jax.random.PRNGKey(0))  # Through caches of 128, 256 and 300 slots.
  assert list(out) == greedy_full(model, params, prompt, 200)


def test_one_compile_per_bucket_and_stops():
  model, params = _decoder(max_len=64)
  run = lambda prompts, **kw: decode.generate_ids(model, params, prompts, rng=jax.random.PRNGKey(1), **kw)
  prefills, chunks = decode.prefill._cache_size(), decode.decode_chunk._cache_size()
  first = run([np.arange(1, 4)] * 2, max_new_tokens=40)
  run([np.arange(1, 6)] * 2, max_new_tokens=7, sampling=decode.Sampling(top_k=5, top_p=0.5, repetition_penalty=1.3))
  run([np.arange(1, 8), np.arange(2, 4)], max_new_tokens=3, sampling=decode.Sampling(temperature=0.0))
  assert decode.prefill._cache_size() - prefills == 1  # Prompts of 3 to 7 tokens share the bucket of 8.
  assert decode.decode_chunk._cache_size() - chunks == 2  # Sampled and greedy decoding, a compile each.
  assert [len(r) for r in first] == [40, 40]
  again = run([np.arange(1, 4)] * 2, max_new_tokens=40)
  np.testing.assert_array_equal(np.stack(again), np.stack(first))  # Seeded.
  end = int(first[0][5])  # Ends the first row at its first draw of `end`.
  ended = run([np.arange(1, 4)] * 2, max_new_tokens=40, end_id=end)
  stop_at = list(first[0]).index(end)
  assert list(ended[0]) == list(first[0][:stop_at])
  finished_calls = []
  run([np.arange(1, 4)] * 2, max_new_tokens=40, finished=lambda ids: finished_calls.append(len(ids[0])) or [True, True])
  assert finished_calls == [decode.CHUNK]  # Stopped after the first chunk.


@pytest.fixture(scope='module')
def workdir(tfds_dir, play_files, tmp_path_factory):
  path = tmp_path_factory.mktemp('gen') / 'run'
  config = tiny_config(tfds_dir, play_files, **{'train.steps': 12, 'eval.every': 12, 'checkpoint.every': 12,
                                                'eval.num_samples': 0})  # The tests below do the sampling.
  trainer = loop.Trainer(config, path, devices=jax.devices()[:1])
  final = trainer.run()
  return path, final


def test_generate_api_is_seeded_and_honours_stop_strings(workdir):
  path, _ = workdir
  run = saved.load(path, devices=jax.devices()[:1])
  prompts = ['Ham', 'To be, or not']
  first = generate(run, prompts, max_new_tokens=20, num_return_sequences=3, top_k=20, seed=3)
  assert len(first) == 2 and all(len(c) == 3 for c in first)
  assert first == generate(run, prompts, max_new_tokens=20, num_return_sequences=3, top_k=20, seed=3)
  assert first != generate(run, prompts, max_new_tokens=20, num_return_sequences=3, top_k=20, seed=4)
  text = first[0][0]
  stop = text[3:5] if len(text) > 5 else text[-1]
  cut = generate(run, prompts, max_new_tokens=20, num_return_sequences=3, top_k=20, seed=3, stop=[stop])
  assert cut[0][0] == text[:text.index(stop)] and all(stop not in t for c in cut for t in c)
  with pytest.raises(ConfigError, match=r'top_p=0.0: must be in \(0, 1\]'):
    generate(run, 'x', top_p=0.0)
  with pytest.raises(ConfigError, match='a prompt of .* tokens leaves no room in the context of model.max_len=32'):
    generate(run, 'x' * 200)


@pytest.mark.slow  # Over 9 s on 2 cores: the fast loop stays under 5 minutes.
def test_sharded_generation_equals_one_device(workdir):
  path, _ = workdir
  one = generate(saved.load(path, devices=jax.devices()[:1]), ['Ham', 'So'], max_new_tokens=16, greedy=True)
  for shape in ((1, 4, 2), (2, 2, 2)):  # fsdp x tensor; data x fsdp x tensor.
    sharded = saved.load(path, devices=jax.devices(), mesh_shape=shape)
    assert len({d for x in jax.tree.leaves(sharded.params) for d in x.sharding.device_set}) == 8
    assert generate(sharded, ['Ham', 'So'], max_new_tokens=16, greedy=True) == one


def test_scanned_runs_generate_unrolled_and_the_same(workdir, tmp_path):
  path, _ = workdir
  run = saved.load(path, devices=jax.devices()[:1])
  scanned = tmp_path / 'scanned'  # The same weights, saved as a scanned model would save them.
  os.symlink(path / 'tokenizer',
             scanned / 'tokenizer' if scanned.exists() else (scanned.mkdir(), scanned / 'tokenizer')[1])
  config = override(run.config, {'model.scan_layers': True})
  (scanned / 'config.json').write_text(json.dumps(flatten(config)))
  checkpointer = checkpoint.Checkpointer(scanned / 'checkpoints', config.checkpoint)
  checkpointer.save_params(7, jax.device_get(stack_layers(run.params, config.model)))
  checkpointer.close()
  expected = generate(run, ['Ham', 'So'], max_new_tokens=12, greedy=True)
  unrolled = saved.load(scanned, devices=jax.devices()[:1])
  assert not unrolled.config.model.scan_layers and 'block_0' in unrolled.params
  assert generate(unrolled, ['Ham', 'So'], max_new_tokens=12, greedy=True) == expected
  kept = saved.load(scanned, devices=jax.devices()[:1], unroll_layers=False)
  assert 'blocks' in kept.params and generate(kept, ['Ham', 'So'], max_new_tokens=12, greedy=True) == expected


def test_evaluate_reproduces_the_final_eval_and_splits_it_by_context(workdir):
  path, final = workdir
  result = evaluate(saved.load(path, devices=jax.devices()[:1]), by_position=True)
  for key in ('loss', 'perplexity', 'bits_per_byte', 'tokens'):
    assert result[key] == pytest.approx(final[key], rel=1e-6)
  # Buckets 1, 2-3, 4-7, 8-15, 16-31, 32 of a 32-token window, adding up to the whole.
  buckets = result['by_position']
  assert [b['context'] for b in buckets] == [[1, 1], [2, 3], [4, 7], [8, 15], [16, 31], [32, 32]]
  assert sum(b['tokens'] for b in buckets) == result['tokens']
  assert sum(b['loss'] * b['tokens'] for b in buckets) / result['tokens'] == pytest.approx(result['loss'], rel=1e-5)
  assert results.plot_by_position({'run': result}).get_lines()[0].get_xdata().tolist() == [1, 3, 7, 15, 31, 32]


@pytest.mark.slow  # Over 9 s on 2 cores: the fast loop stays under 5 minutes.
def test_bfloat16_and_int8_weights_score_and_predict_as_float32_does(workdir):
  path, _ = workdir
  run = saved.load(path, devices=jax.devices()[:1])
  kernel = np.asarray(run.params['block_0']['mlp']['up']['kernel'])
  quantized = jax.device_get(LowPrecisionKernel.of(kernel, 'int8'))
  assert quantized.values.dtype == np.int8 and np.abs(quantized.values).max() == 127
  # Each weight is its column's nearest multiple of that column's scale (its largest magnitude / 127).
  np.testing.assert_allclose(quantized.scale[0], np.abs(kernel).max(axis=0) / 127, rtol=1e-6)
  assert np.all(np.abs(quantized.values * quantized.scale - kernel) <= quantized.scale / 2 * (1 + 1e-5))
  reference = evaluate(run)
  play = shakespeare_plays_dir() / 'tragedies' / 'hamlet.md'
  tokens = run.tokenizer.encode(normalize_text(play.read_text(encoding='utf-8'))[:20_000])[:16 * 32].reshape(16, 32)
  logits = lambda params: np.asarray(run.model.apply({'params': params}, tokens))
  for dtype in ('bfloat16', 'int8'):
    cast = decode.cast_weights(run.params, dtype)
    # The same logits as float32 weights holding the rounded values (the attention's output projection
    # contracts two axes: its scales must follow both).
    rounded = jax.tree.map(lambda k: k.widened(k.values, k.scale) if isinstance(k, LowPrecisionKernel) else k, cast,
                           is_leaf=lambda k: isinstance(k, LowPrecisionKernel))
    np.testing.assert_allclose(logits(cast), logits(rounded), rtol=1e-4, atol=1e-4)
    scored = evaluate(run, weights_dtype=dtype)
    assert scored['perplexity'] == pytest.approx(reference['perplexity'], rel=0.02), dtype
    assert scored['perplexity'] != reference['perplexity']  # The weights did change.
  agreement = np.mean(logits(decode.cast_weights(run.params, 'bfloat16')).argmax(-1) == logits(run.params).argmax(-1))
  assert agreement >= 0.95
  assert len(generate(run, ['Ham'], max_new_tokens=8, greedy=True, weights_dtype='int8')[0][0]) > 0


@pytest.mark.slow
def test_clis_and_their_refusals(workdir, tmp_path):
  path, final = workdir
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  cli = lambda module, *args: subprocess.run([sys.executable, '-m', module, *args], capture_output=True, text=True,
                                              env=env, cwd=ROOT, timeout=300)
  out = cli('lm.generate', f'--workdir={path}', '--prompt=Ham', '--prompt=To be', '--num_return_sequences=2',
            '--max_new_tokens=8', '--json')
  lines = [json.loads(line) for line in out.stdout.splitlines()]
  assert out.returncode == 0 and [l['prompt'] for l in lines] == ['Ham', 'To be']
  assert len(lines[0]['continuations']) == 2
  out = cli('lm.evaluate', f'--workdir={path}', '--num_batches=1', '--by_position')
  assert out.returncode == 0 and json.loads(out.stdout)['tokens'] < final['tokens']
  assert json.loads(out.stdout)['by_position'][0]['context'] == [1, 1]
  config = json.loads((path / 'config.json').read_text())
  mismatched = tmp_path / 'mismatched'
  for item in ('checkpoints', 'tokenizer'):
    os.symlink(path / item, mismatched / item if mismatched.exists() else (mismatched.mkdir(), mismatched / item)[1])
  (mismatched / 'config.json').write_text(json.dumps(config | {'model.vocab_size': 320}))
  refusals = {  # (The API tests above check the other refusals' messages.)
      (f'--workdir={tmp_path}', '--prompt=x'): 'holds no model',
      (f'--workdir={mismatched}', '--prompt=x'): 'but the model only model.vocab_size=320',
  }
  for args, expected in refusals.items():
    out = cli('lm.generate', *args)
    assert out.returncode == 1 and expected in out.stderr and 'Traceback' not in out.stderr, out.stderr[-2000:]
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
