"""Quiet on success: a tiny training, its resumption and lm.harness on the workdir print nothing that
reads as a failure (a traceback, a download, a missing file, a deadlock, a library's WARNING or an
absl/glog log line)."""

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, run_main, tiny_overrides
from lm import cli

# What a successful command must not print: each reads as a failure to whoever watches the run.
ALARMING = re.compile(r'Traceback|Downloading|does not exist|deadlock|WARNING|^[IWEF]\d{4} \d\d:\d\d:\d\d')


def alarming_lines(*outputs: str) -> list[str]:
  """The lines of the outputs a successful command should not print."""
  return [line for text in outputs for line in text.splitlines() if ALARMING.search(line)]


def test_the_pattern_catches_what_it_should():
  assert alarming_lines('I0000 00:00:1765094400.1 1 cpu.cc:10] x\nall good\nE1207 07:01:02.000 libtpu\n'
                        'WARNING:absl:x\nos.fork() was called ... will likely lead to a deadlock.') == [
      'I0000 00:00:1765094400.1 1 cpu.cc:10] x', 'E1207 07:01:02.000 libtpu', 'WARNING:absl:x',
      'os.fork() was called ... will likely lead to a deadlock.']


def test_a_host_without_accelerators_starts_jax_on_the_cpu_alone(tmp_path):
  # libtpu (the tpu extra) otherwise says it could not determine the TPU type, and logs an
  # INVALID_ARGUMENT error, before JAX falls back to the CPU.
  assert not cli.accelerator_present(str(tmp_path), environ={})
  assert cli.accelerator_present(str(tmp_path), environ={'TPU_ACCELERATOR_TYPE': 'v5litepod-8'})
  for device in ('dev/accel0', 'dev/nvidia0', 'dev/vfio/12', 'sys/bus/pci/devices/0000:00:04.0/vendor'):
    root = tmp_path / device.replace('/', '_')
    (root / device).parent.mkdir(parents=True)
    (root / device).write_text('0x1ae0\n')  # Google's PCI vendor id: a TPU chip.
    assert cli.accelerator_present(str(root), environ={}), device
  (root / device).write_text('0x8086\n')  # Another vendor's device.
  assert not cli.accelerator_present(str(root), environ={})
  script = 'import jax\nfrom lm import cli\ncli.cpu_without_accelerators()\nprint(jax.config.jax_platforms)'
  for chosen in (None, 'cpu,tpu'):
    env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'} | {'PYTHONPATH': str(ROOT)}
    done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=env | ({'JAX_PLATFORMS': chosen} if chosen else {}))
    expected = chosen or ('None' if cli.accelerator_present() else 'cpu')  # What the user chose stays.
    assert (done.returncode, done.stdout.strip()) == (0, expected), done.stderr[-2000:]


@pytest.mark.slow
def test_training_resuming_and_the_harness_print_no_alarm(tfds_dir, play_files, compile_cache, tmp_path):
  workdir = tmp_path / 'run'
  overrides = tiny_overrides(str(tmp_path / 'tfds'), play_files, **{'eval.num_samples': 1})
  outputs = []
  for args in (('--stop_after=4',), ()):  # A run stopped with a checkpoint, then resumed to its end.
    done = run_main(workdir, overrides, *args, compile_cache=compile_cache)
    outputs += [done.stdout, done.stderr]
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  done = subprocess.run([sys.executable, '-m', 'lm.harness', f'--workdir={workdir}',
                         '--tasks=shakespeare', '--limit=2', '--batch_size=2'],  # Perplexities bootstrap too.
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert '|shakespeare_next_line|' in done.stdout
  outputs += [done.stdout, done.stderr]
  bad = alarming_lines(*outputs)
  assert not bad, '\n'.join(bad)
