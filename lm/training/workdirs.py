"""What a workdir holds, read and checked without JAX: its checkpoint steps, the config and data its
checkpoints were trained with (and whether this config may resume them), and metrics.jsonl."""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any

import ml_collections

from lm.config import KEYS, ConfigError, flatten, must_match, same_mesh

IMPORTED_FILE = 'imported.json'  # Marks a workdir of imported parameters (python -m lm.hf import).


def checkpoint_steps(directory: str | pathlib.Path) -> list[int]:
  """The steps of the checkpoints under `directory` (a workdir's checkpoints/), oldest first: the
  folders orbax names by step (its unfinished saves carry a suffix, so they are not counted)."""
  directory = pathlib.Path(directory)
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def has_checkpoints(directory: pathlib.Path) -> bool:
  return bool(checkpoint_steps(directory))


def _changed_keys(saved: dict[str, Any], config: ml_collections.ConfigDict) -> dict[str, tuple]:
  """{key: (saved value, value now)} for each key whose value differs; a key the saved config.json
  predates counts as saved with its default."""
  current = json.loads(json.dumps(flatten(config)))  # Tuples -> lists, as in the saved file.
  defaults = json.loads(json.dumps({k: KEYS[k].default for k in current}))
  old = {k: saved.get(k, defaults[k]) for k in current}
  return {k: (old[k], v) for k, v in current.items()
          if not (same_mesh(old[k], v) if k == 'mesh.shape' else old[k] == v)}


def _differences(changed: dict[str, tuple], keys: list[str]) -> str:
  """'model.d_model is 32 there, 64 here, ...': every key that differs, so one try sees them all."""
  return ', '.join(f'{k} is {changed[k][0]!r} there, {changed[k][1]!r} here' for k in keys)


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
    raise ConfigError(f'workdir {str(workdir)!r} holds checkpoints of a different model, data or optimizer config: '
                      f'{_differences(changed, clashes)}; use a new --workdir or the same config')
  return changed


def check_init_from(source: pathlib.Path, config: ml_collections.ConfigDict) -> int:
  """The step of the workdir `source` to start this run from (checkpoint.init_step, -1: the latest); a
  ConfigError unless source has a checkpoint there of a model shaped like config's, with the same
  tokenizer kind. init_mode='full' (its whole state, data position included) also needs each key that
  a resume needs to match (optimizer.name, the data stream, ...) to match, and a training run."""
  c = config.checkpoint
  where = f'checkpoint.init_from={str(source)!r}'
  steps = checkpoint_steps(source / 'checkpoints')
  if not steps or not (source / 'config.json').exists():
    raise ConfigError(f'{where} is not a workdir with checkpoints and a config.json')
  full = c.init_mode == 'full'
  if full and (source / IMPORTED_FILE).exists():
    raise ConfigError(f"{where} holds imported parameters only: use checkpoint.init_mode='params'")
  if c.init_step != -1 and c.init_step not in steps:
    raise ConfigError(f'checkpoint.init_step={c.init_step}: {where} has no checkpoint at that step; it has steps '
                      + ', '.join(map(str, steps)))
  changed = _changed_keys(json.loads((source / 'config.json').read_text()), config)
  clashes = [k for k in changed if must_match(k, init_from=not full)]
  if not full and config.model.positions != 'learned':  # Only a learned position table has max_len rows.
    clashes = [k for k in clashes if k != 'model.max_len']  # A longer context starts from a shorter one's weights.
  if clashes:
    detail = _differences(changed, clashes)
    what = "a different model, data or optimizer config (init_mode='full' continues it)" if full else \
        'a differently shaped model'
    raise ConfigError(f'{where} holds {what}: {detail}')
  return steps[-1] if c.init_step == -1 else c.init_step


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
  """Writes config.json and dataset.json; a resume that changed keys is recorded in config_changes.jsonl.
  Process 0's job in a multi-host run."""
  write_atomically(workdir / 'config.json', json.dumps(flatten(config), indent=1, sort_keys=True))
  write_atomically(workdir / 'dataset.json', json.dumps({'dataset': dataset, 'data_shards': data_shards}))
  if changed:
    record = {'step': step, 'time': time.time(), 'changes': {k: list(v) for k, v in changed.items()}}
    with open(workdir / 'config_changes.jsonl', 'a', encoding='utf-8') as f:
      f.write(json.dumps(record) + '\n')


def write_atomically(path: pathlib.Path, text: str) -> None:
  """A process killed while writing leaves the old file, never half of the new one."""
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(text, encoding='utf-8')
  os.replace(tmp, path)


def read_metrics(workdir: pathlib.Path | str) -> list[dict[str, float]]:
  """The records of a workdir's metrics.jsonl, less a last line cut short by a killed process."""
  text = (pathlib.Path(workdir) / 'metrics.jsonl').read_text()
  lines = text.splitlines()
  if lines and not text.endswith('\n'):
    try:
      json.loads(lines[-1])
    except json.JSONDecodeError:
      lines.pop()
  return [json.loads(line) for line in lines if line.strip()]
