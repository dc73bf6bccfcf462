"""Running a sweep's points: local subprocesses (a few at a time), inline in this process, or a Slurm job
array script; finished points are skipped, the others resume from their checkpoints.
"""

from __future__ import annotations

import os
import pathlib
import shlex
import subprocess
import time
from typing import Any, Callable, Sequence

from lm import cli
from lm.config import ConfigError
from lm.sweeps.grid import Point
from lm.sweeps.runs import Run, check_workdir, expand, final_metrics, finished_steps, manifest, status, write_manifest
from lm.training import lock

LAUNCHERS = ('local', 'inline', 'slurm')



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


def _run_inline(run: Run) -> int:
  from lm.training import loop  # noqa: PLC0415 (here: a sweep that plans or launches processes never imports JAX)
  cli.cpu_without_accelerators()  # JAX is imported now, and not started yet.
  try:
    stopped_by = loop.train_command(run.config, run.workdir)
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
