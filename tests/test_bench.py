"""python -m lm.bench: its figures agree with each other and with what they are made of."""

import json
import os
import subprocess
import sys

import pytest

from conftest import QUICKSTART, ROOT, tiny_config, tiny_overrides
from lm import bench, metrics


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
  assert r['flops_per_token'] == metrics.flops_per_token(config)
  assert r['mfu_measured_peak'] == pytest.approx(r['flops_per_token'] * r['train_tokens_per_s'] / r['measured_peak_flops'])
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


def test_compile_bench_program_is_flat_in_depth_only_when_scanned(tfds_dir, play_files):
  for scan, (low, high) in [(True, (0.98, 1.02)), (False, (2.5, 4.5))]:
    config = tiny_config(tfds_dir, play_files, **{'model.scan_layers': scan, 'data.batch_size': 8})  # 8 devices.
    shallow, deep = bench.bench_compile(config, [1, 4])
    assert low < deep['program_chars'] / shallow['program_chars'] < high, (scan, shallow, deep)
