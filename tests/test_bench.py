"""python -m lm.bench: its figures agree with each other and with what they are made of."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import QUICKSTART, ROOT, tiny_config, tiny_overrides
from lm.bench import data as bench_data
from lm.bench import generate as bench_generate
from lm.bench import matmuls
from lm.bench import train as bench_train
from lm.config import load_experiment
from lm.data import pipeline
from lm.kinds import make_model
from lm.nn.attention import ATTENTION_BLOCK
from lm.nn.model import count_params
from lm.training import metrics


@pytest.mark.slow
def test_train_bench_reports_consistent_figures_and_the_torch_ratio(tfds_dir, play_files, tmp_path):
  overrides = tiny_overrides(tfds_dir, play_files, **{'data.shuffle_window': 8})
  args = [sys.executable, '-m', 'lm.bench', f'--config={QUICKSTART}', f'--workdir={tmp_path}', '--json',
          '--steps=2', '--repeats=2', '--data_batches=3', '--compare=torch_eager', '--matmul_sizes=512']
  done = subprocess.run(args + [f'--config.{k}={v}' for k, v in overrides.items()], capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  r = json.loads(done.stdout.strip().splitlines()[-1])
  config = tiny_config(tfds_dir, play_files)
  tokens_per_step = config.data.batch_size * config.data.seq_len
  assert r['step_s'] == sorted(r['step_s_windows'])[1] and len(r['step_s_windows']) == 2
  assert r['train_tokens_per_s'] == pytest.approx(tokens_per_step / r['step_s'])
  assert r['flops_per_token'] == metrics.flops_per_token(config.model, config.data)
  achieved = r['flops_per_token'] * r['train_tokens_per_s']
  assert r['mfu_measured_peak'] == pytest.approx(achieved / r['measured_peak_flops'])
  assert 1e8 < r['measured_peak_flops'] < 1e13 and 0 < r['mfu_measured_peak'] < 1.5
  assert r['hardware_peak_flops'] is None and r['mfu_hardware_peak'] is None  # No table entry for CPUs.
  assert r['data_to_train_ratio'] == pytest.approx(r['data_tokens_per_s'] / r['train_tokens_per_s'])
  # Parameters and two Adam moments, in float32, at least: the memory plan holds the whole train state.
  assert r['peak_memory_bytes'] > 3 * 4 * r['params'] and r['memory_source'] == 'compiler'
  assert 4 < r['final_loss'] < 7  # Near ln(384) = 5.95 after a few steps of the tiny model.
  torch = r['torch_eager']
  assert torch['params'] == r['params']  # The same model, in PyTorch.
  assert torch['tokens_per_s'] == pytest.approx(tokens_per_step / torch['step_s'])
  assert r['speedup_vs_torch_eager'] == pytest.approx(r['train_tokens_per_s'] / torch['tokens_per_s'])
  assert 4 < torch['final_loss'] < 7
  # The step's matmuls: exactly the model FLOPs of the formula (tests below), timed alone in each library.
  assert r['matmul_flops_per_step'] == r['flops_per_token'] * tokens_per_step
  assert r['matmul_floor_share'] == pytest.approx(r['matmul_floor_s'] / r['step_s']) and r['matmul_floor_s'] > 0
  assert torch['matmul_floor_share'] == pytest.approx(torch['matmul_floor_s'] / torch['step_s'])
  assert torch['matmul_floor_s'] > 0


@pytest.mark.slow
def test_compile_bench_program_is_flat_in_depth_only_when_scanned(tfds_dir, play_files):
  for scan, (low, high) in [(True, (0.98, 1.02)), (False, (2.5, 4.5))]:
    config = tiny_config(tfds_dir, play_files, **{'model.scan_layers': scan, 'data.batch_size': 8})  # 8 devices.
    shallow, deep = bench_train.bench_compile(config, [1, 4])
    assert low < deep['program_chars'] / shallow['program_chars'] < high, (scan, shallow, deep)


def test_the_train_steps_matmuls_do_exactly_the_flops_of_the_formula(tfds_dir, play_files):
  """lm.bench.matmuls counts the products in a train step's jaxpr; metrics.flops_per_example, which MFU divides
  by, must be their FLOPs exactly, wherever the step computes each product once."""
  step_flops = lambda c: matmuls.flops(bench_train.train_step_matmuls(c))
  model_flops = lambda c: metrics.flops_per_example(c.model, c.data) * c.data.batch_size
  for knobs in [{}, {'model.scan_layers': True, 'model.tie_embeddings': False, 'model.mlp': 'swiglu',
                     'model.num_kv_heads': 1, 'model.mtp_depth': 2}, {'train.microbatches': 2},
                {'model.kind': 'encoder_decoder', 'data.objective': 'span_corruption'}]:
    config = tiny_config(tfds_dir, play_files, **{'data.batch_size': 16} | knobs)
    assert step_flops(config) == model_flops(config), knobs
  # Recomputation is work the model FLOPs leave out: remat re-runs the blocks, the chunked loss its logits.
  config = tiny_config(tfds_dir, play_files, **{'model.remat': 'full', 'train.logits_chunk': 16, 'data.batch_size': 8})
  assert step_flops(config) > 1.2 * model_flops(config)
  # Causal attention skips the key blocks after each block of queries: at 256 positions, 1 of 4.
  config = load_experiment(ROOT / 'experiments' / 'bench.py')
  m = config.model
  skipped = 12 * m.d_model * m.num_layers * ATTENTION_BLOCK**2 * config.data.batch_size
  assert step_flops(config) == model_flops(config) - skipped


def test_a_matmuls_einsum_is_its_dot_general():
  rng = np.random.default_rng(0)
  for lhs_shape, rhs_shape, contracting, batch in [
      ((5, 3), (3, 4), ((1,), (0,)), ((), ())),
      ((5, 3), (4, 3), ((1,), (1,)), ((), ())),
      ((2, 5, 3), (2, 5, 4), ((0, 1), (0, 1)), ((), ())),
      ((2, 6, 1, 5, 3), (2, 6, 4, 3), ((4,), (3,)), ((0, 1), (0, 1))),
      ((3, 2, 5), (2, 4, 5, 3), ((2,), (2,)), ((0, 1), (3, 0)))]:
    m = matmuls.Matmul(lhs_shape, rhs_shape, contracting, batch, 'float32', 'float32', 'float32')
    lhs, rhs = rng.normal(size=lhs_shape).astype(np.float32), rng.normal(size=rhs_shape).astype(np.float32)
    want = jax.lax.dot_general(lhs, rhs, (contracting, batch))
    np.testing.assert_allclose(np.einsum(m.einsum(), lhs, rhs), want, rtol=1e-5, atol=1e-5)
    assert m.flops == 2 * want.size * np.prod([lhs_shape[i] for i in contracting[0]])


def test_the_torch_child_trains_the_same_gpt2(tfds_dir, play_files):
  """lm.bench.torch_side, in its own process as --compare=torch runs it: transformers' GPT-2 of the config's
  shape has lm's parameter count, starts at the loss of a uniform guess, and times what it reports."""
  config = tiny_config(tfds_dir, play_files)
  product = matmuls.Matmul((4, 8), (8, 16), ((1,), (0,)), ((), ()), 'float32', 'float32', 'float32')
  r = bench_train.compare_torch(config, ['eager'], steps=2, repeats=3, products={product: 3}, timeout_s=300)['eager']
  assert 'error' not in r, r
  model = make_model(config.model, config.data)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))['params']
  assert r['params'] == count_params(nn.meta.unbox(shapes))
  assert r['final_loss'] == pytest.approx(np.log(config.model.vocab_size), rel=0.05)  # Random tokens, 4 steps in.
  assert r['step_s'] == sorted(r['step_s_windows'])[1] and len(r['step_s_windows']) == 3
  assert r['tokens_per_s'] == pytest.approx(config.data.batch_size * config.data.seq_len / r['step_s'])
  assert 0 < r['matmul_floor_s'] and r['matmul_floor_share'] == pytest.approx(r['matmul_floor_s'] / r['step_s'])


