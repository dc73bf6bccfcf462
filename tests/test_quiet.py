"""Quiet on success: what a successful command must not print (a traceback, a download, a missing file,
a deadlock, a library's WARNING or an absl/glog log line), checked on the output of a tiny training and
its resumption (test_main.py) and of lm.harness (test_harness.py), which run them anyway."""

import os
import re
import subprocess
import sys

from conftest import ROOT
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
