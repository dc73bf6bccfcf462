"""The four ways a run starts (lm.training.start): fresh, resume, fine-tune from another run's
parameters, branch from its whole state; each checked against the run it starts from, bitwise."""

import jax
import numpy as np
import pytest

from conftest import tiny_config
from lm.config import ConfigError
from lm.training import loop, start


def _bitwise(a, b) -> bool:
  leaves_a, leaves_b = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
  return len(leaves_a) == len(leaves_b) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                                for x, y in zip(leaves_a, leaves_b))


def _trainer(config, workdir) -> loop.Trainer:
  return loop.Trainer(config, workdir, jax.devices()[:1])


@pytest.fixture(scope='module')
def source(tfds_dir, play_files, tmp_path_factory):
  """A run stopped at step 4 (its checkpoint), and its state and next batch there."""
  config = tiny_config(tfds_dir, play_files)
  trainer = _trainer(config, tmp_path_factory.mktemp('source'))
  trainer.run(stop_after=4)
  return trainer, trainer.next_batch()


def test_a_fresh_start_initializes_from_the_seed(source, tfds_dir, play_files, tmp_path):
  trainer, _ = source
  fresh = _trainer(tiny_config(tfds_dir, play_files), tmp_path / 'fresh')
  again = _trainer(tiny_config(tfds_dir, play_files), tmp_path / 'again')
  assert fresh.start == start.Start(start.FRESH) and fresh.start_step == 0
  assert _bitwise(fresh.state, again.state) and not _bitwise(fresh.state.params, trainer.state.params)


def test_a_resume_restores_the_whole_state_and_the_data_position(source, tfds_dir, play_files):
  trainer, next_batch = source
  resumed = _trainer(tiny_config(tfds_dir, play_files, **{'train.steps': 10}), trainer.workdir)
  assert resumed.start.how == start.RESUME and resumed.start_step == 4
  assert resumed.start.changed == {'train.steps': (8, 10)}
  assert _bitwise(resumed.state, trainer.state) and _bitwise(resumed.next_batch(), next_batch)


def test_a_fine_tune_takes_the_parameters_only(source, tfds_dir, play_files, tmp_path):
  trainer, _ = source
  config = tiny_config(tfds_dir, play_files, **{'checkpoint.init_from': str(trainer.workdir)})
  tuned = _trainer(config, tmp_path / 'tuned')
  fresh = _trainer(tiny_config(tfds_dir, play_files), tmp_path / 'fresh')
  assert tuned.start == start.Start(start.FINE_TUNE, trainer.workdir, 4) and tuned.start_step == 0
  assert _bitwise(tuned.state.params, trainer.state.params)
  assert _bitwise(tuned.state.opt_state, fresh.state.opt_state)  # A fresh optimizer ...
  assert _bitwise(tuned.next_batch(), fresh.next_batch())  # ... and the data from its start.


def test_a_branch_continues_the_whole_state_and_data_position(source, tfds_dir, play_files, tmp_path):
  trainer, next_batch = source
  config = tiny_config(tfds_dir, play_files, **{'checkpoint.init_from': str(trainer.workdir),
                                                'checkpoint.init_mode': 'full'})
  branch = _trainer(config, tmp_path / 'branch')
  assert branch.start == start.Start(start.BRANCH, trainer.workdir, 4) and branch.start_step == 4
  assert _bitwise(branch.state, trainer.state) and _bitwise(branch.next_batch(), next_batch)


def test_a_start_that_does_not_fit_its_checkpoints_is_refused(source, tfds_dir, play_files, tmp_path):
  trainer, _ = source
  with pytest.raises(ConfigError, match='model.d_model is 32 there, 64 here'):
    start.how_to_start(trainer.workdir, tiny_config(tfds_dir, play_files, **{'model.d_model': 64}))
  wider = tiny_config(tfds_dir, play_files, **{'model.d_model': 64, 'checkpoint.init_from': str(trainer.workdir)})
  with pytest.raises(ConfigError, match='holds a differently shaped model: model.d_model is 32 there, 64 here'):
    start.how_to_start(tmp_path / 'new', wider)
