"""Several hosts, simulated: processes joined by jax.distributed on 127.0.0.1 equal one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import QUICKSTART, ROOT, tiny_config, tiny_overrides
from lm.config import ConfigError
from lm.data import pipeline
from lm.training import checkpoint, train, workdirs
from lm.training.workdirs import read_metrics
from test_sharding import SHARDABLE, assert_trees_close, train_on


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


# One block: what several processes change (the rows each reads, where arrays live, the checkpoint)
# does not depend on depth, and each compile of the model, in both processes and here, is shorter.
RUN = SHARDABLE | {'train.steps': 4, 'eval.every': 4, 'model.num_layers': 1}


@pytest.mark.slow
def test_two_processes_match_one(tfds_dir, play_files, tmp_path):
  """2 processes x 4 devices through jax.distributed equal 1 process x 8 devices."""
  workdir = tmp_path / 'run'
  overrides = tiny_overrides(tfds_dir, play_files, **RUN)
  port = _free_port()
  env = dict(os.environ, PYTHONPATH=str(ROOT),
             XLA_FLAGS=f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=4")
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'lm.main', f'--config={QUICKSTART}', f'--workdir={workdir}',
       f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2', f'--process_id={i}']
      + [f'--config.{k}={v}' for k, v in overrides.items()],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT) for i in range(2)]
  held = None
  while held is None and any(p.poll() is None for p in procs):  # One lock, process 0's, naming the job.
    try:
      held = json.loads((workdir / 'lock').read_text())
    except (OSError, ValueError):  # Not there yet, or being written.
      time.sleep(0.05)
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], '\n'.join(o[-3000:] for o in outputs)
  assert held['pid'] == procs[0].pid and len(held['job']) == 8 and not (workdir / 'lock').exists()
  assert 'over 8 cpu devices, 2 process(es)' in outputs[0]
  assert (workdir / 'checkpoints' / '4' / 'data' / 'process_1-of-2.json').exists()

  # The reference: one process, 8 devices, the same global batches (data shard 0 rows, then shard 1).
  config = tiny_config(tfds_dir, play_files, **RUN)
  corpus = pipeline.load_corpus(config.data, config.model.vocab_size, workdir / 'tokenizer')
  shards = [iter(pipeline.train_dataset(config.data, corpus, config.seed, i, 2)) for i in range(2)]
  batches = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in
             (tuple(next(s) for s in shards) for _ in range(4))]
  losses, state = train_on(config, jax.devices(), batches)
  logged = [r['train/loss'] for r in read_metrics(workdir) if 'train/loss' in r]
  np.testing.assert_allclose(logged, losses[1::2], rtol=1e-5)

  like = train.abstract_train_state(train.make_layout(config))  # Shapes and shardings, nothing computed.
  restorer = checkpoint.Checkpointer(workdir / 'checkpoints', config.checkpoint)
  restored = restorer.restore_state(4, like)
  restorer.close()
  assert int(restored.step) == 4
  assert_trees_close(restored.params, state.params)


def test_resuming_with_another_number_of_data_shards_is_refused(tmp_path):
  (tmp_path / 'checkpoints' / '4').mkdir(parents=True)
  (tmp_path / 'dataset.json').write_text('{"dataset": "shakespeare", "data_shards": 2}')
  workdirs.check_data_shards(tmp_path, 2)
  with pytest.raises(ConfigError, match=r'trained reading 2 data shard\(s\).*this run reads 1'):
    workdirs.check_data_shards(tmp_path, 1)
