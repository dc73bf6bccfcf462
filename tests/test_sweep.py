"""Sweeps: expansion (products, zips, presets, names), validation before any run, workdir checks,
the Slurm script's command lines, and skip/resume of a partly finished sweep with real tiny runs."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

from absl import flags
import jax
from ml_collections import config_flags
import pytest

from conftest import ROOT, tiny_overrides
from lm import config as config_lib
from lm import sweep
from lm.analysis import results
from lm.config import ConfigError, flatten
from lm.sweeps import grid as sweep_grid
from lm.sweeps import launch as sweep_launch
from lm.sweeps import runs as sweep_runs
from lm.training import loop

ABLATIONS = ROOT / 'experiments' / 'ablations'
ABLATION_FILES = sorted(p.stem for p in ABLATIONS.glob('*.py') if p.stem != 'base')


def test_axis_product_zip_chain():
  lr = sweep.axis('optimizer.learning_rate', [1e-3, 3e-3])
  width = sweep.axis('model.d_model', [32, 64, 128])
  assert sweep.product(lr, width) == [{'optimizer.learning_rate': a, 'model.d_model': b}
                                      for a in (1e-3, 3e-3) for b in (32, 64, 128)]
  heads = sweep.axis('model.num_heads', [1, 2, 4])
  assert sweep.zip(width, heads) == [{'model.d_model': 32, 'model.num_heads': 1},
                                     {'model.d_model': 64, 'model.num_heads': 2},
                                     {'model.d_model': 128, 'model.num_heads': 4}]
  nested = sweep.product(sweep.zip(width, heads), lr)
  assert len(nested) == 6 and nested[1] == {'model.d_model': 32, 'model.num_heads': 1, 'optimizer.learning_rate': 3e-3}
  assert sweep.chain(lr, width) == lr + width
  with pytest.raises(ConfigError, match="key 'model.d_model' is swept twice"):
    sweep.product(width, sweep.axis('model.d_model', [256]))
  with pytest.raises(ConfigError, match='swept twice'):
    sweep.zip(width, width)
  with pytest.raises(ConfigError, match='different lengths'):
    sweep.zip(width, lr)
  with pytest.raises(ConfigError, match='non-empty list'):
    sweep.axis('model.d_model', 64)


def test_point_names():
  keys = ['model.positions', 'optimizer.learning_rate']
  assert sweep_grid.point_name({'model.positions': 'rope', 'optimizer.learning_rate': 3e-3}, keys) == \
      'positions=rope,learning_rate=0.003'
  assert sweep_grid.point_name({'optimizer.learning_rate': 1e-5}, keys) == 'learning_rate=1e-05'
  assert sweep_grid.point_name({}, keys) == 'base'
  # Two swept keys with the same last part are named in full.
  both = ['data.batch_size', 'eval.batch_size']
  assert (sweep_grid.point_name({'data.batch_size': 8, 'eval.batch_size': 16}, both)
          == 'data.batch_size=8,eval.batch_size=16')
  point = {'mesh.shape': (1, 2, 4), 'eval.sample_prompt': 'To be / not'}
  assert sweep_grid.point_name(point, ['mesh.shape', 'eval.sample_prompt']) == 'shape=1-2-4,sample_prompt=To-be-not'


def _parsed(command: list[str]):
  """The config lm.main would build from command's --config flags (parsed by config_flags)."""
  argv = ['lm.main'] + [a for a in command if a.startswith('--config')]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'config', flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


@pytest.mark.parametrize('name', ABLATION_FILES)
def test_ablation_sweeps_expand_and_command_lines_rebuild_each_config(name, tmp_path):
  spec = str(ABLATIONS / f'{name}.py')
  runs = sweep_runs.expand(spec, tmp_path / name)
  assert len(runs) >= 2 and len({r.name for r in runs}) == len(runs)
  for run in runs:
    assert run.workdir == tmp_path / name / run.name
    assert run.command[:5] == [sys.executable, '-m', 'lm.main', f'--config={spec}', f'--workdir={run.workdir}']
    assert flatten(_parsed(run.command)) == flatten(run.config)  # The command line gives this very config.
    for key, value in run.overrides.items():
      assert flatten(run.config)[key] == value
  for run in sweep_runs.expand(spec + ':gpu', tmp_path / 'gpu'):  # The GPU preset validates too.
    assert run.config.model.d_model >= 384 and run.config.data.name == 'lm1b'
  assert not (tmp_path / name).exists()  # Expanding writes nothing.


