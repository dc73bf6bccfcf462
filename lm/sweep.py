"""Sweeps: grids of config overrides declared beside an experiment, and the launcher that runs them.

  python -m lm.sweep --config=experiments/ablations/positions.py --workdir=runs/positions
      [--parallel=2] [--dry_run] [--launcher=local|inline|slurm] [--config.train.steps=300 ...]

An experiment file that sweeps defines `get_sweep(arg)` beside `get_config(arg)`, returning a list
of points, each a {'group.key': value} dict of overrides, built with `axis`, `product`, `zip` and
`chain` below. Every point trains with `python -m lm.main` into `<workdir>/<name>`, its name spelled
from its overrides (`positions=rope,learning_rate=0.003`); `<workdir>/sweep.json` records the sweep.
Running the sweep again skips finished points and resumes the others from their checkpoints.
Every point's config is built and validated before any of them starts.

A point may start from another point's run: '{sweep}' in a value is the sweep's workdir, as in
{'checkpoint.init_from': '{sweep}/schedule=wsd', 'checkpoint.init_step': 100, ...} (a cooldown
branched from an earlier point). Such a point must come after the one it names, waits for it to
finish, and is spelled without that key in its name.
"""

from __future__ import annotations

import builtins
import dataclasses
import itertools
import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

from absl import flags
import ml_collections

from lm import cli, lock, workdirs
from lm.config import ConfigError, flatten, load_module, override, split_spec, validate
from lm.workdirs import read_metrics

CONFIG = cli.config_flag()

Point = dict[str, Any]
MANIFEST = 'sweep.json'
SWEEP_DIR = '{sweep}'  # In a point's value: the sweep's workdir.
LAUNCHERS = ('local', 'inline', 'slurm')


# ---------------------------------------------------------------------------------------------
# Declaring a sweep.

def axis(key: str, values: Sequence[Any]) -> list[Point]:
  """One key taking each of values: [{key: v} for v in values]."""
  if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
    raise ConfigError(f'sweep axis {key!r}: values must be a non-empty list, not {values!r}')
  return [{key: v} for v in values]


def _merge(points: Sequence[Point], how: str) -> Point:
  merged: Point = {}
  for point in points:
    for key, value in point.items():
      if key in merged:
        raise ConfigError(f'sweep: key {key!r} is swept twice (by two axes of one {how})')
      merged[key] = value
  return merged


def product(*sweeps: list[Point]) -> list[Point]:
  """Every combination: product(axis('a', [1, 2]), axis('b', [3, 4])) has 4 points."""
  return [_merge(combo, 'product') for combo in itertools.product(*sweeps)]


# sweep.zip on purpose (the name experiments call it by): this module calls the builtin as builtins.zip.
def zip(*sweeps: list[Point]) -> list[Point]:
  """Points taken side by side: zip(axis('a', [1, 2]), axis('b', [3, 4])) is {a:1, b:3}, {a:2, b:4}."""
  lengths = {len(s) for s in sweeps}
  if len(lengths) > 1:
    raise ConfigError(f'sweep: zip of sweeps of different lengths {sorted(len(s) for s in sweeps)}')
  return [_merge(points, 'zip') for points in builtins.zip(*sweeps)]


def chain(*sweeps: list[Point]) -> list[Point]:
  """The points of each sweep in turn (one knob at a time: chain(axis(a, ...), axis(b, ...)))."""
  return [point for sweep in sweeps for point in sweep]


# ---------------------------------------------------------------------------------------------
# Expanding a sweep into runs.

def flag_value(value: Any) -> str:
  """value as --config.key=VALUE spells it so that the flag parses back to value."""
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  return str(value) if isinstance(value, (str, bool)) else repr(value)


def _name_value(value: Any) -> str:
  text = f'{value:g}' if isinstance(value, float) else flag_value(value)
  return re.sub(r'[^A-Za-z0-9._+-]+', '-', text).strip('-') or 'empty'


