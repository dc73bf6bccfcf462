"""Periodic work as hooks: a user's hook runs on its cadence, sees the live state, and changes nothing."""

import jax
import numpy as np
import pytest

from conftest import tiny_config
from lm.training import hooks, loop
from lm.training.workdirs import read_metrics


def test_user_hooks_run_on_their_cadence_and_change_no_number(tmp_path, tfds_dir, play_files):
  config = tiny_config(tfds_dir, play_files)  # 8 steps, log every 2, eval every 4, checkpoint every 4.
  devices = jax.devices()[:1]
  seen, losses = [], {}

  def record(trainer: loop.Trainer, info: hooks.StepInfo):
    seen.append((info.step, int(trainer.state.step), info.saving))
    losses[info.step] = float(info.metrics['loss'])

  class EndOnly(hooks.Hook):  # A Hook subclass, with its own notion of when it is due.
    calls = []

    def due(self, trainer, info):
      return info.last

    def __call__(self, trainer, info):
      self.calls.append((info.step, info.final, sorted(trainer.last_eval)))

  trainer = loop.Trainer(config, tmp_path / 'hooked', devices)
  trainer.add_hook(record, every=3, at_end=True)
  trainer.add_hook(EndOnly())
  with pytest.raises(ValueError, match='every=0 must be an integer >= 1'):
    trainer.add_hook(record, every=0)
  hooked = trainer.run()
  # Steps 3 and 6, and the last; the hook sees the state after that step, and whether it was saved.
  assert seen == [(3, 3, False), (6, 6, False), (8, 8, True)]
  assert EndOnly.calls == [(8, True, ['bits_per_byte', 'loss', 'perplexity', 'tokens'])]  # After the final eval.
  logged = {r['step']: r['train/loss'] for r in read_metrics(tmp_path / 'hooked') if 'train/loss' in r}
  assert losses[6] == logged[6] and losses[8] == logged[8]  # The same metrics the log hook wrote.
  assert trainer.hooks[-1].__class__ is EndOnly  # The user's hooks stay; the built-in ones go with the run.

  plain = loop.Trainer(config, tmp_path / 'plain', devices)
  result = plain.run()
  assert result == hooked
  for a, b in zip(jax.tree.leaves(trainer.state), jax.tree.leaves(plain.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  strip = lambda w: [{k: v for k, v in r.items() if not k.endswith(('seconds', 'tokens_per_second', 'mfu'))}
                     for r in read_metrics(w)]
  assert strip(tmp_path / 'hooked') == strip(tmp_path / 'plain')
