"""WSD runs extended by raising train.steps, and cooldowns branched off them into new workdirs."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from conftest import tiny_config
from lm.config import ConfigError
from lm.training import loop
from lm.training.workdirs import read_metrics

WSD = {'optimizer.schedule': 'wsd', 'optimizer.decay_fraction': 0.25, 'optimizer.learning_rate': 1e-2,
       'checkpoint.every': 4, 'checkpoint.max_to_keep': 10, 'eval.num_samples': 0, 'eval.every': 100}


def _config(tfds_dir, play_files, **extra):
  return tiny_config(tfds_dir, play_files, **(WSD | extra))


def _trainer(config, workdir) -> loop.Trainer:
  return loop.Trainer(config, workdir, jax.devices()[:1])


def _train(config, workdir, stop_after=None) -> loop.Trainer:
  trainer = _trainer(config, workdir)
  trainer.run(stop_after=stop_after)
  return trainer


def _assert_bitwise(a, b):
  for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _learning_rates(workdir) -> dict[int, float]:
  return {r['step']: r['train/learning_rate'] for r in read_metrics(workdir) if 'train/learning_rate' in r}


@pytest.fixture(scope='module')
def stable_run(tfds_dir, play_files, tmp_path_factory):
  """16 steps of WSD (decay over the last 4), checkpoints every 4 steps: the trainer at its end."""
  return _train(_config(tfds_dir, play_files, **{'train.steps': 16, 'train.log_every': 1}),
                tmp_path_factory.mktemp('stable'))


@pytest.mark.slow  # Over 9 s on 2 cores: the fast loop stays under 5 minutes.
def test_raising_train_steps_in_the_stable_phase_extends_the_run_exactly(tfds_dir, play_files, stable_run, tmp_path):
  # Stopped at step 6 of a 12-step run (decay from step 9), resumed as a 16-step run (decay from 12).
  _train(_config(tfds_dir, play_files, **{'train.steps': 12}), tmp_path, stop_after=6)
  extended = _train(_config(tfds_dir, play_files, **{'train.steps': 16, 'train.log_every': 1}), tmp_path)
  _assert_bitwise(extended.state, stable_run.state)
  assert extended.last_eval == stable_run.last_eval


@pytest.mark.slow  # Over 9 s on 2 cores: the fast loop stays under 5 minutes.
def test_a_full_branch_continues_the_run_and_a_cooldown_decays_from_its_step(tfds_dir, play_files, stable_run,
                                                                             tmp_path):
  source = stable_run.workdir
  same = _config(tfds_dir, play_files, **{'train.steps': 16, 'checkpoint.init_from': str(source),
                                          'checkpoint.init_step': 8, 'checkpoint.init_mode': 'full'})
  branch = _train(same, tmp_path / 'same')
  assert branch.start_step == 8
  _assert_bitwise(branch.state, stable_run.state)  # Parameters, optimizer state, step and data position.

  # A cooldown from step 8 over 4 steps: train.steps 12, the last third decaying.
  cooldown = _config(tfds_dir, play_files, **{
      'train.steps': 12, 'optimizer.decay_fraction': 1 / 3, 'train.log_every': 1, 'checkpoint.init_from': str(source),
      'checkpoint.init_step': 8, 'checkpoint.init_mode': 'full'})
  _train(cooldown, tmp_path / 'cooldown')
  rates, stable_rates = _learning_rates(tmp_path / 'cooldown'), _learning_rates(source)
  assert sorted(rates) == [9, 10, 11, 12]
  assert rates[9] == stable_rates[9]  # The rate of step 8 (logged after it, as step 9): the peak.
  np.testing.assert_allclose(rates[9], 1e-2, rtol=1e-6)
  np.testing.assert_allclose([rates[s] for s in (10, 11, 12)], [1e-2 * (1 - 0.9 * f) for f in (1 / 4, 2 / 4, 3 / 4)],
                             rtol=1e-6)


def test_branch_refusals_name_the_problem(tfds_dir, play_files, stable_run, tmp_path):
  source = str(stable_run.workdir)
  branch = {'checkpoint.init_from': source, 'checkpoint.init_mode': 'full'}
  with pytest.raises(ConfigError, match=r'checkpoint.init_step=5: .* has no checkpoint at that step; '
                                        r'it has steps 4, 8, 12, 16$'):
    _trainer(_config(tfds_dir, play_files, **branch, **{'checkpoint.init_step': 5}), tmp_path / 'a')
  with pytest.raises(ConfigError, match=r"holds a different model, data or optimizer config \(init_mode='full' "
                                        r"continues it\): optimizer.name is 'adamw' there, 'lion' here"):
    _trainer(_config(tfds_dir, play_files, **branch, **{'optimizer.name': 'lion'}), tmp_path / 'b')
  with pytest.raises(ConfigError, match=r'data.shuffle_window is 16 there, 8 here'):
    _trainer(_config(tfds_dir, play_files, **branch, **{'data.shuffle_window': 8}), tmp_path / 'c')
  # Parameters only (the default mode) may start another optimizer.
  _trainer(_config(tfds_dir, play_files, **{'checkpoint.init_from': source, 'optimizer.name': 'lion'}),
           tmp_path / 'd').checkpointer.close()


def test_switching_the_optimizer_on_resume_is_refused(tfds_dir, play_files, stable_run):
  with pytest.raises(ConfigError, match=r"holds checkpoints of a different model, data or optimizer config: "
                                        r"optimizer.name is 'adamw' there, 'muon' here"):
    _trainer(_config(tfds_dir, play_files, **{'train.steps': 16, 'optimizer.name': 'muon'}), stable_run.workdir)
