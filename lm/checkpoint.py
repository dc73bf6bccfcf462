"""Orbax checkpoints of the train state together with the Grain data iterator state."""

from __future__ import annotations

import dataclasses
import pathlib
import shutil
import time
from typing import Any, Callable

import grain
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lm.config import Checkpoint, ConfigError


def _abstract(like: Any) -> Any:
  """Shapes, dtypes and shardings to restore into: orbax reshards a checkpoint written on any mesh."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)), like)


class Checkpointer:
  """Keeps the last `max_to_keep` checkpoints of {state, data iterator} under `directory`."""

  def __init__(self, directory: pathlib.Path, c: Checkpoint):
    """`c`: the checkpoint section (lm.config.section(config, 'checkpoint'), or config.checkpoint)."""
    # A save that a killed process left unfinished stays a temporary folder, never a step: remove those.
    options = ocp.CheckpointManagerOptions(max_to_keep=c.max_to_keep, enable_async_checkpointing=c.async_save,
                                           create=True, cleanup_tmp_directories=True)
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
      with ocp.StandardCheckpointer() as reader:
        saved = set(reader.metadata(self.directory.absolute() / str(step) / 'state').item_metadata.tree)
    except Exception:  # Unreadable metadata: the restore itself will say what is wrong.
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
      except Exception as e:  # Tensorstore, JSON, OS errors: any unreadable part.
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
