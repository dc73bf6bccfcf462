"""Finished (or running) runs as pandas DataFrames, the plots and tables of an ablation, and the
scaling-law fit.

  runs = results.load_runs('runs/ablations/positions')      # one row per run: config + final metrics
  curves = results.load_curves('runs/ablations/positions')  # one row per (run, step) record
  results.plot_curves(curves, 'eval/loss'); results.table(runs)
  results.report('runs/ablations/positions')  # the table, the loss curves and the ranking at once

A workdir is a run (it holds config.json) or a folder of runs, such as a sweep's (lm.sweep).
DataFrames and plots need the notebooks extra (pandas, matplotlib): without it this module still
imports, the scaling-law fit works, and what needs them says `pip install 'lm[notebooks]'`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Sequence

import ml_collections
import numpy as np
import scipy.optimize

from lm.sweeps import launch as sweep_launch
from lm.sweeps import runs as sweep_runs
from lm.training.workdirs import read_metrics

# Optional: the `notebooks` extra. IPython only shows report's table in a notebook (else it prints).
try:
  import pandas as pd
except ImportError:
  pd = None
try:
  from matplotlib import ticker
  import matplotlib.pyplot as plt
except ImportError:
  plt = ticker = None
try:
  from IPython import display
except ImportError:
  display = None

FINAL_METRICS = ('eval/loss', 'eval/bits_per_byte', 'eval/perplexity')


def _require(module, name: str, what: str) -> None:
  """One clear error where `what` needs a package of the notebooks extra that is not installed."""
  if module is None:
    raise ModuleNotFoundError(f"lm.analysis.results.{what} needs {name}: pip install 'lm[notebooks]'", name=name)


def run_dirs(workdir: str | pathlib.Path) -> list[pathlib.Path]:
  """The runs in workdir: itself if it is one, else its sub-folders that are (a sweep's in its order)."""
  workdir = pathlib.Path(workdir)
  if (workdir / 'config.json').exists():
    return [workdir]
  found = sorted(p for p in workdir.iterdir() if (p / 'config.json').exists()) if workdir.is_dir() else []
  if (workdir / sweep_runs.MANIFEST).exists():
    order = [p['name'] for p in json.loads((workdir / sweep_runs.MANIFEST).read_text())['points']]
    found.sort(key=lambda p: order.index(p.name) if p.name in order else len(order))
  if not found:
    raise FileNotFoundError(f'{workdir} holds no runs (no config.json in it or its sub-folders)')
  return found


def swept_keys(workdir: str | pathlib.Path, runs: pd.DataFrame | None = None) -> list[str]:
  """The config keys a sweep varied (from its sweep.json), else those that differ between the runs."""
  manifest = pathlib.Path(workdir) / sweep_runs.MANIFEST
  if manifest.exists():
    points = json.loads(manifest.read_text())['points']
    return list(dict.fromkeys(k for p in points for k in p['overrides']))
  if runs is None:
    runs = load_runs(workdir)
  config_keys = [c for c in runs.columns if '.' in c and '/' not in c]
  return [k for k in config_keys if runs[k].astype(str).nunique() > 1]


def _tokens_per_step(config: dict) -> int:
  # Imported here, as runs are read: the model kinds bring in JAX and Flax, which importing this module must not.
  from lm.training.metrics import tokens_per_example  # noqa: PLC0415
  nested = ml_collections.ConfigDict()
  for key, value in config.items():
    group, leaf = key.split('.', 1) if '.' in key else ('', key)
    if group:
      nested[group] = nested.get(group, ml_collections.ConfigDict())
      nested[group][leaf] = value
  return config['data.batch_size'] * tokens_per_example(nested.model, nested.data)


def load_runs(workdir: str | pathlib.Path) -> pd.DataFrame:
  """One row per run: 'run' (its folder name), 'status', every config key ('model.d_model', ...),
  'step' reached, 'tokens' trained on, 'model/params' (and 'model/embedding_params' among them),
  'model/flops_per_token', the last eval's metrics ('eval/loss', 'eval/bits_per_byte', ...), the
  last harness run's ('harness/TASK/METRIC', with eval.harness_tasks), the last 'train/loss', the
  median 'train/tokens_per_second' and 'seconds' spent compiling, training and evaluating.
  `.attrs['swept']` lists the keys the sweep varied."""
  _require(pd, 'pandas', 'load_runs')
  rows = []
  for run_dir in run_dirs(workdir):
    config = json.loads((run_dir / 'config.json').read_text())
    records = read_metrics(run_dir) if (run_dir / 'metrics.jsonl').exists() else []
    step = max((r['step'] for r in records), default=0)
    evals = [r for r in records if 'eval/loss' in r]
    harness_runs = [r for r in records if 'harness/seconds' in r]
    trains = [r for r in records if 'train/loss' in r]
    model = next((r for r in reversed(records) if 'model/params' in r), {})
    done = sweep_runs.finished_steps(run_dir) >= config['train.steps']
    row = {'run': run_dir.name, 'path': str(run_dir),
           'status': 'done' if done else 'partial' if sweep_runs.finished_steps(run_dir) else 'new',
           **{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()},
           'step': step, 'tokens': step * _tokens_per_step(config),
           'model/params': model.get('model/params', math.nan),
           'model/embedding_params': model.get('model/embedding_params', math.nan),
           'model/flops_per_token': model.get('model/flops_per_token', math.nan)}
    row |= {k: v for k, v in (evals[-1] if evals else {}).items() if k.startswith('eval/')}
    row |= {k: v for k, v in (harness_runs[-1] if harness_runs else {}).items() if k.startswith('harness/')}
    row['train/loss'] = trains[-1]['train/loss'] if trains else math.nan
    row['seconds'] = _seconds(records)
    speeds = [r['train/tokens_per_second'] for r in trains if 'train/tokens_per_second' in r]
    row['train/tokens_per_second'] = float(np.median(speeds)) if speeds else math.nan
    rows.append(row)
  runs = pd.DataFrame(rows)
  runs.attrs['swept'] = swept_keys(workdir, runs)
  return runs


def _seconds(records: list[dict]) -> float:
  """A run's time: compiling, the logged steps (each record's step time x the steps since the last)
  and evaluating (harness tasks too); start-up, checkpoint writes and any time lost to restarts are not counted."""
  total, last = 0.0, 0
  for r in records:
    total += r.get('train/compile_seconds', 0.0) + r.get('eval/seconds', 0.0) + r.get('harness/seconds', 0.0)
    if 'train/step_seconds' in r:
      total += r['train/step_seconds'] * (r['step'] - last)
      last = r['step']
    elif 'train/compile_seconds' in r:
      last = r['step']  # A resumed run starts counting steps here.
  return total


def load_curves(workdir: str | pathlib.Path) -> pd.DataFrame:
  """One row per (run, step) with a record: 'run', 'step', 'tokens', the swept keys, and every
  metric logged at that step (NaN where a metric was not logged)."""
  runs = load_runs(workdir)
  frames = []
  for _, run in runs.iterrows():
    records = read_metrics(run['path']) if (pathlib.Path(run['path']) / 'metrics.jsonl').exists() else []
    if not records:
      continue
    frame = pd.DataFrame(records).groupby('step', as_index=False).first()
    frame.insert(0, 'run', run['run'])
    frame['tokens'] = frame['step'] * (run['tokens'] / run['step'] if run['step'] else 0)
    for key in runs.attrs['swept']:
      frame[key] = [run[key]] * len(frame)
    frames.append(frame)
  curves = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=['run', 'step'])
  curves.attrs['swept'] = runs.attrs['swept']
  return curves