def test_presets_name_points_and_scales():
  positions = config_lib.load_experiment(f'{ABLATIONS}/positions.py:rope')
  assert positions.model.positions == 'rope' and positions.model.d_model == 64
  norm = config_lib.load_experiment(f'{ABLATIONS}/norm.py:post,rmsnorm,gpu')
  assert (norm.model.norm, norm.model.norm_position, norm.model.d_model) == ('rmsnorm', 'post', 768)
  scaling = config_lib.load_experiment(f'{ABLATIONS}/scaling.py:d_model=96,3,num_layers=2')
  assert (scaling.model.d_model, scaling.model.num_heads, scaling.model.num_layers) == (96, 3, 2)
  base = config_lib.load_experiment(f'{ABLATIONS}/attention.py')
  assert base.model.num_kv_heads == 0 and base.model.num_heads == 4
  with pytest.raises(ConfigError,
                     match=r"preset 'alibi': expected \[POINT,\]\[SCALE\] .* one of learned \| rope \| none"):
    config_lib.load_experiment(f'{ABLATIONS}/positions.py:alibi')
  with pytest.raises(ConfigError, match='two scales'):
    config_lib.load_experiment(f'{ABLATIONS}/mlp.py:cpu,gpu')


def _write_experiment(path: pathlib.Path, points: str) -> str:
  path.write_text(f'''
from lm import sweep
from lm.config import base_config

def get_config():
  return base_config()

def get_sweep():
  return {points}
''')
  return str(path)


def test_bad_sweeps_are_refused_before_anything_runs(tmp_path):
  workdir = tmp_path / 'sweep'
  cases = {
      "sweep.axis('model.widht', [1, 2])":
          "sweep point 'widht=1': unknown config key 'model.widht'; nearest valid keys: model.width",
      "sweep.axis('model.d_model', [64, 96.5])": "sweep point 'd_model=96.5': model.d_model=96.5: must be an integer",
      "sweep.axis('model.positions', ['rope', 'alibi'])":
          "sweep point 'positions=alibi': model.positions='alibi': must be one of",
      "sweep.axis('model.num_heads', [4, 3])":
          "sweep point 'num_heads=3': model.d_model=256 must be divisible by model.num_heads=3",
      "sweep.chain(sweep.axis('model.d_model', [64]), sweep.axis('model.d_model', [64]))":
          "point 'd_model=64' appears twice",
      "sweep.chain(sweep.axis('model.d_model', [256]), [{}])": "points 'd_model=256' and 'base' give the same config",
      "sweep.product(sweep.axis('seed', [1]), sweep.axis('seed', [2]))": "key 'seed' is swept twice",
      "[]": 'get_sweep() must return a non-empty list',
  }
  for i, (points, message) in enumerate(cases.items()):
    spec = _write_experiment(tmp_path / f'e{i}.py', points)
    with pytest.raises(ConfigError) as info:
      sweep_launch.launch(spec, workdir)
    assert message.split('nearest')[0] in str(info.value), (points, str(info.value))
  spec = _write_experiment(tmp_path / 'ok.py', "sweep.axis('model.d_model', [64, 128])")
  with pytest.raises(ConfigError, match=r'--config.model.d_model sets a key the sweep varies'):
    sweep_launch.launch(spec, workdir, {'model.d_model': 32})
  with pytest.raises(ConfigError, match=r"model.num_layers='4': must be an integer"):
    sweep_launch.launch(spec, workdir, {'model.num_layers': '4'})
  with pytest.raises(ConfigError, match='defines no get_sweep'):
    sweep_launch.launch(str(ROOT / 'experiments' / 'quickstart.py'), workdir)
  assert not workdir.exists()