@pytest.mark.slow  # Over 9 s on 2 cores: the fast loop stays under 5 minutes.
def test_optimizer_bench_times_each_in_turn_against_the_first(tfds_dir, play_files, tmp_path):
  config = tiny_config(tfds_dir, play_files, **{'data.batch_size': 8})  # 8 devices.
  records = bench_train.bench_optimizers(config, ['adamw', 'muon'], tmp_path / 'tok', steps=2, repeats=3)
  assert [r['optimizer'] for r in records] == ['adamw', 'muon']
  tokens_per_step = config.data.batch_size * config.data.seq_len
  for r in records:
    assert len(r['step_s_windows']) == 3 and r['step_s'] == sorted(r['step_s_windows'])[1]
    assert r['train_tokens_per_s'] == pytest.approx(tokens_per_step / r['step_s'])
  assert records[0]['ratio_to_first'] == 1.0
  assert records[1]['ratio_to_first'] == pytest.approx(records[0]['step_s'] / records[1]['step_s'])


@pytest.mark.slow
def test_moe_bench_times_mixtures_against_a_dense_model_of_equal_active_flops(tfds_dir, play_files, tmp_path):
  config = tiny_config(tfds_dir, play_files, **{'data.batch_size': 8, 'model.mlp_dim': 64})  # 8 devices.
  records = bench_train.bench_moe(config, tmp_path / 'tok', experts=8, top_k=2, steps=2, repeats=3)
  assert [r['impl'] for r in records] == ['dense', 'capacity', 'dropless']
  several = bench_train.moe_variants(config, 8, 2, ['blocks', 'ragged_dot'])  # Each grouped product by name.
  assert list(several) == ['dense', 'capacity', 'dropless/blocks', 'dropless/ragged_dot']
  assert several['dropless/ragged_dot'].model.moe_grouped_impl == 'ragged_dot'
  dense = records[0]
  assert dense['vs_dense_active'] == 1.0 and dense['experts'] == 0
  for r in records:
    assert r['tokens_per_second'] == pytest.approx(8 * 32 / r['step_s'])
    assert r['vs_dense_active'] == pytest.approx(dense['step_s'] / r['step_s'])
  # Experts of 64 / 2 = 32 wide, two per token: the dense MLP's FLOPs, plus the router's 2 x 32 x 8 per layer.
  for r in records[1:]:
    assert r['experts'] == 8
    assert r['flops_per_token'] - dense['flops_per_token'] == 6 * 2 * 32 * 8