def point_name(point: Point, swept_keys: Sequence[str]) -> str:
  """'positions=rope,learning_rate=0.003': each key's last part (the whole key where two swept keys
  share a last part) = its value; 'base' for a point that overrides nothing."""
  leaves = [k.split('.')[-1] for k in swept_keys]
  parts = []
  for key, value in point.items():
    if isinstance(value, str) and SWEEP_DIR in value:
      continue
    label = key.split('.')[-1] if leaves.count(key.split('.')[-1]) == 1 else key
    parts.append(f'{label}={_name_value(value)}')
  return ','.join(parts) or 'base'


def preset(arg: str, points: list[Point], scales: Sequence[str]) -> tuple[str, Point]:
  """(scale, point) named by a preset argument 'TOKEN[,TOKEN...]': a scale from `scales` (default the
  first), and the values (or key=value parts of the name) of at most one point of the sweep.
  'rope' -> (scales[0], {'model.positions': 'rope'}); 'rmsnorm,post,gpu' -> ('gpu', that point)."""
  tokens = [t for t in (arg or '').split(',') if t]
  scale = [t for t in tokens if t in scales]
  wanted = sorted(t for t in tokens if t not in scales)
  if len(scale) > 1:
    raise ConfigError(f'preset {arg!r} names two scales: {", ".join(scale)}')
  swept = list(dict.fromkeys(k for p in points for k in p))
  matches = []
  for point in points:
    parts = point_name(point, swept).split(',')
    values = [part.split('=', 1)[1] for part in parts]
    if wanted and len(wanted) == len(parts) and all(
        any(t in (part, value) for part, value in builtins.zip(parts, values)) for t in wanted):
      matches.append(point)
  if wanted and len(matches) != 1:
    names = ' | '.join(','.join(part.split('=', 1)[1] for part in point_name(p, swept).split(',')) for p in points)
    raise ConfigError(f'preset {arg!r}: expected [POINT,][SCALE] with SCALE one of {", ".join(scales)} and POINT '
                      f'one of {names}' + (' (ambiguous: name it key=value)' if matches else ''))
  return (scale[0] if scale else scales[0]), (dict(matches[0]) if wanted else {})


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


# ---------------------------------------------------------------------------------------------
# The workdir of a sweep.

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


# ---------------------------------------------------------------------------------------------
# Launching.

def slurm_script(runs: list[Run], workdir: pathlib.Path, parallel: int | None = None,
                 sbatch: Sequence[str] = ()) -> str:
  """A Slurm job array script with one task per run, each running that run's command line from
  this directory; `parallel` caps the tasks running at once, `sbatch` adds #SBATCH lines."""
  workdir = workdir.resolve()
  lines = ['#!/bin/bash', f'#SBATCH --job-name={shlex.quote("lm-" + workdir.name)}',
           f'#SBATCH --array=0-{len(runs) - 1}' + (f'%{parallel}' if parallel else ''),
           f'#SBATCH --output={shlex.quote(str(workdir / "slurm-%A_%a.out"))}']
  lines += [f'#SBATCH {flag}' for flag in sbatch]
  lines += ['set -euo pipefail', f'cd {shlex.quote(os.getcwd())}', 'COMMANDS=(']
  lines += [f'  {shlex.quote(shlex.join(r.command))}' for r in runs]
  lines += [')', 'eval "${COMMANDS[$SLURM_ARRAY_TASK_ID]}"', '']
  return '\n'.join(lines)


def final_metrics(run_dir: pathlib.Path) -> dict[str, float]:
  """The last eval record of a run's metrics.jsonl ({} if none)."""
  records = read_metrics(run_dir) if (run_dir / 'metrics.jsonl').exists() else []
  evals = [r for r in records if 'eval/loss' in r]
  return evals[-1] if evals else {}


