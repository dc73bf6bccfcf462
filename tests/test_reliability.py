"""Losing nothing: non-finite steps, corrupt checkpoints, records cut short (kills: test_main.py)."""

import functools
import json
import math
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import one_device_layout, tiny_config
from lm import evaluate, generate
from lm.config import ConfigError
from lm.data import pipeline
from lm.kinds import make_model
from lm.training import checkpoint, lock, loop, saved, train
from lm.training.metrics import MetricWriter
from lm.training.optim import learning_rate_schedule, make_optimizer
from lm.training.workdirs import read_metrics


def _steps(workdir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())


def _assert_same_state(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b) and len(leaves_a) > 20
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _restore(workdir: pathlib.Path, step: int):
  return ocp.StandardCheckpointer().restore((workdir / 'checkpoints' / str(step) / 'state').absolute())


def test_nonfinite_steps_are_skipped_counted_and_then_freeze(tfds_dir, play_files, tmp_path):
  config = tiny_config(tfds_dir, play_files)
  corpus = pipeline.load_corpus(config.data, config.model.vocab_size, tmp_path / 'tok')
  model, optimizer = make_model(config.model, config.data), make_optimizer(config.optimizer, config.train.steps)
  step = jax.jit(functools.partial(train.train_step, model=model, optimizer=optimizer,
                                   schedule=learning_rate_schedule(config.optimizer, config.train.steps),
                                   max_nonfinite_steps=2))
  batch = next(iter(pipeline.train_dataset(config.data, corpus, config.seed)))
  mask = batch['loss_mask'].astype(np.float32)
  good = dict(batch, loss_mask=mask)
  bad = dict(batch, loss_mask=np.where(np.arange(mask.shape[1]) == 5, np.nan, mask))  # A NaN in the batch.
  state = train.init_train_state(one_device_layout(config))
  state, _ = step(state, good)
  before = jax.device_get(state)
  state, metrics = step(state, bad)
  assert np.isnan(metrics['loss']) and int(metrics['skipped_steps']) == 1 and int(metrics['nonfinite_streak']) == 1
  _assert_same_state((before.params, before.opt_state), (state.params, state.opt_state))  # No update ...
  assert int(state.step) == 2  # ... but the batch is spent.
  state, metrics = step(state, good)  # A finite step updates again and ends the streak.
  assert int(metrics['skipped_steps']) == 1 and int(metrics['nonfinite_streak']) == 0
  assert not np.array_equal(state.params['token_embedding']['embedding'], before.params['token_embedding']['embedding'])
  streaks = []
  for b in (bad, bad, bad, good, good):  # A third bad step in a row is past the limit: the state freezes.
    frozen = jax.device_get(state)
    state, metrics = step(state, b)
    streaks.append(int(metrics['nonfinite_streak']))
  assert streaks == [1, 2, 3, 4, 5] and int(state.skipped_steps) == 6
  _assert_same_state((frozen.params, frozen.opt_state), (state.params, state.opt_state))
  assert bool(train.all_finite((state.params, state.opt_state)))


def _poison(trainer: loop.Trainer) -> None:
  """A NaN in one parameter: every later loss and gradient is NaN."""
  leaves, tree = jax.tree.flatten(trainer.state.params)
  leaves[0] = leaves[0] * jnp.nan
  trainer.state = trainer.state.replace(params=jax.tree.unflatten(tree, leaves))


@pytest.mark.slow
def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tfds_dir, play_files, tmp_path, capsys):
  devices = jax.devices()[:1]
  overrides = {'train.log_every': 1, 'checkpoint.every': 2, 'train.max_nonfinite_steps': 2}
  loop.Trainer(tiny_config(tfds_dir, play_files, **overrides), tmp_path, devices).run(stop_after=2)
  # No checkpoint falls in the streak: the limit stops the run.
  trainer = loop.Trainer(tiny_config(tfds_dir, play_files, **overrides | {'checkpoint.every': 100}), tmp_path, devices)
  _poison(trainer)
  with pytest.raises(loop.NonFiniteError) as error:
    trainer.run()
  assert str(error.value).startswith('training diverged: the loss, gradients or parameters were not finite at '
                                     'every step since step 3 (more than train.max_nonfinite_steps=2 in a row); '
                                     'stopped at step 5 without saving; the last checkpoint (step 2) is kept.')
  assert _steps(tmp_path) == [2]
  records = [r for r in read_metrics(tmp_path) if 'train/loss' in r]
  assert [(r['step'], r['train/skipped_steps']) for r in records] == [(1, 0), (2, 0), (3, 1), (4, 2), (5, 3)]
  assert 'train/nonfinite_streak' not in records[-1] and np.isnan(records[-1]['train/loss'])
  # A checkpoint due inside the streak is refused too: a non-finite state is never written.
  trainer = loop.Trainer(tiny_config(tfds_dir, play_files, **overrides | {'train.max_nonfinite_steps': 10}),
                          tmp_path, devices)
  _poison(trainer)
  with pytest.raises(loop.NonFiniteError, match='the train state at step 4 holds NaN or Inf values: not checkpointed'):
    trainer.run()
  assert _steps(tmp_path) == [2]
  assert 'resumed from step 2' in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Corrupt checkpoints.

