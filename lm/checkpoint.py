"""Orbax checkpoints of the train state together with the Grain data iterator state."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import time
from typing import Any, Callable

import grain
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
import numpy as np

from lm.config import KEYS, ConfigError, flatten, must_match

IMPORTED_FILE = 'imported.json'  # Marks a workdir of imported parameters (python -m lm.hf import).


def checkpoint_steps(directory: str | pathlib.Path) -> list[int]:
  """The steps of the checkpoints under `directory` (a workdir's checkpoints/), oldest first."""
  return sorted(ocp.utils.checkpoint_steps(directory))


def has_checkpoints(directory: pathlib.Path) -> bool:
  return bool(checkpoint_steps(directory))


def _changed_keys(saved: dict[str, Any], config: ml_collections.ConfigDict) -> dict[str, tuple]:
  """{key: (saved value, value now)} for each key whose value differs; a key the saved config.json
  predates counts as saved with its default."""
  current = json.loads(json.dumps(flatten(config)))  # Tuples -> lists, as in the saved file.
  defaults = json.loads(json.dumps({k: KEYS[k].default for k in current}))
  old = {k: saved.get(k, defaults[k]) for k in current}
  return {k: (old[k], v) for k, v in current.items() if old[k] != v}


def check_workdir(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> dict[str, tuple]:
  """Refuses to resume a workdir whose checkpoints come from another model or data config.

  Returns the keys that changed and are safe to change, as {key: (old, new)}.
  """
  saved_path = workdir / 'config.json'
  if not has_checkpoints(workdir / 'checkpoints'):
    return {}
  if (workdir / IMPORTED_FILE).exists():
    raise ConfigError(f'workdir {str(workdir)!r} holds imported parameters, not a training run; train from them '
                      f'with --config.checkpoint.init_from={workdir} and a new --workdir')
  if not saved_path.exists():
    raise ConfigError(f'workdir {str(workdir)!r} holds checkpoints but no config.json to check them '
                      'against; use a new --workdir')
  changed = _changed_keys(json.loads(saved_path.read_text()), config)
  clashes = [k for k in changed if must_match(k)]
  if clashes:
    detail = ', '.join(f'{k} is {changed[k][0]!r} there, {changed[k][1]!r} here' for k in clashes[:3])
    more = f' (and {len(clashes) - 3} more)' if len(clashes) > 3 else ''
    raise ConfigError(f'workdir {str(workdir)!r} holds checkpoints of a different model or data config: '
                      f'{detail}{more}; use a new --workdir or the same config')
  return changed


def check_init_from(source: pathlib.Path, config: ml_collections.ConfigDict) -> int:
  """The latest step of the workdir `source`, whose parameters are to start this run; a ConfigError
  unless it has checkpoints of a model shaped like config's, with the same tokenizer kind."""
  where = f'checkpoint.init_from={str(source)!r}'
  if not has_checkpoints(source / 'checkpoints') or not (source / 'config.json').exists():
    raise ConfigError(f'{where} is not a workdir with checkpoints and a config.json')
  changed = _changed_keys(json.loads((source / 'config.json').read_text()), config)
  clashes = [k for k in changed if must_match(k, init_from=True)]
  if clashes:
    detail = ', '.join(f'{k} is {changed[k][0]!r} there, {changed[k][1]!r} here' for k in clashes[:3])
    raise ConfigError(f'{where} holds a differently shaped model: {detail}')
  return checkpoint_steps(source / 'checkpoints')[-1]


def checkpointed_dataset(workdir: pathlib.Path) -> str | None:
  """The dataset the workdir's checkpoints were trained on, if it has any."""
  path = workdir / 'dataset.json'
  if not has_checkpoints(workdir / 'checkpoints') or not path.exists():
    return None
  return json.loads(path.read_text())['dataset']


def check_data_shards(workdir: pathlib.Path, data_shards: int) -> None:
  """The data iterators in a checkpoint resume only with as many data shards (process groups)."""
  path = workdir / 'dataset.json'
  if not has_checkpoints(workdir / 'checkpoints') or not path.exists():
    return
  saved = json.loads(path.read_text()).get('data_shards', 1)
  if saved != data_shards:
    raise ConfigError(f'workdir {str(workdir)!r} was trained reading {saved} data shard(s) (one per process '
                      f'group); this run reads {data_shards}: resume with the same number of processes '
                      'per data-parallel group, or use a new --workdir')


def save_config(workdir: pathlib.Path, config: ml_collections.ConfigDict, changed: dict[str, tuple],
                step: int, dataset: str, data_shards: int = 1) -> None:
  """Writes config.json and dataset.json; a resume that changed keys is recorded in config_changes.jsonl."""
  if jax.process_index() != 0:
    return
  _write_atomically(workdir / 'config.json', json.dumps(flatten(config), indent=1, sort_keys=True))
  _write_atomically(workdir / 'dataset.json', json.dumps({'dataset': dataset, 'data_shards': data_shards}))
  if changed:
    record = {'step': step, 'time': time.time(), 'changes': {k: list(v) for k, v in changed.items()}}
    with open(workdir / 'config_changes.jsonl', 'a', encoding='utf-8') as f:
      f.write(json.dumps(record) + '\n')


def _write_atomically(path: pathlib.Path, text: str) -> None:
  """A process killed while writing leaves the old file, never half of the new one."""
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(text, encoding='utf-8')
  os.replace(tmp, path)


def _abstract(like: Any) -> Any:
  """Shapes, dtypes and shardings to restore into: orbax reshards a checkpoint written on any mesh."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)), like)


class Checkpointer:
  """Keeps the last `max_to_keep` checkpoints of {state, data iterator} under `directory`."""

  def __init__(self, directory: pathlib.Path, config: ml_collections.ConfigDict):
    # A save that a killed process left unfinished stays a temporary folder, never a step: remove those.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.checkpoint.max_to_keep,
        enable_async_checkpointing=config.checkpoint.async_save, create=True, cleanup_tmp_directories=True)
    self.directory = directory
    self._manager = ocp.CheckpointManager(directory.absolute(), options=options,
                                          item_names=('state', 'data'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)))

  def save_params(self, step: int, params: Any) -> None:
    """Parameters alone (no optimizer or data state): what restore_params reads, e.g. imported weights."""
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({'params': params})))

  def restore(self, step: int, like: Any, data_iterator: grain.DatasetIterator) -> Any:
    """The state at `step`, shaped, typed and placed like `like`; data_iterator is moved to where
    it was when that step was saved. Fields of a dataclass `like` that the checkpoint predates
    (counters added to the train state since) restore as zeros."""
    return self._restore(step, like, data=grain.checkpoint.CheckpointRestore(data_iterator))

  def _restore(self, step: int, like: Any, **other_items) -> Any:
    abstract, missing = _abstract(like), self._fields_missing(step, like)
    if missing:
      abstract = {f.name: getattr(abstract, f.name) for f in dataclasses.fields(like) if f.name not in missing}
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), **other_items)).state
    if not missing:
      return restored
    zeros = {name: jnp.zeros(getattr(like, name).shape, getattr(like, name).dtype,
                             device=getattr(like, name).sharding) for name in missing}
    return dataclasses.replace(like, **restored, **zeros)

  def _fields_missing(self, step: int, like: Any) -> list[str]:
    """The fields of dataclass `like` that the checkpoint at `step` has no arrays for."""
    if not dataclasses.is_dataclass(like):
      return []
    try:
      saved = set(self._manager.item_metadata(step)['state'].tree)
    except Exception:  # noqa: BLE001  Unreadable metadata: the restore itself will say what is wrong.
      return []
    return [f.name for f in dataclasses.fields(like) if f.name not in saved]

  def restore_latest(self, like: Any, data_iterator: grain.DatasetIterator,
                     is_good: Callable[[Any], bool] = lambda state: True) -> tuple[int, Any, list[str]]:
    """(step, state, warnings) of the newest checkpoint that restores and passes is_good.

    A newer one that fails (truncated or missing files, broken metadata, NaNs) is moved out of the
    way to <workdir>/corrupt_checkpoints/ (nothing is deleted) and named in a warning; raises
    ConfigError when none is left. All processes agree on each step's verdict.
    """
    warnings = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state = self.restore(step, like, data_iterator)
        problem = None if is_good(state) else 'it holds NaN or Inf values'
      except Exception as e:  # pylint: disable=broad-except  (tensorstore, JSON, OS errors: any unreadable part)
        lines = str(e).strip().splitlines()
        problem = f'{type(e).__name__}: {lines[0][:300] if lines else ""}'
      if jax.process_count() > 1:
        problem = problem if np.asarray(multihost_utils.process_allgather(np.int32(problem is None))).all() else (
            problem or 'unreadable on another process')
      if problem is None:
        return step, state, warnings
      aside = self._move_aside(step)
      warnings.append(f'checkpoint {step} is unreadable ({problem}); moved to {aside}')
    raise ConfigError(f'no readable checkpoint is left in {str(self.directory)!r}'
                      + (f' ({"; ".join(warnings)})' if warnings else '')
                      + '; use a new --workdir, or move a checkpoint back to retry it')

  def _move_aside(self, step: int) -> pathlib.Path:
    target = self.directory.parent / 'corrupt_checkpoints' / str(step)
    if target.exists():
      target = target.with_name(f'{step}-{time.time_ns()}')
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(self.directory / str(step)), str(target))
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'lm: checkpoint {step} moved aside')
    self._manager.reload()
    return target

  def restore_state(self, step: int, like: Any) -> Any:
    """Only the train state at `step` (e.g. to evaluate it, or in a process that reads no data)."""
    return self._restore(step, like)

  def restore_params(self, step: int, like_params: Any) -> Any:
    """Only the parameters at `step`, placed like `like_params`."""
    item = {'params': _abstract(like_params)}
    restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
    return restored.state['params']

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