def table(runs: pd.DataFrame, metrics: Sequence[str] = ('eval/bits_per_byte', 'eval/loss'),
          by: Sequence[str] | None = None) -> pd.DataFrame:
  """The final metrics of each run, indexed by the swept keys (or `by`), best first, with each
  run's difference from the best in the first metric and its parameter count."""
  by = list(by or runs.attrs.get('swept') or ['run'])
  out = runs.set_index(by)[[*metrics, 'model/params', 'status']].sort_values(metrics[0])
  out.insert(1, f'{metrics[0]} - best', out[metrics[0]] - out[metrics[0]].min())
  return out


def plot_curves(curves: pd.DataFrame, metric: str = 'eval/loss', x: str = 'step', ax=None,
                logx: bool = False, logy: bool = False, label: str | None = None):
  """One line per run of metric against x ('step' or 'tokens'), labelled by its run name (or by
  the column `label`); returns the matplotlib Axes."""
  _require(plt, 'matplotlib', 'plot_curves')
  if ax is None:
    _, ax = plt.subplots(figsize=(6, 4))
  for name, run in curves.dropna(subset=[metric]).groupby('run', sort=False):
    ax.plot(run[x], run[metric], marker='.' if metric.startswith('eval/') else None,
            label=str(run[label].iloc[0]) if label else name)
  ax.set(xlabel=x, ylabel=metric, xscale='log' if logx else 'linear', yscale='log' if logy else 'linear')
  ax.grid(alpha=0.3)
  ax.legend(fontsize='small')
  return ax


