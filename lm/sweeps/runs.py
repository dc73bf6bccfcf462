"""A sweep's runs: each point expanded into its validated config and workdir (<sweep>/<name>), its status
(finished, partly trained, new), and the sweep's record, sweep.json.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import sys
from typing import Any, Sequence

import ml_collections

from lm.config import ConfigError, flatten, load_module, override, split_spec, validate
from lm.sweeps.grid import SWEEP_DIR, Point, flag_value, point_name
from lm.training import lock, workdirs
from lm.training.workdirs import read_metrics

MANIFEST = 'sweep.json'



@dataclasses.dataclass
class Run:
  """One point of a sweep: its name, its overrides, the config they give, and where it trains."""
  name: str
  overrides: Point
  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  command: list[str]
  after: tuple[str, ...] = ()  # The points of the sweep whose runs this one starts from.


def main_command(spec: str, workdir: str | pathlib.Path, overrides: Point) -> list[str]:
  """The python -m lm.main command line that trains spec with overrides into workdir."""
  return ([sys.executable, '-m', 'lm.main', f'--config={spec}', f'--workdir={workdir}']
          + [f'--config.{k}={flag_value(v)}' for k, v in overrides.items()])


def _resolve(point: Point, name: str, workdir: str | pathlib.Path,
             earlier: Sequence[str]) -> tuple[Point, tuple[str, ...]]:
  """point with '{sweep}' replaced by workdir, and the earlier points whose runs it names."""
  resolved, after = {}, []
  for key, value in point.items():
    if isinstance(value, str) and SWEEP_DIR in value:
      for sibling in re.findall(re.escape(SWEEP_DIR) + r'/([^/]+)', value):
        if sibling not in earlier:
          raise ConfigError(f'sweep point {name!r}: {key}={value!r} names {sibling!r}, which is not an earlier '
                            f'point of this sweep (one of: {", ".join(earlier) or "none"})')
        after.append(sibling)
      value = value.replace(SWEEP_DIR, str(workdir))
    resolved[key] = value
  return resolved, tuple(dict.fromkeys(after))


def expand(spec: str, workdir: str | pathlib.Path, overrides: Point | None = None) -> list[Run]:
  """The runs of the sweep in experiment file spec ('path' or 'path:arg'), each with its config
  validated; overrides apply to every point. Raises ConfigError naming the point at fault."""
  overrides = dict(overrides or {})
  path, arg = split_spec(spec)
  module = load_module(path)
  if not hasattr(module, 'get_sweep'):
    raise ConfigError(f'{path} defines no get_sweep(): it is a single experiment; train it with python -m lm.main')
  try:
    base = module.get_config() if arg is None else module.get_config(arg)
    points = module.get_sweep() if arg is None else module.get_sweep(arg)
  except ConfigError:
    raise
  except (ValueError, TypeError, KeyError) as e:  # A preset argument the file does not know, say.
    raise ConfigError(f'{spec}: {e}') from e
  if not isinstance(points, list) or not points or not all(isinstance(p, dict) for p in points):
    raise ConfigError(f'{path}: get_sweep() must return a non-empty list of {{key: value}} dicts '
                      '(see lm.sweep.axis, product, zip, chain)')
  base = override(base, overrides)
  swept = list(dict.fromkeys(k for p in points for k in p))
  clash = [k for k in swept if k in overrides]
  if clash:
    raise ConfigError(f'--config.{clash[0]} sets a key the sweep varies; drop it, or change the sweep')
  runs, names, configs = [], {}, {}
  for point in points:
    name = point_name(point, swept)
    if name in names:
      raise ConfigError(f'sweep: point {name!r} appears twice')
    point, after = _resolve(point, name, workdir, list(names))
    try:
      config = validate(override(base, point))
    except ConfigError as e:
      raise ConfigError(f'sweep point {name!r}: {e}') from e
    same = configs.get(json.dumps(flatten(config), sort_keys=True, default=str))
    if same:
      raise ConfigError(f'sweep points {same!r} and {name!r} give the same config')
    names[name] = point
    configs[json.dumps(flatten(config), sort_keys=True, default=str)] = name
    run_dir = pathlib.Path(workdir) / name
    runs.append(Run(name, dict(point), config, run_dir, main_command(spec, run_dir, overrides | point), after))
  return runs


def finished_steps(run_dir: pathlib.Path) -> int:
  """The latest checkpointed step of a run directory (0: none)."""
  steps = workdirs.checkpoint_steps(run_dir / 'checkpoints')
  return steps[-1] if steps else 0


def status(run: Run) -> str:
  """'done' (checkpointed at train.steps), 'partial' (checkpointed earlier) or 'new'."""
  step = finished_steps(run.workdir)
  return 'done' if step >= run.config.train.steps else 'partial' if step else 'new'


def manifest(spec: str, overrides: Point, runs: list[Run]) -> dict[str, Any]:
  path, arg = split_spec(spec)
  return {'experiment': str(pathlib.Path(path).resolve()), 'arg': arg,
          'overrides': {k: flag_value(v) for k, v in overrides.items()},
          'points': [{'name': r.name, 'overrides': r.overrides, 'command': r.command} for r in runs]}


def check_workdir(workdir: pathlib.Path, record: dict[str, Any], runs: list[Run]) -> None:
  """Refuses a workdir that holds something other than runs of this sweep, before anything runs."""
  if (workdir / 'config.json').exists():
    raise ConfigError(f'workdir {str(workdir)!r} holds a training run, not a sweep; use another --workdir')
  path = workdir / MANIFEST
  if not path.exists():
    if workdir.is_dir() and any(p.name != lock.LOCK_FILE for p in workdir.iterdir()):
      raise ConfigError(f'workdir {str(workdir)!r} is not empty and holds no {MANIFEST}; use another --workdir')
    return
  old = json.loads(path.read_text())
  for key, what in (('experiment', 'experiment'), ('arg', 'preset argument')):
    if old.get(key) != record[key]:
      raise ConfigError(f'workdir {str(workdir)!r} holds a sweep of another {what} ({old.get(key)!r}, not '
                        f'{record[key]!r}); use another --workdir')
  if old.get('overrides') != record['overrides']:
    described = lambda o: ' '.join(f'--config.{k}={v}' for k, v in o.items()) or 'no overrides'
    raise ConfigError(f'workdir {str(workdir)!r} holds a sweep run with {described(old.get("overrides", {}))}, '
                      f'not {described(record["overrides"])}; use another --workdir or the same overrides')
  started = [r for r in runs if finished_steps(r.workdir)]
  if started:  # Edited experiment files must not resume checkpoints of another model.
    for run in started:
      try:
        workdirs.check_workdir(run.workdir, run.config)
      except ConfigError as e:
        raise ConfigError(f'sweep point {run.name!r}: {e}') from e


def write_manifest(workdir: pathlib.Path, record: dict[str, Any]) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / MANIFEST
  if path.exists():  # Keep points that earlier versions of the sweep ran.
    names = {p['name'] for p in record['points']}
    record = dict(record, points=record['points'] + [
        p for p in json.loads(path.read_text())['points'] if p['name'] not in names])
  tmp = path.with_suffix('.tmp')
  tmp.write_text(json.dumps(record, indent=1))
  tmp.rename(path)


def final_metrics(run_dir: pathlib.Path) -> dict[str, float]:
  """The last eval record of a run's metrics.jsonl ({} if none)."""
  records = read_metrics(run_dir) if (run_dir / 'metrics.jsonl').exists() else []
  evals = [r for r in records if 'eval/loss' in r]
  return evals[-1] if evals else {}
