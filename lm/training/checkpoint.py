"""Orbax checkpoints of the train state together with the Grain data iterator state and the
checksums of the state's arrays (lm.training.checksums), checked on every restore."""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import re
import shutil
import sys
import time
from typing import Any, Callable

import grain
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from lm.config import ConfigError
from lm.training import checksums

CHECKSUMS = 'checksums'  # The item holding {array name: checksum} beside 'state' and 'data'.


class CheckpointWriteError(OSError):
  """A checkpoint could not be written (a full disk, a quota, a vanished mount)."""


class ChecksumError(ValueError):
  """A restored array differs from the checksum saved with it: the checkpoint is damaged."""


class _OrbaxNoise(logging.Filter):
  """Drops orbax log records that would read as failures: its warning that a step's metadata file does
  not exist (on restores of checkpoints whose save wrote that file last), and the tracebacks that its
  background threads log when a save fails, which Checkpointer reports itself in one line
  (CheckpointWriteError) and restore_latest as a warning."""

  def filter(self, record: logging.LogRecord) -> bool:
    if '/orbax/' not in record.pathname:
      return True
    if record.getMessage().startswith('Metadata file does not exist'):
      return False
    return not (record.levelno >= logging.ERROR and (record.exc_info or record.threadName != 'MainThread'))


class _AbandonedWrites(logging.Filter):
  """Drops asyncio's 'Task exception was never retrieved' for the other writes of a failed save."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not ('exception was never retrieved' in message and '.orbax-checkpoint-tmp' in message)


def _unraisable_but_closed_loops(hook: Callable) -> Callable:
  """sys.unraisablehook less 'Event loop is closed': when an orbax save fails, tensorstore's callbacks
  for the writes it abandoned reach the event loop orbax has closed, one traceback per array."""
  def unraisable(info) -> None:
    if not (isinstance(info.exc_value, RuntimeError) and str(info.exc_value) == 'Event loop is closed'):
      hook(info)
  return unraisable


sys.unraisablehook = _unraisable_but_closed_loops(sys.unraisablehook)
logging.getLogger('absl').addFilter(_OrbaxNoise())
logging.getLogger('asyncio').addFilter(_AbandonedWrites())


def _abstract(like: Any) -> Any:
  """Shapes, dtypes and shardings to restore into: orbax reshards a checkpoint written on any mesh."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, 'sharding', None)), like)


class Checkpointer:
  """Keeps the last `max_to_keep` checkpoints of {state, data iterator} under `directory`."""

  def __init__(self, directory: pathlib.Path, c: ml_collections.ConfigDict):
    """`c`: the checkpoint section (lm.config.section(config, 'checkpoint'), or config.checkpoint)."""
    # A save that a killed process left unfinished stays a temporary folder, never a step: remove those.
    options = ocp.CheckpointManagerOptions(max_to_keep=c.max_to_keep, enable_async_checkpointing=c.async_save,
                                           create=True, cleanup_tmp_directories=True)
    self.directory = directory
    self._manager = ocp.CheckpointManager(directory.absolute(), options=options,
                                          item_names=('state', 'data', CHECKSUMS))
    self._writing: int | None = None  # The step of the save in flight (written in the background).

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator) -> None:
    self._save(step, state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator),
               **{CHECKSUMS: ocp.args.JsonSave(checksums.checksums(state))})

  def save_params(self, step: int, params: Any) -> None:
    """Parameters alone (no optimizer or data state): what restore_params reads, e.g. imported weights."""
    self._save(step, state=ocp.args.StandardSave({'params': params}),
               **{CHECKSUMS: ocp.args.JsonSave(checksums.checksums({'params': params}))})

  def _save(self, step: int, **items) -> None:
    self.wait()
    try:
      self._manager.save(step, args=ocp.args.Composite(**items))
    except Exception as e:  # Tensorstore's, orbax's or the OS's error: a write that failed.
      raise self._write_error(step, e) from e
    self._writing = step

  def wait(self) -> None:
    """Waits for the save in flight; a CheckpointWriteError if it failed."""
    step, self._writing = self._writing, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      raise self._write_error(step, e) from e

  def _write_error(self, step: int | None, error: Exception) -> CheckpointWriteError:
    message = str(error).strip()
    os_error = re.search(r"([^:\"]+) \[os_error_code='?(\d+)'?\]", message)  # Tensorstore's form.
    why = (f'{os_error[1].strip()}, errno {os_error[2]}' if os_error else
           message.splitlines()[0][:300] if message else type(error).__name__)
    kept = [s for s in self._manager.all_steps() if s != step]
    after = (f'the checkpoints before it are kept ({", ".join(map(str, sorted(kept)))}): free space and run the same '
             f'command to resume from step {max(kept)}') if kept else 'no earlier checkpoint exists'
    return CheckpointWriteError(f'checkpoint {step} could not be written in {self.directory} '
                                f'({why}); {after}')

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
    self._verify(step, restored)
    if not missing:
      return restored
    zeros = {name: jnp.zeros(getattr(like, name).shape, getattr(like, name).dtype,
                             device=getattr(like, name).sharding) for name in missing}
    return dataclasses.replace(like, **restored, **zeros)

  def _verify(self, step: int, restored: Any) -> None:
    """Raises ChecksumError when an array restored from `step` differs from its checksum (checkpoints
    written before checksums were kept restore unchecked)."""
    if not (self.directory / str(step) / CHECKSUMS).exists():
      return
    saved = self._manager.restore(step, args=ocp.args.Composite(**{CHECKSUMS: ocp.args.JsonRestore()}))[CHECKSUMS]
    wrong = checksums.mismatches(saved, restored)
    if wrong:
      raise ChecksumError(f'{len(wrong)} array(s) differ from their checksums: {", ".join(wrong[:3])}'
                       + (' ...' if len(wrong) > 3 else ''))

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
    self._verify(step, restored.state)
    return restored.state['params']

  def close(self) -> None:
    """Waits for the save in flight (a CheckpointWriteError if it failed) and closes."""
    try:
      self.wait()
    finally:
      self._manager.close()