def test_workdirs_of_other_experiments_are_refused_and_kept(tmp_path):
  spec = _write_experiment(tmp_path / 'a.py', "sweep.axis('model.d_model', [64, 128])")
  other = _write_experiment(tmp_path / 'b.py', "sweep.axis('model.d_model', [64, 128])")
  workdir = tmp_path / 'sweep'
  sweep_launch.launch(spec, workdir, {'train.steps': 200}, launcher='slurm')
  manifest = (workdir / 'sweep.json').read_text()
  script = (workdir / 'sweep.sbatch').read_text()
  with pytest.raises(ConfigError, match=r"holds a sweep of another experiment \('.*a.py', not '.*b.py'\)"):
    sweep_launch.launch(other, workdir)
  with pytest.raises(ConfigError,
                     match=r'holds a sweep run with --config.train.steps=200, not --config.train.steps=300'):
    sweep_launch.launch(spec, workdir, {'train.steps': 300})
  assert (workdir / 'sweep.json').read_text() == manifest and (workdir / 'sweep.sbatch').read_text() == script
  run = tmp_path / 'run'
  run.mkdir()
  (run / 'config.json').write_text('{}')
  with pytest.raises(ConfigError, match='holds a training run, not a sweep'):
    sweep_launch.launch(spec, run)
  (tmp_path / 'stuff').mkdir()
  (tmp_path / 'stuff' / 'notes.txt').write_text('mine')
  with pytest.raises(ConfigError, match='is not empty and holds no sweep.json'):
    sweep_launch.launch(spec, tmp_path / 'stuff')
  assert (tmp_path / 'stuff' / 'notes.txt').read_text() == 'mine'


def test_slurm_script_runs_each_points_command_line(tmp_path):
  spec = str(ABLATIONS / 'learning_rate.py')
  workdir = tmp_path / 'lr sweep'  # A space: the script must quote.
  sweep_launch.launch(spec, workdir, {'train.steps': 400, 'eval.sample_prompt': "O'er the hill"}, launcher='slurm',
               parallel=2, sbatch=['--partition=gpu', '--gres=gpu:1'])
  script = (workdir / 'sweep.sbatch').read_text()
  header = [line for line in script.splitlines() if line.startswith('#SBATCH')]
  assert header == ["#SBATCH --job-name='lm-lr sweep'", '#SBATCH --array=0-6%2',
                    f"#SBATCH --output='{workdir.resolve()}/slurm-%A_%a.out'",
                    '#SBATCH --partition=gpu', '#SBATCH --gres=gpu:1']
  expected = [[sys.executable, '-m', 'lm.main', f'--config={spec}', f'--workdir={workdir}/learning_rate={name}',
               '--config.train.steps=400', "--config.eval.sample_prompt=O'er the hill",
               f'--config.optimizer.learning_rate={value!r}']
              for name, value in [('0.00075', 7.5e-4), ('0.0015', 1.5e-3), ('0.003', 3e-3), ('0.006', 6e-3),
                                  ('0.012', 1.2e-2), ('0.024', 2.4e-2), ('0.048', 4.8e-2)]]
  # What bash runs for each array task: the script with `eval` swapped for printing its argument.
  for task, command in enumerate(expected):
    shown = subprocess.run(['bash', '-c', script.replace('eval "$', 'printf "%s" "$').replace('\ncd ', '\n: ')],
                           env=dict(os.environ, SLURM_ARRAY_TASK_ID=str(task)), capture_output=True, text=True,
                           check=True).stdout
    assert shlex.split(shown) == command
  manifest = json.loads((workdir / 'sweep.json').read_text())
  assert [p['command'] for p in manifest['points']] == expected


