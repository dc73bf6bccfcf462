"""The ways a run starts in its workdir: fresh, fine-tuned from another run's parameters
(checkpoint.init_from), branched from another run's whole state (checkpoint.init_mode='full'), or
resumed from its own latest checkpoint. `how_to_start` decides (and checks the checkpoints against the
config) before any data is read; `start_state` builds or restores the state."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable

import ml_collections

from lm.training import checkpoint, workdirs
from lm.training.train import Layout, TrainState, abstract_train_state, init_train_state

FRESH, FINE_TUNE, BRANCH, RESUME = 'fresh', 'fine-tune', 'branch', 'resume'


@dataclasses.dataclass(frozen=True)
class Start:
  how: str  # FRESH, FINE_TUNE, BRANCH or RESUME.
  source: pathlib.Path | None = None  # FINE_TUNE, BRANCH: the workdir of checkpoint.init_from ...
  step: int | None = None  # ... and its checkpoint to start from.
  changed: dict[str, tuple] = dataclasses.field(default_factory=dict)  # RESUME: keys changed, {key: (then, now)}.

  def data_workdir(self, workdir: pathlib.Path) -> pathlib.Path:
    """The workdir whose data stream this run continues: a branch continues its source's."""
    return self.source if self.how == BRANCH else workdir


def how_to_start(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> Start:
  """How a run of config starts in workdir; a ConfigError when its checkpoints, or those of
  checkpoint.init_from, do not fit config. A workdir with checkpoints resumes (init_from is then spent)."""
  changed = workdirs.check_workdir(workdir, config)
  if workdirs.has_checkpoints(workdir / 'checkpoints'):
    return Start(RESUME, changed=changed)
  if not config.checkpoint.init_from:
    return Start(FRESH)
  source = pathlib.Path(config.checkpoint.init_from)
  step = workdirs.check_init_from(source, config)
  return Start(BRANCH if config.checkpoint.init_mode == 'full' else FINE_TUNE, source, step)


def start_state(start: Start, layout: Layout, config: ml_collections.ConfigDict, own: checkpoint.Checkpointer,
                train_iter: Any, is_finite: Callable[[TrainState], bool]) -> tuple[TrainState, list[str]]:
  """The state the run starts from (train_iter moved to its data position) and the lines to tell the user.

  FRESH: initialized from config.seed. FINE_TUNE: that, with the source's parameters (a fresh optimizer,
  step 0, the data from its start). BRANCH: the source's whole state and data position at its step.
  RESUME: the latest checkpoint of `own` that restores and is finite, straight into this mesh's shards."""
  if start.how == RESUME:
    step, state, problems = own.restore_latest(abstract_train_state(layout), train_iter, is_finite)
    return state, [f'warning: {p}' for p in problems] + [f'resumed from step {step} in {own.directory.parent}']
  if start.how == BRANCH:
    source = checkpoint.Checkpointer(start.source / 'checkpoints', config.checkpoint)
    try:
      state = source.restore(start.step, abstract_train_state(layout), train_iter)
    finally:
      source.close()
    return state, [f'branched from step {start.step} of {start.source} (parameters, optimizer state and data '
                   'position)']
  state = init_train_state(layout)
  if start.how == FRESH:
    return state, []
  source = checkpoint.Checkpointer(start.source / 'checkpoints', config.checkpoint)
  try:
    state = state.replace(params=source.restore_params(start.step, state.params))
  finally:
    source.close()
  return state, [f'parameters from step {start.step} of {start.source}']