def plot_final(runs: pd.DataFrame, x: str, metric: str = 'eval/bits_per_byte', ax=None, logx: bool = False,
               by: str | None = None):
  """metric of each run's last eval against the config key or column x, one line per value of the
  column `by` if given (labelled with it); returns the Axes."""
  _require(plt, 'matplotlib', 'plot_final')
  if ax is None:
    _, ax = plt.subplots(figsize=(6, 4))
  for value, group in runs.groupby(by, sort=False) if by else [(None, runs)]:
    ordered = group.sort_values(x)
    ax.plot(ordered[x].astype(float) if logx else ordered[x].astype(str), ordered[metric], marker='o',
            label=None if by is None else f'{by.split(".")[-1]}={value}')
  ax.set(xlabel=x, ylabel=metric, xscale='log' if logx else 'linear')
  if logx:  # Label the decades only: minor labels of a short log axis overlap.
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
  ax.grid(alpha=0.3)
  if by:
    ax.legend(fontsize='small')
  return ax


def plot_by_position(results: dict[str, dict], metric: str = 'bits_per_byte', ax=None):
  """metric by tokens of context, from lm.evaluate's by_position results ({label: evaluate(...,
  by_position=True)}): one line per label, each bucket at its last context length (log2 axis);
  returns the Axes. A line that keeps falling to the right is a model that uses its context."""
  _require(plt, 'matplotlib', 'plot_by_position')
  if ax is None:
    _, ax = plt.subplots(figsize=(6, 4))
  for label, result in results.items():
    buckets = result['by_position']
    ax.plot([b['context'][1] for b in buckets], [b[metric] for b in buckets], marker='o', label=label)
  ax.set(xlabel='tokens of context', ylabel=metric, xscale='log', title=f'{metric} by context length')
  ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
  ax.grid(alpha=0.3)
  ax.legend(fontsize='small')
  return ax


# ---------------------------------------------------------------------------------------------
# An ablation notebook: its sweep launched, and what it shows of the results.

def launch_ablation(experiment: str | pathlib.Path, workdir: str | pathlib.Path, overrides: dict | None = None,
                    smoke: bool = False) -> list[dict]:
  """Trains every point of the sweep in experiment that is not done yet into workdir, one after
  another in this process (lm.sweeps.launch.launch, launcher='inline'), each with overrides; returns
  launch's records. smoke=True runs the sweep at its 'smoke' preset (experiment:smoke, as the
  ablations in experiments/ablations/ define it): a few steps of a tiny model, to prove that a
  notebook runs, not the science."""
  spec = f'{experiment}:smoke' if smoke else str(experiment)
  return sweep_launch.launch(spec, workdir, dict(overrides or {}), launcher='inline')


def plot_losses(curves: pd.DataFrame):
  """Side by side, each run's validation bits per byte and training loss against step; returns the Figure."""
  _require(plt, 'matplotlib', 'plot_losses')
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
  plot_curves(curves, 'eval/bits_per_byte', ax=left)
  plot_curves(curves, 'train/loss', ax=right)
  left.set_title('validation bits per byte')
  right.set_title('training loss (nats per byte)')
  return fig


def ranking(runs: pd.DataFrame) -> str:
  """Two lines: the run with the best final validation bits per byte and each other run's gap to it,
  best first; and the runs' total time."""
  ranked = runs.sort_values('eval/bits_per_byte')
  best = ranked.iloc[0]['eval/bits_per_byte']
  others = ', '.join(f'{r["run"]} +{r["eval/bits_per_byte"] - best:.4f}' for _, r in ranked.iloc[1:].iterrows())
  return (f'best: {ranked.iloc[0]["run"]} at {best:.4f} bits/byte; the others: {others}\n'
          f'{len(runs)} runs, {runs["seconds"].sum() / 60:.1f} minutes of compiling, training and evaluating')


def report(workdir: str | pathlib.Path) -> None:
  """What an ablation notebook shows of the runs in workdir, in order: the table of their final
  metrics (rounded to 4 decimals), their loss curves (plot_losses) and their ranking."""
  _require(plt, 'matplotlib', 'report')
  runs = load_runs(workdir)
  (display.display if display is not None else print)(table(runs).round(4))
  plot_losses(load_curves(workdir))
  plt.show()
  print(ranking(runs))


