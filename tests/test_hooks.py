"""Periodic work as hooks: a user's hook runs on its cadence, sees the live state and the step's
records, logs what it returns, and changes nothing; the built-in hooks keep to the contract."""

import ast
import inspect

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

  def record(trainer: hooks.TrainerView, info: hooks.StepInfo):
    seen.append((info.step, int(trainer.state.step), info.saving))
    losses[info.step] = float(info.metrics['loss'])

  records = {}

  def count(trainer: hooks.TrainerView, info: hooks.StepInfo):  # Logs what it returns.
    records.update({step: values['loss'] for step, values in info.records})
    return {'user/records_seen': float(len(records))} if info.step % 4 == 0 else None

  class EndOnly(hooks.Hook):  # A Hook subclass, with its own notion of when it is due.
    calls = []

    def due(self, trainer, info):
      return info.last

    def __call__(self, trainer, info):
      self.calls.append((info.step, info.final, sorted(trainer.last_eval)))

  trainer = loop.Trainer(config, tmp_path / 'hooked', devices)
  trainer.add_hook(record, every=3, at_end=True)
  trainer.add_hook(EndOnly())
  trainer.add_hook(count)
  assert isinstance(trainer, hooks.TrainerView)
  with pytest.raises(ValueError, match='every=0 must be an integer >= 1'):
    trainer.add_hook(record, every=0)
  hooked = trainer.run()
  # Steps 3 and 6, and the last; the hook sees the state after that step, and whether it was saved.
  assert seen == [(3, 3, False), (6, 6, False), (8, 8, True)]
  assert EndOnly.calls == [(8, True, ['bits_per_byte', 'loss', 'perplexity', 'tokens'])]  # After the final eval.
  logged = {r['step']: r['train/loss'] for r in read_metrics(tmp_path / 'hooked') if 'train/loss' in r}
  assert losses[6] == logged[6] and losses[8] == logged[8]  # The same metrics the records hold.
  assert records == logged  # A hook after the built-in ones sees every record the loop made.
  user = {r['step']: r['user/records_seen'] for r in read_metrics(tmp_path / 'hooked') if 'user/records_seen' in r}
  assert user == {4: 2.0, 8: 4.0}  # Eval and checkpoint wait for steps 4 and 8: their records are made at once.
  assert [h.__class__ for h in trainer.hooks[-3:]] == [hooks.Every, EndOnly, hooks.Every]  # The user's stay.

  plain = loop.Trainer(config, tmp_path / 'plain', devices)
  result = plain.run()
  assert result == hooked
  for a, b in zip(jax.tree.leaves(trainer.state), jax.tree.leaves(plain.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  strip = lambda w: [{k: v for k, v in r.items() if not k.endswith(('seconds', 'tokens_per_second', 'mfu'))}
                     for r in read_metrics(w) if not any(k.startswith('user/') for k in r)]
  assert strip(tmp_path / 'hooked') == strip(tmp_path / 'plain')


def test_built_in_hooks_read_only_the_trainer_view_and_write_nothing_on_it():
  """The contract: hooks.TrainerView lists what a hook may read; the hooks return what they produce."""
  allowed = set(hooks.TrainerView.__annotations__) | {
      name for name, _ in inspect.getmembers(hooks.TrainerView, inspect.isfunction)}
  tree = ast.parse(inspect.getsource(hooks))
  read, written = set(), set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == 'trainer':
      (written if isinstance(node.ctx, ast.Store) else read).add(node.attr)
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and isinstance(
        node.value.value, ast.Name) and node.value.value.id == 'trainer' and isinstance(node.ctx, ast.Store):
      written.add(node.value.attr)
  assert read and read <= allowed, read - allowed
  assert not written
  assert 'Trainer' not in {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}  # Not even for types.