@pytest.mark.slow
def test_data_bench_measures_each_source_kind_against_training(tfds_dir, play_files, tmp_path):
  # 8 devices; a window of 1024 rows, as by default (Grain's window shuffle is slow on small windows).
  config = tiny_config(tfds_dir, play_files, **{'data.batch_size': 8, 'data.shuffle_window': 1024})
  r = bench_data.bench_data(config, tmp_path, data_batches=20, steps=2, repeats=3)
  assert r['train_tokens_per_s'] == pytest.approx(8 * 32 / r['train_step_s'])
  for kind in bench_data.DATA_KINDS:
    assert r[f'{kind}_to_train_ratio'] == pytest.approx(r[f'{kind}_tokens_per_s'] / r['train_tokens_per_s'])
  assert min(r[f'{kind}_tokens_per_s'] for kind in bench_data.DATA_KINDS) > 0
  corpus = pipeline.load_corpus(config.data, config.model.vocab_size, tmp_path / 'tok')
  text_bytes = sum(len(s[i]['text']) for s in (corpus.train_source, corpus.eval_source) for i in range(len(s)))
  assert r['tokenize_text_mb'] == pytest.approx(text_bytes / 1e6)
  assert r['tokenize_mb_per_s_per_core'] == pytest.approx(r['tokenize_text_mb'] / r['tokenize_worker_s'])


@pytest.mark.slow
def test_generate_bench_counts_the_bytes_a_step_reads():
  bandwidth = bench_generate.memory_bandwidth(mib=64, repeats=2)
  assert bandwidth['bandwidth'] == max(bandwidth['numpy_sum'], bandwidth['xla_sum'], bandwidth['copy']) > 1e8
  f32, int8 = bench_generate.bench_generate('quickstart', [2], new_tokens=8, repeats=1,
                                            weights_dtypes=('float32', 'int8'), bandwidth=bandwidth)
  m = load_experiment(str(QUICKSTART)).model  # Read as GPT-2 (tied, learned positions) at width 96.
  layers, width = m.num_layers, 96
  mlp = 4 * width
  kernels = layers * (4 * width * width + 2 * width * mlp)  # Attention's four and the MLP's two matrices.
  rest = f32["params"] - kernels - max(m.max_len, bench_generate.PROMPT_LEN + 8) * width  # Less the position table...
  assert f32['weight_bytes'] == 4 * (kernels + rest + 2 * width)  # ...of which two rows are read.
  # One per output of q, k, v, up and down; the output projection's per (head width, output) pair.
  scales = layers * (4 * width + mlp + width // m.num_heads * width)
  assert int8['weight_bytes'] == kernels + 4 * (scales + rest + 2 * width)
  cache = 2 * 2 * layers * width * 4 * (bench_generate.PROMPT_LEN + 3.5)  # Rows x (keys, values) x slots in use.
  assert f32['cache_bytes'] == pytest.approx(cache)
  for r in (f32, int8):
    assert r['implied_bandwidth'] == pytest.approx(r['bytes_per_step'] * 8 / r['lm_seconds'])
    assert r['bandwidth_share'] == pytest.approx(r['implied_bandwidth'] / bandwidth['bandwidth'])
  assert f32['same_tokens'] == 1.0 and f32['speedup'] == pytest.approx(f32['torch_seconds'] / f32['lm_seconds'])
  assert 'speedup' not in int8  # transformers' GPT-2 has no int8 weights.
