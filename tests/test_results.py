"""The scaling-law fit recovers a known law, and its compute-optimal allocation is the true minimum;
an ablation's ranking, report and launch."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import matplotlib.pyplot as plt
import numpy as np
import scipy.optimize

from conftest import ROOT
from lm.analysis import results
from lm.config import base_config, flatten, load_module, override
from lm.sweeps import runs as sweep_runs

TRUE = dict(E=1.6, A=60.0, alpha=0.4, B=400.0, beta=0.35)


def _points(noise: float, seed: int = 0):
  rng = np.random.default_rng(seed)
  n = np.repeat([2e4, 5e4, 1e5, 2e5, 5e5, 1e6], 5)
  d = np.tile([1e5, 2e5, 4e5, 8e5, 1.6e6], 6)
  loss = ((TRUE['E'] + TRUE['A'] / n ** TRUE['alpha'] + TRUE['B'] / d ** TRUE['beta'])
          * np.exp(noise * rng.standard_normal(n.size)))
  return n, d, loss, np.repeat(np.arange(6), 5)


def test_fit_recovers_a_known_law_and_its_uncertainty_covers_it():
  n, d, loss, runs = _points(noise=0.0)
  exact = results.fit_scaling_law(n, d, loss, groups=runs, bootstraps=0)
  for name, value in TRUE.items():
    np.testing.assert_allclose(getattr(exact, name), value, rtol=1e-3, err_msg=name)
  assert exact.residual_rms < 1e-6

  n, d, loss, runs = _points(noise=0.01)
  noisy = results.fit_scaling_law(n, d, loss, groups=runs, bootstraps=60)
  assert len(noisy.samples) >= 50
  for name in ('alpha', 'beta', 'E'):
    assert 0 < noisy.stderr[name] < 0.5 * TRUE[name], name
    assert abs(getattr(noisy, name) - TRUE[name]) < 4 * noisy.stderr[name] + 0.02, (name, getattr(noisy, name))
    low, high = noisy.interval[name]
    assert low < high and low - 3 * noisy.stderr[name] < TRUE[name] < high + 3 * noisy.stderr[name], name
  np.testing.assert_allclose(noisy.predict(n, d), loss, rtol=0.05)


def test_optimal_params_minimise_the_fitted_loss_at_fixed_compute():
  n, d, loss, runs = _points(noise=0.0)
  fit = results.fit_scaling_law(n, d, loss, groups=runs, bootstraps=0)
  assert np.isclose(fit.params_exponent, TRUE['beta'] / (TRUE['alpha'] + TRUE['beta']), rtol=1e-3)
  for compute in (1e12, 1e15, 1e18):
    numeric = scipy.optimize.minimize_scalar(lambda log_n: fit.predict(np.exp(log_n), compute / (6 * np.exp(log_n))),
                                             bounds=(0, 60), method='bounded').x
    np.testing.assert_allclose(np.log(fit.optimal_params(compute)), numeric, atol=1e-3)


def _fake_sweep(root: pathlib.Path) -> pathlib.Path:
  """A sweep's workdir of three 4-step runs that swept model.mlp, their metrics written by hand:
  bits per byte 3.5 (gelu), 3.25 (swiglu) and 3.375 (relu); each took 14 s: 10 s compiling (by step
  2), the 2 steps after it at 1 s each, and two evals of 1 s."""
  workdir = root / 'mlp'
  names = []
  for mlp, bits in (('gelu', 3.5), ('swiglu', 3.25), ('relu', 3.375)):
    run_dir = workdir / f'mlp={mlp}'
    run_dir.mkdir(parents=True)
    config = flatten(override(base_config(), {'model.mlp': mlp, 'train.steps': 4, 'data.seq_len': 32,
                                              'data.batch_size': 4}))
    (run_dir / 'config.json').write_text(json.dumps(config))
    records = [{'step': 0, 'model/params': 1000, 'model/embedding_params': 100, 'model/flops_per_token': 6000},
               {'step': 2, 'train/loss': 3.0, 'train/compile_seconds': 10.0, 'train/tokens_per_second': 256.0},
               {'step': 2, 'eval/loss': bits + 0.5, 'eval/bits_per_byte': bits + 0.75, 'eval/seconds': 1.0},
               {'step': 4, 'train/loss': 2.5, 'train/step_seconds': 1.0, 'train/tokens_per_second': 256.0},
               {'step': 4, 'eval/loss': bits * math.log(2), 'eval/bits_per_byte': bits, 'eval/seconds': 1.0}]
    (run_dir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    names.append(run_dir.name)
  (workdir / sweep_runs.MANIFEST).write_text(json.dumps({'points': [{'name': n, 'overrides': {'model.mlp': n[4:]}}
                                                               for n in names]}))
  return workdir


def test_ranking_names_the_best_run_each_gap_to_it_and_the_time(tmp_path):
  runs = results.load_runs(_fake_sweep(tmp_path))
  assert list(runs['seconds']) == [14.0, 14.0, 14.0]
  assert results.ranking(runs) == ('best: mlp=swiglu at 3.2500 bits/byte; the others: mlp=relu +0.1250, '
                                   'mlp=gelu +0.2500\n'
                                   '3 runs, 0.7 minutes of compiling, training and evaluating')


def test_report_shows_the_table_then_the_curves_then_the_ranking(tmp_path, monkeypatch, capsys):
  workdir = _fake_sweep(tmp_path)
  shown = []
  monkeypatch.setattr(results.display, 'display', lambda table: shown.append(table))
  monkeypatch.setattr(results.plt, 'show', lambda: shown.append(plt.gcf()))
  results.report(workdir)
  table, figure = shown
  assert list(table.index) == ['swiglu', 'relu', 'gelu'] and table.index.name == 'model.mlp'
  np.testing.assert_allclose(table['eval/bits_per_byte - best'], [0.0, 0.125, 0.25])
  np.testing.assert_allclose(table['eval/loss'], np.round(np.array([3.25, 3.375, 3.5]) * math.log(2), 4))
  left, right = figure.axes
  assert (left.get_title(), right.get_title()) == ('validation bits per byte', 'training loss (nats per byte)')
  np.testing.assert_allclose(left.lines[1].get_ydata(), [4.0, 3.25])  # swiglu's two evals.
  np.testing.assert_allclose(right.lines[0].get_ydata(), [3.0, 2.5])
  assert capsys.readouterr().out == results.ranking(results.load_runs(workdir)) + '\n'
  plt.close(figure)


def test_launch_ablation_runs_the_smoke_preset_inline(monkeypatch, tmp_path):
  experiment = ROOT / 'experiments' / 'ablations' / 'mlp.py'
  calls = []
  monkeypatch.setattr(results.sweep_launch, 'launch',
                      lambda *args, **kwargs: calls.append((args, kwargs)) or ['records'])
  assert results.launch_ablation(experiment, tmp_path, {'data.tfds_data_dir': '/tfds'}) == ['records']
  assert results.launch_ablation(experiment, tmp_path, {'data.tfds_data_dir': '/tfds'}, smoke=True) == ['records']
  assert calls == [((str(experiment), tmp_path, {'data.tfds_data_dir': '/tfds'}), {'launcher': 'inline'}),
                   ((f'{experiment}:smoke', tmp_path, {'data.tfds_data_dir': '/tfds'}), {'launcher': 'inline'})]
  smoke = load_module(experiment).get_config('swiglu,smoke')
  assert (smoke.train.steps, smoke.model.num_layers, smoke.model.mlp) == (4, 1, 'swiglu')


def test_plot_final_draws_one_line_per_group_in_x_order(tmp_path):
  runs = results.load_runs(_fake_sweep(tmp_path))
  runs['optimizer.learning_rate'] = [3e-3, 1e-3, 2e-3]
  runs['group'] = ['a', 'b', 'b']
  one = results.plot_final(runs, 'optimizer.learning_rate', logx=True)
  np.testing.assert_allclose(one.lines[0].get_xdata(), [1e-3, 2e-3, 3e-3])
  np.testing.assert_allclose(one.lines[0].get_ydata(), [3.25, 3.375, 3.5])
  grouped = results.plot_final(runs, 'optimizer.learning_rate', logx=True, by='group')
  assert [line.get_label() for line in grouped.lines] == ['group=a', 'group=b']
  np.testing.assert_allclose(grouped.lines[1].get_ydata(), [3.25, 3.375])
  plt.close('all')


def test_it_imports_without_the_notebooks_extra_and_says_what_to_install(tmp_path, monkeypatch, capsys):
  script = ("import sys\n"
            "for name in ('IPython', 'pandas', 'matplotlib', 'matplotlib.pyplot'):\n"
            "  sys.modules[name] = None  # As if not installed.\n"
            "from lm.analysis import results\n"
            "fit = results.fit_scaling_law([1e4, 2e4, 4e4, 8e4], [1e5] * 4, [3.0, 2.8, 2.7, 2.65], bootstraps=0)\n"
            "print(round(fit.E, 3))\n"
            "for call in (lambda: results.load_runs('.'), lambda: results.plot_by_position({})):\n"
            "  try:\n"
            "    call()\n"
            "  except ModuleNotFoundError as e:\n"
            "    print(e)\n")
  done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, cwd=ROOT, timeout=120,
                        env=dict(os.environ, PYTHONPATH=str(ROOT)))
  assert (done.returncode, done.stderr) == (0, '')
  assert done.stdout.splitlines() == [
      '2.596', "lm.analysis.results.load_runs needs pandas: pip install 'lm[notebooks]'",
      "lm.analysis.results.plot_by_position needs matplotlib: pip install 'lm[notebooks]'"]
  # Without IPython, report prints its table instead of displaying it.
  workdir = _fake_sweep(tmp_path)
  monkeypatch.setattr(results, 'display', None)
  monkeypatch.setattr(results.plt, 'show', lambda: None)
  results.report(workdir)
  runs = results.load_runs(workdir)
  assert capsys.readouterr().out == f'{results.table(runs).round(4)}\n{results.ranking(runs)}\n'
  plt.close('all')