@pytest.mark.slow
def test_cli_dry_run_and_one_line_errors(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  run = lambda *args: subprocess.run([sys.executable, '-m', 'lm.sweep', *args], capture_output=True, text=True,
                                     env=env, cwd=ROOT, timeout=120)
  out = run('--config=experiments/ablations/norm.py', f'--workdir={tmp_path}/norm', '--dry_run',
            '--config.train.steps=60')
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert [l.split()[0] for l in lines if not l.startswith(' ')] == [
      'norm=layernorm,norm_position=pre', 'norm=layernorm,norm_position=post', 'norm=rmsnorm,norm_position=pre',
      'norm=rmsnorm,norm_position=post']
  assert f'--workdir={tmp_path}/norm/norm=rmsnorm,norm_position=post --config.train.steps=60 ' \
         '--config.model.norm=rmsnorm --config.model.norm_position=post' in out.stdout
  assert not (tmp_path / 'norm').exists()
  for args, message in [
      (['--config=experiments/ablations/norm.py', f'--workdir={tmp_path}/x', '--config.model.normm=rmsnorm'],
       "error: --config.model.normm: unknown config key 'model.normm'"),
      (['--config=experiments/ablations/norm.py', f'--workdir={tmp_path}/x', '--config.model.norm=rmsnorm'],
       'error: --config.model.norm sets a key the sweep varies'),
      (['--config=experiments/ablations/norm.py', f'--workdir={tmp_path}/x', '--config.train.steps=ten'],
       'error: '),
      (['--config=experiments/ablations/positions.py:alibi', f'--workdir={tmp_path}/x'], "error: "),
  ]:
    out = run(*args)
    assert out.returncode != 0 and out.stderr.strip().splitlines()[-1].startswith(message), out.stderr
    assert 'Traceback' not in out.stderr
  assert not (tmp_path / 'x').exists()


@pytest.mark.slow
def test_partly_finished_sweep_skips_done_points_and_resumes_the_rest(tfds_dir, play_files, tmp_path):
  spec = str(ABLATIONS / 'mlp.py')
  workdir = tmp_path / 'mlp'
  overrides = tiny_overrides(tfds_dir, play_files, **{'data.tokenizer': 'byte', 'model.mlp_dim': 0,
                                                       'eval.num_samples': 0, 'eval.final_num_batches': 2})
  del overrides['model.mlp']  # The sweep's own axis.
  gelu, swiglu = sweep_runs.expand(spec, workdir, overrides)
  # A sweep killed half way through its first point: the manifest written, the point checkpointed at step 4 of 8.
  sweep_runs.write_manifest(workdir, sweep_runs.manifest(spec, overrides, [gelu, swiglu]))
  loop.Trainer(gelu.config, gelu.workdir, devices=jax.devices()[:1]).run(stop_after=4)
  assert sweep_runs.status(gelu) == 'partial' and sweep_runs.status(swiglu) == 'new'

  env = dict(os.environ, PYTHONPATH=str(ROOT))
  first = subprocess.run([sys.executable, '-m', 'lm.sweep', f'--config={spec}', f'--workdir={workdir}', '--parallel=2',
                          *[f'--config.{k}={sweep_grid.flag_value(v)}' for k, v in overrides.items()]],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert first.returncode == 0, first.stdout + first.stderr
  assert re.search(r'^mlp=gelu +resumes from step 4$', first.stdout, re.M)
  assert re.search(r'^mlp=swiglu +to run$', first.stdout, re.M)
  assert f'resumed from step 4 in {gelu.workdir}' in (gelu.workdir / 'train.log').read_text()
  assert 'resumed' not in (swiglu.workdir / 'train.log').read_text()
  assert sweep_runs.status(gelu) == sweep_runs.status(swiglu) == 'done'

  runs = results.load_runs(workdir)
  assert list(runs['run']) == ['mlp=gelu', 'mlp=swiglu'] and runs.attrs['swept'] == ['model.mlp']
  assert list(runs['model.mlp']) == ['gelu', 'swiglu'] and set(runs['status']) == {'done'}
  for _, row in runs.iterrows():
    final = sweep_runs.final_metrics(pathlib.Path(row['path']))
    assert final['step'] == row['step'] == 8 and row['eval/loss'] == final['eval/loss']
    assert row['tokens'] == 8 * 4 * 32 and row['model/params'] > row['model/embedding_params'] > 0
  curves = results.load_curves(workdir)
  gelu_evals = curves[(curves['run'] == 'mlp=gelu') & curves['eval/loss'].notna()]
  assert list(gelu_evals['step']) == [4, 8] and list(gelu_evals['model.mlp']) == ['gelu', 'gelu']
  assert curves[curves['run'] == 'mlp=gelu']['train/loss'].notna().sum() == 4  # Steps 2, 4, 6, 8.

  # Everything done: a second launch starts nothing and changes nothing.
  logs = {r.name: (r.workdir / 'train.log').read_text() for r in (gelu, swiglu)}
  again = sweep_launch.launch(spec, workdir, overrides, parallel=2, say=lambda _: None)
  assert [r['status'] for r in again] == ['done', 'done'] and not any('returncode' in r for r in again)
  assert {r.name: (r.workdir / 'train.log').read_text() for r in (gelu, swiglu)} == logs


def test_points_that_start_from_earlier_points_wait_for_them(tmp_path, monkeypatch):
  spec = str(ABLATIONS / 'wsd.py')
  runs = sweep_runs.expand(spec, tmp_path / 'wsd')
  by_name = {r.name: r for r in runs}
  cooldown = by_name['schedule=wsd,steps=250,init_step=200,init_mode=full']
  assert cooldown.after == ('schedule=wsd',) and by_name['schedule=cosine,steps=250'].after == ()
  assert cooldown.config.checkpoint.init_from == str(tmp_path / 'wsd' / 'schedule=wsd')
  assert (cooldown.config.train.steps, cooldown.config.checkpoint.init_step) == (250, 200)
  assert f'--config.checkpoint.init_from={tmp_path}/wsd/schedule=wsd' in cooldown.command
  with pytest.raises(ConfigError, match="starts from point 'schedule=wsd', which is not done: a job array"):
    sweep_launch.launch(spec, tmp_path / 'wsd', launcher='slurm')
  assert not (tmp_path / 'wsd').exists()
  later = _write_experiment(tmp_path / 'later.py', "[{'checkpoint.init_from': '{sweep}/d_model=64', "
                                                   "'train.steps': 300}, {'model.d_model': 64}]")
  with pytest.raises(ConfigError, match=r"sweep point 'steps=300': checkpoint.init_from='\{sweep\}/d_model=64' names "
                                        r"'d_model=64', which is not an earlier point of this sweep \(one of: none\)"):
    sweep_runs.expand(later, tmp_path / 'later')

  # The local launcher, two at a time, with each point's process faked: a cooldown starts only once
  # the stable run has finished, later points going ahead meanwhile; when it fails, its cooldowns
  # fail without starting.
  for stable_fails in (False, True):
    events, done = [], set()

    class Process:
      def __init__(self, run):
        self.run, self.polls, self.returncode = run, 0, None

      def poll(self):
        self.polls += 1
        if self.polls < (9 if self.run.name == 'schedule=wsd' else 3):  # The stable run takes longest.
          return None
        self.returncode = 1 if stable_fails and self.run.name == 'schedule=wsd' else 0
        if not self.returncode:
          done.add(self.run.name)
        events.append(('end', self.run.name))
        return self.returncode

    monkeypatch.setattr(sweep_launch, '_start', lambda run, log: events.append(('start', run.name)) or Process(run))
    monkeypatch.setattr(sweep_launch, 'status', lambda run: 'done' if run.name in done else 'new')
    monkeypatch.setattr(sweep_launch.time, 'sleep', lambda _: None)
    said = []
    records = sweep_launch.launch(spec, tmp_path / f'local{stable_fails}', parallel=2, say=said.append)
    starts = [name for what, name in events if what == 'start']
    stable_end = events.index(('end', 'schedule=wsd'))
    cooldowns = [r.name for r in runs if r.after]
    if stable_fails:
      assert not set(cooldowns) & set(starts) and len(starts) == len(runs) - 3
      assert f'FAILED {cooldowns[0]}: not run, it starts from schedule=wsd, which failed' in said
      assert [r['returncode'] for r in records if r['name'] in cooldowns] == [1, 1, 1]
    else:
      assert sorted(starts) == sorted(r.name for r in runs)
      assert all(events.index(('start', name)) > stable_end for name in cooldowns)
      assert events.index(('start', 'schedule=cosine,steps=125')) < stable_end  # Unblocked points go ahead.
