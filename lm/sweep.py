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

import signal
import sys

from absl import flags

from lm import cli
from lm.config import ConfigError, flatten
from lm.sweeps.grid import SWEEP_DIR, axis, chain, preset, product, zip  # noqa: F401 (what experiment files declare with)
from lm.sweeps.launch import LAUNCHERS, launch


def _define_flags() -> None:
  """The command line's flags (defined only when run as a program)."""
  cli.config_flag()
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
  if f.config is None or f.workdir is None:
    sys.exit('error: --config and --workdir are required, e.g. python -m lm.sweep '
             '--config=experiments/ablations/positions.py --workdir=runs/positions')
  flat = flatten(f.config)
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