def _largest_file(folder: pathlib.Path) -> pathlib.Path:
  return max((p for p in folder.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(step_dir):
  big = _largest_file(step_dir / 'state')
  big.write_bytes(big.read_bytes()[:big.stat().st_size // 2])


def _flip_a_bit(step_dir):
  """One bit of one parameter flipped, the array written back as orbax writes it: every file reads,
  only the checksum kept beside the checkpoint can tell."""
  state_dir = (step_dir / 'state').absolute()
  with ocp.StandardCheckpointer() as io:
    state = io.restore(state_dir)
    kernel = np.array(state['params']['block_0']['mlp']['up']['kernel'])
    kernel.view(np.uint32)[3, 5] ^= 1 << 9
    state['params']['block_0']['mlp']['up']['kernel'] = kernel
    shutil.rmtree(state_dir)
    io.save(state_dir, state)


CORRUPTIONS = {
    'truncated array file': _truncate,
    'missing array file': lambda step_dir: _largest_file(step_dir / 'state').unlink(),
    'garbled metadata': lambda step_dir: (step_dir / 'state' / '_METADATA').write_text('{"tree_metadata": '),
    'empty manifest': lambda step_dir: (step_dir / 'state' / 'manifest.ocdbt').write_bytes(b''),
    'missing data iterator state': lambda step_dir: shutil.rmtree(step_dir / 'data'),
    'flipped bit in an array': _flip_a_bit,
}


@pytest.fixture(scope='module')
def checkpointed(tfds_dir, play_files, tmp_path_factory):
  """A workdir with checkpoints at steps 2 and 4 of 8 (the run stopped at 4), and the config."""
  config = tiny_config(tfds_dir, play_files, **{'checkpoint.every': 2})
  workdir = tmp_path_factory.mktemp('checkpointed')
  loop.Trainer(config, workdir, jax.devices()[:1]).run(stop_after=4)
  assert _steps(workdir) == [2, 4]
  return workdir, config


@pytest.mark.parametrize('corruption', list(CORRUPTIONS))
def test_corrupt_latest_checkpoint_falls_back_to_the_previous(checkpointed, tmp_path, capsys, corruption):
  pristine, config = checkpointed
  workdir = tmp_path / 'run'
  shutil.copytree(pristine, workdir)
  CORRUPTIONS[corruption](workdir / 'checkpoints' / '4')
  trainer = loop.Trainer(config, workdir, jax.devices()[:1])
  assert trainer.start_step == 2
  out = capsys.readouterr().out
  warning = [line for line in out.splitlines() if line.startswith('warning: checkpoint 4 is unreadable (')]
  assert len(warning) == 1 and warning[0].endswith(f'; moved to {workdir / "corrupt_checkpoints" / "4"}'), out
  if corruption == 'flipped bit in an array':
    assert '(ChecksumError: 1 array(s) differ from their checksums: params/block_0/mlp/up/kernel)' in warning[0]
  assert (workdir / 'corrupt_checkpoints' / '4').is_dir() and _steps(workdir) == [2]
  _assert_same_state(jax.device_get(trainer.state.params), _restore(pristine, 2)['params'])
  trainer.checkpointer.close()


def test_a_reader_is_told_in_one_line_of_a_damaged_or_deleted_checkpoint(checkpointed, tmp_path, monkeypatch):
  pristine, _ = checkpointed
  workdir = tmp_path / 'run'
  shutil.copytree(pristine, workdir)
  _flip_a_bit(workdir / 'checkpoints' / '4')
  with pytest.raises(ConfigError) as e:
    saved.load(workdir, devices=jax.devices()[:1])
  assert str(e.value) == (f"checkpoint 4 of {str(workdir)!r} is damaged: 1 array(s) differ from their checksums: "
                          'params/block_0/mlp/up/kernel; read another with --step (2, 4)')
  assert saved.load(workdir, 2, devices=jax.devices()[:1]).step == 2

  restore_params = checkpoint.Checkpointer.restore_params

  def deleted_first(self, step, like):  # As a training run's max_to_keep deletes it under the reader.
    shutil.rmtree(self.directory / str(step))
    return restore_params(self, step, like)

  monkeypatch.setattr(checkpoint.Checkpointer, 'restore_params', deleted_first)
  with pytest.raises(ConfigError) as e:
    saved.load(workdir, 2, devices=jax.devices()[:1])
  assert str(e.value) == (f"checkpoint 2 of {str(workdir)!r} was deleted while it was read (the run writing it "
                          'keeps checkpoint.max_to_keep=3); read again: the latest now is 4')


def test_readers_work_beside_the_writer_that_holds_the_workdir(checkpointed, tmp_path):
  pristine, _ = checkpointed
  workdir = tmp_path / 'run'
  shutil.copytree(pristine, workdir)
  writer = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])  # A training run, alive.
  try:
    (workdir / 'lock').write_text(json.dumps({
        'host': socket.gethostname(), 'pid': writer.pid, 'pid_start': lock._process_start(writer.pid),
        'command': 'lm.main', 'started': time.time(), 'heartbeat': time.time(), 'token': 'the-writer'}))
    held = (workdir / 'lock').read_bytes()
    with pytest.raises(lock.FolderInUse):  # A writer is refused ...
      lock.acquire(workdir)
    run = saved.load(workdir, devices=jax.devices()[:1])  # ... readers are not.
    scores = evaluate.evaluate(run, num_batches=1)
    texts = generate.generate(run, 'To be', max_new_tokens=4, greedy=True)
  finally:
    writer.kill()
  assert run.step == 4 and math.isfinite(scores['loss']) and len(texts[0]) == 1
  assert (workdir / 'lock').read_bytes() == held


@pytest.mark.slow
def test_after_a_fallback_the_run_ends_as_if_nothing_happened(checkpointed, tmp_path):
  pristine, config = checkpointed
  broken, straight = tmp_path / 'broken', tmp_path / 'straight'
  shutil.copytree(pristine, broken)
  shutil.copytree(pristine, straight)
  _truncate(broken / 'checkpoints' / '4')
  for workdir in (broken, straight):
    loop.Trainer(config, workdir, jax.devices()[:1]).run()
  assert _steps(broken) == _steps(straight) == [4, 6, 8]  # Step 4 saved again, where the corrupt one was.
  _assert_same_state(_restore(broken, 8), _restore(straight, 8))


def test_a_checkpoint_from_before_the_nonfinite_counters_resumes(checkpointed, tmp_path, capsys):
  pristine, config = checkpointed
  workdir = tmp_path / 'run'
  shutil.copytree(pristine, workdir)
  trainer = loop.Trainer(config, workdir, jax.devices()[:1])
  older = {k: getattr(trainer.state, k) for k in ('params', 'opt_state', 'rng')}  # The state as it was.
  older['step'] = trainer.state.step + 2
  trainer.checkpointer.save(6, older, trainer.train_iter)
  trainer.checkpointer.close()
  trainer = loop.Trainer(config, workdir, jax.devices()[:1])
  assert trainer.start_step == 6 and 'warning' not in capsys.readouterr().out
  assert not (workdir / 'corrupt_checkpoints').exists()
  assert int(trainer.state.skipped_steps) == 0 and int(trainer.state.nonfinite_streak) == 0
  _assert_same_state(jax.device_get(trainer.state.params), _restore(pristine, 4)['params'])
  evaluated = trainer.checkpointer.restore_state(6, trainer.state)  # As lm.evaluate reads it.
  assert int(evaluated.step) == 6 and int(evaluated.skipped_steps) == 0
  trainer.checkpointer.close()


def test_nan_checkpoint_and_all_corrupt_checkpoints(checkpointed, tmp_path, capsys):
  pristine, config = checkpointed
  workdir = tmp_path / 'run'
  shutil.copytree(pristine, workdir)
  trainer = loop.Trainer(config, workdir, jax.devices()[:1])  # At step 4.
  _poison(trainer)
  trainer.checkpointer.save(6, trainer.state, trainer.train_iter)  # As a bug or a bit flip might leave it.
  trainer.checkpointer.close()
  capsys.readouterr()
  trainer = loop.Trainer(config, workdir, jax.devices()[:1])
  assert trainer.start_step == 4
  assert 'warning: checkpoint 6 is unreadable (it holds NaN or Inf values); moved to' in capsys.readouterr().out
  trainer.checkpointer.close()
  for step in (2, 4):
    _truncate(workdir / 'checkpoints' / str(step))
  with pytest.raises(ConfigError, match=r"^no readable checkpoint is left in .*checkpoint 4 is unreadable .*"
                                        r"checkpoint 2 is unreadable .*; use a new --workdir, or move a checkpoint "
                                        r'back to retry it$'):
    loop.Trainer(config, workdir, jax.devices()[:1])
  assert sorted(p.name for p in (workdir / 'corrupt_checkpoints').iterdir()) == ['2', '4', '6']  # Nothing deleted.


def test_a_metrics_line_cut_short_by_a_kill_is_dropped(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text('{"step": 1, "train/loss": 5.5}\n{"step": 2, "train/lo')
  assert read_metrics(tmp_path) == [{'step': 1, 'train/loss': 5.5}]
  MetricWriter(tmp_path, 1).close()  # What the resumed run does first.
  assert (tmp_path / 'metrics.jsonl').read_text() == '{"step": 1, "train/loss": 5.5}\n'
