"""Shared fixtures: tiny configs built from the real experiment files, and corpora made once."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile

import jax
import pytest

# Tests compile many small programs and run each for a few steps: with XLA's cheapest CPU code
# generation they compile about a third faster. Set before JAX starts; lm.main subprocesses inherit it.
FAST_COMPILE_FLAGS = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {FAST_COMPILE_FLAGS}'.strip()
from lm.cli import set_default_xla_flags  # As every lm command does where its process starts.

set_default_xla_flags()
# What lm measures once per machine (the CPU matmul rate behind train/mfu) is measured once per test
# session, here, shared by the lm.main subprocesses.
os.environ.setdefault('LM_CACHE_DIR', tempfile.mkdtemp(prefix='lm-cache-'))

# Eight simulated CPU devices for every in-process test, set before any JAX op. Tests that want one
# device build their mesh over jax.devices()[:1]; subprocesses (lm.main) see a single device.
jax.config.update('jax_num_cpu_devices', 8)

# One JAX compilation cache for every command a test starts (lm.main, lm.generate, the notebooks'
# kernels, ...), shared by the pytest-xdist workers (they inherit this process's environment): the
# same tiny programs compile once per test session instead of once per process, about a quarter of a
# tiny run's time. Set after JAX started here, so in-process tests (some time compiles) compile afresh.
XLA_CACHE = os.environ.setdefault('LM_TEST_XLA_CACHE', tempfile.mkdtemp(prefix='lm-xla-cache-'))
os.environ.update(JAX_COMPILATION_CACHE_DIR=XLA_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1')

from lm import config as config_lib
from lm.data.builders import normalize_text, shakespeare_plays_dir
from lm.training import train

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / 'experiments' / 'quickstart.py'

# The quickstart experiment shrunk to compile and run in seconds, in GPT-2's layout with AdamW (what
# the tests were written against; the quickstart's own RoPE, SwiGLU, Muon, WSD and document masking
# are each tested where they live).
TINY = {
    'model.vocab_size': 384, 'model.max_len': 32, 'model.num_layers': 2, 'model.num_heads': 2,
    'model.d_model': 32, 'model.mlp_dim': 64, 'model.positions': 'learned', 'model.mlp': 'gelu',
    'optimizer.name': 'adamw', 'optimizer.learning_rate': 3e-3, 'optimizer.schedule': 'cosine',
    'data.document_mask': False,
    'data.seq_len': 32, 'data.batch_size': 4, 'data.shuffle_window': 16,
    'optimizer.warmup_steps': 2, 'train.steps': 8, 'train.log_every': 2,
    'eval.every': 4, 'eval.num_batches': 2, 'eval.batch_size': 16, 'eval.sample_tokens': 8,
    'checkpoint.every': 4,
}


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='session')
def play_files(tmp_path_factory) -> str:
  """Four short text files cut from the plays: a small text_files corpus (~40 KB)."""
  folder = tmp_path_factory.mktemp('plays')
  for play in sorted(shakespeare_plays_dir().glob('*/*.md'))[:4]:
    text = normalize_text(play.read_text(encoding='utf-8'))
    (folder / f'{play.stem}.txt').write_text(text[:10_000], encoding='utf-8')
  return str(folder / '*.txt')


def tiny_overrides(tfds_dir: str, play_files: str, **extra) -> dict:
  return TINY | {'data.tfds_data_dir': tfds_dir, 'data.name': 'text_files', 'data.paths': play_files} | extra


def tiny_config(tfds_dir: str, play_files: str, **extra):
  config = config_lib.load_experiment(QUICKSTART)
  return config_lib.validate(config_lib.override(config, tiny_overrides(tfds_dir, play_files, **extra)))


@pytest.fixture(scope='session')
def compile_cache(tmp_path_factory) -> str:
  """The JAX compilation cache of the commands tests start (XLA_CACHE; see run_main)."""
  del tmp_path_factory
  return XLA_CACHE


def run_main(workdir, overrides: dict, *extra_args: str, check: bool = True,
             compile_cache: str | None = None) -> subprocess.CompletedProcess:
  """python -m lm.main on the quickstart config with overrides, in a fresh process.

  With compile_cache, processes that compile the same program (a run and its resumption) share the
  executable XLA made for the first, through JAX's persistent compilation cache, instead of compiling
  it again: the same code (XLA compiles deterministically), minus most of a tiny run's time.
  """
  args = [sys.executable, '-m', 'lm.main', f'--config={QUICKSTART}', f'--workdir={workdir}']
  args += [f'--config.{k}={v}' for k, v in overrides.items()] + list(extra_args)
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  if compile_cache:
    env |= {'JAX_COMPILATION_CACHE_DIR': str(compile_cache), 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
            'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '-1'}
  result = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
  if check and result.returncode:
    raise AssertionError(f'{" ".join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}')
  return result


def one_device_layout(config):
  return train.make_layout(config, jax.devices()[:1])