def _run_inline(run: Run) -> int:
  try:  # Through cli.call: a sweep that only plans or launches processes never imports JAX.
    stopped_by = cli.call('lm.loop:train_command', run.config, run.workdir)
  except SystemExit as e:  # A one-line refusal.
    print(e, flush=True)
    return 1
  if stopped_by:  # Ctrl-C (or SIGTERM) stops the sweep too, this point checkpointed.
    raise KeyboardInterrupt(stopped_by)
  return 0


def _start(run: Run, log: pathlib.Path) -> subprocess.Popen:
  run.workdir.mkdir(parents=True, exist_ok=True)
  with open(log, 'a', encoding='utf-8') as f:
    return subprocess.Popen(run.command, stdout=f, stderr=subprocess.STDOUT)


def _last_line(log: pathlib.Path) -> str:
  lines = [l for l in log.read_text(errors='replace').splitlines() if l.strip()] if log.exists() else []
  return lines[-1].strip()[:200] if lines else ''


def launch(spec: str, workdir: str | pathlib.Path, overrides: Point | None = None, *, parallel: int | None = None,
           launcher: str = 'local', dry_run: bool = False, sbatch: Sequence[str] = (),
           say: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """Runs (or with dry_run, lists) every point of the sweep not yet done; returns one record per point:
  name, overrides, status before, seconds, returncode and final eval metrics.

  launcher 'local' runs each point's command line in a subprocess, `parallel` at a time, its output
  in <run>/train.log; 'inline' trains the points one after another in this process (no start-up
  cost per point: for small sweeps in a notebook); 'slurm' writes <workdir>/sweep.sbatch, a job
  array of the same command lines (at most `parallel` at once; default no limit), and runs nothing.
  """
  if launcher not in LAUNCHERS:
    raise ConfigError(f'--launcher={launcher!r}: must be one of {", ".join(LAUNCHERS)}')
  if parallel is not None and parallel < 1:
    raise ConfigError(f'--parallel={parallel}: must be >= 1')
  overrides = dict(overrides or {})
  workdir = pathlib.Path(workdir)
  runs = expand(spec, workdir, overrides)
  record = manifest(spec, overrides, runs)
  held = None if dry_run else lock.acquire(workdir)  # One launcher per sweep folder (each point locks its own).
  try:
    check_workdir(workdir, record, runs)
    before = {r.name: status(r) for r in runs}
    results = {r.name: {'name': r.name, **r.overrides, 'status': before[r.name]} for r in runs}
    todo = [r for r in runs if before[r.name] != 'done']
    for r in runs:
      step = finished_steps(r.workdir)
      what = {'done': 'done', 'partial': f'resumes from step {step}', 'new': 'to run'}[before[r.name]]
      say(f'{r.name:40s} {what}' + (f'\n    {shlex.join(r.command)}' if dry_run else ''))
    if dry_run:
      return list(results.values())
    blocked = [r for r in todo if any(before[a] != 'done' for a in r.after)]
    if launcher == 'slurm' and blocked:  # Refused before anything is written.
      raise ConfigError(f'sweep point {blocked[0].name!r} starts from point {blocked[0].after[0]!r}, which is not '
                        'done: a job array cannot order them; run the sweep with --launcher=local')
    write_manifest(workdir, record)
    if launcher == 'slurm':
      if todo:
        script = workdir / 'sweep.sbatch'
        script.write_text(slurm_script(todo, workdir, parallel, sbatch))
        say(f'{len(todo)} of {len(runs)} points in a job array: sbatch {script}')
      return list(results.values())

    failed: set[str] = set()

    def finish(run: Run, returncode: int, seconds: float, log: pathlib.Path | None) -> None:
      final = final_metrics(run.workdir)
      results[run.name].update(returncode=returncode, seconds=seconds, **final)
      if returncode == 0 and status(run) == 'done':
        say(f'finished {run.name} in {seconds:.0f} s: eval loss {final.get("eval/loss", float("nan")):.4f}, '
            f'bits/byte {final.get("eval/bits_per_byte", float("nan")):.4f}')
      else:
        failed.add(run.name)
        why = f'; {log}: {_last_line(log)}' if log else ''
        say(f'FAILED {run.name} (exit {returncode}) after {seconds:.0f} s{why}')

    def skipped(run: Run) -> bool:
      """Whether run starts from a point that failed (then it fails too, without running)."""
      parent = next((a for a in run.after if a in failed), None)
      if parent:
        failed.add(run.name)
        results[run.name].update(returncode=1, seconds=0.0)
        say(f'FAILED {run.name}: not run, it starts from {parent}, which failed')
      return parent is not None

    parallel = parallel or 1
    at_once = f', {parallel} at a time' if launcher == 'local' else ''
    say(f'{len(todo)} of {len(runs)} points to run, {launcher}{at_once}')
    if launcher == 'inline':
      for run in todo:
        if not skipped(run):
          start = time.perf_counter()
          finish(run, _run_inline(run), time.perf_counter() - start, None)
    else:
      queue, running = list(todo), {}
      try:
        while queue or running:
          queue = [r for r in queue if not skipped(r)]
          while len(running) < parallel:
            waiting = {r.name for r in queue} | set(running)
            run = next((r for r in queue if not set(r.after) & waiting), None)
            if run is None:
              break
            queue.remove(run)
            log = run.workdir / 'train.log'
            running[run.name] = (run, _start(run, log), time.perf_counter(), log)
            say(f'started {run.name}')
          for name, (run, proc, start, log) in list(running.items()):
            if proc.poll() is not None:
              del running[name]
              finish(run, proc.returncode, time.perf_counter() - start, log)
          time.sleep(0.2)
      finally:  # Interrupted: stop the points still training; their checkpoints stay for the next launch.
        for run, proc, _, _ in running.values():
          proc.terminate()
          proc.wait()
    return list(results.values())

  finally:
    if held is not None:
      held.release()

def _define_flags():
  flags.DEFINE_string('workdir', None, 'Directory of the sweep: one sub-workdir per point, and sweep.json.')
  flags.DEFINE_integer('parallel', None, 'Points training at once (default 1; slurm: array tasks at once, '
                       'default no limit).')
  flags.DEFINE_enum('launcher', 'local', list(LAUNCHERS), "'local': subprocesses here; 'inline': one after "
                    "another in this process; 'slurm': write <workdir>/sweep.sbatch, a job array, and run nothing.")
  flags.DEFINE_boolean('dry_run', False, 'List the points, their status and command lines; run nothing.')
  flags.DEFINE_multi_string('sbatch', [], "launcher=slurm: a line for the script's #SBATCH header, "
                            "e.g. --sbatch=--partition=gpu --sbatch=--gres=gpu:1 (repeatable).")


def main(argv: list[str]) -> None:
  del argv
  # A killed launcher (SIGTERM: scancel, a job's time limit) stops its points too, which keep their checkpoints.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  f = flags.FLAGS
  if CONFIG.value is None or f.workdir is None:
    sys.exit('error: --config and --workdir are required, e.g. python -m lm.sweep '
             '--config=experiments/ablations/positions.py --workdir=runs/positions')
  flat = flatten(CONFIG.value)
  # The --config.key=value flags given apply to every point, parsed to their types by config_flags.
  keys = [a[len('--config.'):].split('=', 1)[0] for a in sys.argv[1:] if a.startswith('--config.')]
  spec = next((a.split('=', 1)[1] for a in sys.argv[1:] if a.startswith('--config=')), f['config'].config_filename)
  try:
    results = launch(spec, f.workdir, {k: flat[k] for k in keys}, parallel=f.parallel, launcher=f.launcher,
                     dry_run=f.dry_run, sbatch=f.sbatch)
  except ConfigError as e:
    sys.exit(f'error: {e}')
  if any(r.get('returncode') for r in results):
    sys.exit(1)


if __name__ == '__main__':
  _define_flags()
  cli.run(main)
