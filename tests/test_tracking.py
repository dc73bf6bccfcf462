"""Downstream tasks during training (eval.harness_*) and Weights & Biases as a metrics writer
(train.wandb_*, in offline mode: nothing leaves the machine)."""

import html
import json
import struct

import jax
import pytest
from wandb.proto import wandb_internal_pb2

from conftest import tiny_config
from lm import harness
from lm.analysis import results
from lm.config import ConfigError
from lm.training import saved
from lm.training.loop import Trainer
from lm.training.workdirs import read_metrics

TASKS = ['shakespeare_next_line', 'shakespeare_scenes']


def wandb_history(path) -> dict[int, dict[str, str]]:
  """{step: {key: JSON value}} of the history records of an offline run's .wandb file (a LevelDB-style
  log of protobuf Records after a 7-byte header; wandb no longer ships a Python reader)."""
  raw, pos, part, history = path.read_bytes(), 7, b'', {}
  while pos + 7 <= len(raw):
    left = 32768 - pos % 32768
    _, length, kind = struct.unpack('<IHB', raw[pos:pos + 7])
    if left < 7 or (length == 0 and kind == 0):  # Block padding.
      pos += left
      continue
    part, pos = part + raw[pos + 7:pos + 7 + length], pos + 7 + length
    if kind in (1, 4):  # A whole record, or the last piece of one.
      record = wandb_internal_pb2.Record()
      record.ParseFromString(part)
      part = b''
      if record.WhichOneof('record_type') == 'history':
        items = {i.key or '/'.join(i.nested_key): i.value_json for i in record.history.item}
        history.setdefault(int(items['_step']), {}).update(items)
  return history


@pytest.mark.slow
def test_harness_tasks_and_wandb_during_a_run_that_resumes(tfds_dir, play_files, tmp_path, monkeypatch):
  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  config = tiny_config(tfds_dir, play_files, **{'eval.harness_tasks': ','.join(TASKS), 'eval.harness_every': 4,
                                                  'eval.harness_limit': 4, 'train.wandb_project': 'lm-tests'})
  workdir = tmp_path / 'sweep' / 'run'
  Trainer(config, workdir, devices=jax.devices()[:1]).run(stop_after=4)
  Trainer(config, workdir, devices=jax.devices()[:1]).run()  # Resumes from step 4 to 8.

  records = read_metrics(workdir)
  runs = {r['step']: r for r in records if 'harness/seconds' in r}
  assert sorted(runs) == [4, 8]
  for step, record in runs.items():  # What lm.harness gives on that step's checkpoint.
    model = harness.HarnessModel(run=saved.load(workdir, step, devices=jax.devices()[:1]), batch_size=16)
    expected = harness.flat_metrics(harness.evaluate(model, TASKS, limit=4, bootstrap_iters=0))
    assert set(expected) == {'shakespeare_next_line/acc', 'shakespeare_next_line/acc_norm',
                             'shakespeare_scenes/word_perplexity', 'shakespeare_scenes/byte_perplexity',
                             'shakespeare_scenes/bits_per_byte'}
    assert {k: record[f'harness/{k}'] for k in expected} == pytest.approx(expected, rel=1e-6)
  assert runs[8]['harness/shakespeare_scenes/bits_per_byte'] < runs[4]['harness/shakespeare_scenes/bits_per_byte']
  table = results.load_runs(tmp_path / 'sweep')
  assert table.iloc[0]['harness/shakespeare_next_line/acc'] == runs[8]['harness/shakespeare_next_line/acc']
  curves = results.load_curves(tmp_path / 'sweep')
  assert curves.dropna(subset=['harness/shakespeare_scenes/bits_per_byte'])['step'].tolist() == [4, 8]

  # W&B: one run id for both processes, each scalar of metrics.jsonl in its offline history.
  run_id = (workdir / 'wandb_id').read_text().strip()
  files = sorted(workdir.glob('wandb/offline-run-*/run-*.wandb'))
  assert len(files) == 2 and {f.name for f in files} == {f'run-{run_id}.wandb'}
  history = {}
  for f in files:
    for step, items in wandb_history(f).items():
      history.setdefault(step, {}).update(items)
  for record in records:
    for key, value in record.items():
      if key != 'step':
        assert float(history[record['step']][key]) == pytest.approx(value, rel=1e-6), (record['step'], key)
  # The samples, as HTML files beside the history, hold the text of samples/.
  assert 'samples/path' in history[8]
  pages = [p.read_text() for p in workdir.glob('wandb/offline-run-*/files/' + json.loads(history[8]['samples/path']))]
  sample = (workdir / 'samples' / 'step_0000008.txt').read_text()
  assert len(pages) == 1 and html.escape(max(sample.splitlines(), key=len)) in pages[0]


@pytest.mark.slow  # Over 9 s on 2 cores: the fast loop stays under 5 minutes.
def test_an_unknown_harness_task_is_refused_before_training(tfds_dir, play_files, tmp_path):
  config = tiny_config(tfds_dir, play_files, **{'eval.harness_tasks': 'shakespeare,hellaswagg'})
  with pytest.raises(ConfigError, match="unknown harness task 'hellaswagg' \\(nearest: hellaswag"):
    Trainer(config, tmp_path / 'run', devices=jax.devices()[:1])
  assert not (tmp_path / 'run' / 'checkpoints').exists()
  with pytest.raises(ConfigError, match='eval.harness_every=5 needs eval.harness_tasks'):
    tiny_config(tfds_dir, play_files, **{'eval.harness_every': 5})