# ---------------------------------------------------------------------------------------------
# Scaling laws: L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, approach 3).

LAW_PARAMS = ('E', 'A', 'alpha', 'B', 'beta')


@dataclasses.dataclass
class ScalingFit:
  """A fitted L(N, D) = E + A / N^alpha + B / D^beta, with bootstrap spreads of each value."""
  E: float
  A: float
  alpha: float
  B: float
  beta: float
  stderr: dict[str, float]  # Standard deviation over bootstrap refits (runs resampled with replacement).
  interval: dict[str, tuple[float, float]]  # 16th and 84th percentiles of the refits: robust to wild ones.
  samples: np.ndarray  # [bootstraps, 5]: the refits, columns in LAW_PARAMS order.
  residual_rms: float  # Of log-loss over the fitted points.

  def predict(self, params, tokens) -> np.ndarray:
    return _law(np.array([self.E, self.A, self.alpha, self.B, self.beta]), np.asarray(params, float),
                np.asarray(tokens, float))

  @property
  def params_exponent(self) -> float:
    """a in N_opt ~ C^a: how compute-optimal model size grows with compute (C ~ 6 N D)."""
    return self.beta / (self.alpha + self.beta)

  def optimal_params(self, compute) -> np.ndarray:
    """The N minimising the fitted loss at C = 6 N D FLOPs (closed form of the fitted law)."""
    g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / (self.alpha + self.beta))
    return g * (np.asarray(compute, float) / 6) ** self.params_exponent


def _law(theta: np.ndarray, n: np.ndarray, d: np.ndarray) -> np.ndarray:
  e, a, alpha, b, beta = theta
  return e + a / n ** alpha + b / d ** beta


def _fit_once(n: np.ndarray, d: np.ndarray, loss: np.ndarray, starts: list[np.ndarray]) -> tuple[np.ndarray, float]:
  """Least squares on log-loss over z = (log E, log A, alpha, log B, beta), from the best of starts."""
  def residuals(z):
    return np.log(_law(_theta(z), n, d)) - np.log(loss)

  best = min((scipy.optimize.least_squares(residuals, z0, bounds=([-10, -20, 0.01, -20, 0.01], [10, 60, 3, 60, 3]))
              for z0 in starts), key=lambda fit: fit.cost)
  return best.x, float(np.sqrt(np.mean(best.fun ** 2)))


def _theta(z: np.ndarray) -> np.ndarray:
  return np.array([np.exp(z[0]), np.exp(z[1]), z[2], np.exp(z[3]), z[4]])


def fit_scaling_law(params: Sequence[float], tokens: Sequence[float], loss: Sequence[float],
                    groups: Sequence[object] | None = None, bootstraps: int = 200, seed: int = 0) -> ScalingFit:
  """Fits L(N, D) to points (params N, tokens D, loss); the spread of each fitted value comes from
  refits on runs resampled with replacement (`groups` names each point's run: points of one run are
  resampled together, as their errors are correlated). Refits whose resample holds fewer than three
  model sizes are skipped: they cannot pin alpha."""
  n, d, loss = (np.asarray(v, float) for v in (params, tokens, loss))
  groups = np.asarray(groups if groups is not None else np.arange(len(n)))
  grid = [np.array([np.log(0.5 * loss.min()), np.log(loss.max() * n.min() ** a), a,
                    np.log(loss.max() * d.min() ** b), b])
          for a in (0.2, 0.5, 1.0) for b in (0.2, 0.5, 1.0)]
  z, rms = _fit_once(n, d, loss, grid)
  rng = np.random.default_rng(seed)
  names = np.unique(groups)
  samples = []
  for _ in range(bootstraps):
    chosen = rng.choice(names, size=len(names))
    idx = np.concatenate([np.flatnonzero(groups == g) for g in chosen])
    if len(np.unique(n[idx])) < 3:
      continue
    samples.append(_theta(_fit_once(n[idx], d[idx], loss[idx], [z])[0]))  # Started from the full fit.
  samples = np.array(samples).reshape(-1, len(LAW_PARAMS))
  enough = len(samples) > 1
  stderr = {k: float(np.std(samples[:, i])) if enough else math.nan for i, k in enumerate(LAW_PARAMS)}
  interval = {k: tuple(float(q) for q in np.percentile(samples[:, i], [16, 84])) if enough else (math.nan, math.nan)
              for i, k in enumerate(LAW_PARAMS)}
  return ScalingFit(*_theta(z), stderr=stderr, interval=interval, samples=samples, residual_rms=rms)
