"""The command line end to end, in fresh processes: quickstart, exact resume, one-line refusals."""

import json
import math
import os
import pathlib
import random
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import QUICKSTART, ROOT, TINY, run_main, tiny_overrides
from lm import config as config_lib
from lm.training.metrics import flops_per_token
from lm.training.workdirs import read_metrics
from test_quiet import alarming_lines


def _restore(workdir: pathlib.Path, step: int):
  return ocp.StandardCheckpointer().restore((workdir / 'checkpoints' / str(step) / 'state').absolute())


@pytest.mark.slow
def test_quickstart_runs_end_to_end(tfds_dir, tmp_path):
  workdir = tmp_path / 'qs'
  result = run_main(workdir, {'data.tfds_data_dir': tfds_dir, 'train.steps': 3, 'train.log_every': 1,
                              'optimizer.warmup_steps': 1, 'eval.every': 3, 'eval.sample_tokens': 8,
                              'train.peak_flops_per_device': 1e12, 'eval.final_num_batches': 2})
  assert 'bits per byte' in result.stderr + result.stdout
  records = read_metrics(workdir)
  final = [r for r in records if 'eval/bits_per_byte' in r][-1]
  assert final['step'] == 3 and 2.0 < final['eval/bits_per_byte'] < 6.0
  # The quickstart's own final eval covers the whole validation split (151,711 tokens, ~20 s here).
  assert config_lib.load_experiment(QUICKSTART).eval.final_num_batches == 0
  assert 16_000 < final['eval/tokens'] <= 2 * 32 * 256  # 2 batches of eval.batch_size x seq_len.
  assert [r['step'] for r in records if 'train/loss' in r] == [1, 2, 3]
  assert all(math.isfinite(r['train/tokens_per_second']) for r in records if 'train/loss' in r)
  quickstart = config_lib.load_experiment(QUICKSTART)
  per_token = flops_per_token(quickstart.model, quickstart.data)
  for r in records:
    if 'train/loss' in r:  # MFU: the model's FLOPs per second over the (configured) peak of the one device.
      assert r['train/mfu'] == pytest.approx(per_token * r['train/tokens_per_second'] / 1e12, rel=1e-9)
  assert (workdir / 'tokenizer' / 'sentencepiece.model').exists()
  assert list((workdir / 'tensorboard').glob('events.out.tfevents.*'))
  assert (workdir / 'checkpoints' / '3' / 'state').is_dir()
  samples = (workdir / 'samples' / 'step_0000003.txt').read_text()
  assert samples.startswith('**HAMLET**\n') and len(samples) > len('**HAMLET**\n')
  assert json.loads((workdir / 'config.json').read_text())['model.d_model'] == 160


# With dropout, whose masks must resume exactly too.
DROPOUT = {'model.residual_dropout': 0.1, 'model.attention_dropout': 0.1}


@pytest.fixture(scope='module')
def straight_and_resumed(tfds_dir, play_files, tmp_path_factory, compile_cache):
  root = tmp_path_factory.mktemp('resume')
  overrides = tiny_overrides(tfds_dir, play_files, **DROPOUT)
  # The three processes run the same compiled steps (compiled by the first, see run_main).
  run_main(root / 'straight', overrides, compile_cache=compile_cache)
  # Stopped mid shuffle window, off the log steps.
  first = run_main(root / 'resumed', overrides, '--stop_after=5', compile_cache=compile_cache)
  second = run_main(root / 'resumed', overrides, compile_cache=compile_cache)
  return root / 'straight', root / 'resumed', first, second


@pytest.mark.slow
def test_resume_is_bitwise_identical(straight_and_resumed):
  straight, resumed, first, second = straight_and_resumed
  assert 'resumed from step 5' in second.stdout + second.stderr
  assert sorted(p.name for p in (resumed / 'checkpoints').iterdir() if p.name.isdigit()) == ['4', '5', '8']
  a, b = _restore(straight, 8), _restore(resumed, 8)
  assert int(a['step']) == int(b['step']) == 8
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b) and len(leaves_a) > 20
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert not np.array_equal(_restore(resumed, 5)['params']['block_0']['mlp']['up']['kernel'],
                            b['params']['block_0']['mlp']['up']['kernel'])  # Steps 6-8 did train.


@pytest.mark.slow
def test_a_run_stopped_and_resumed_prints_no_alarm(straight_and_resumed):
  first, second = straight_and_resumed[2:]
  bad = alarming_lines(first.stdout, first.stderr, second.stdout, second.stderr)
  assert not bad, '\n'.join(bad)


@pytest.mark.slow
def test_resumed_run_sees_the_same_data_and_records(straight_and_resumed):
  straight, resumed, _, _ = straight_and_resumed
  a, b = read_metrics(straight), read_metrics(resumed)
  keys = ('train/loss', 'train/grad_norm', 'eval/loss', 'eval/bits_per_byte')
  rows = lambda records: [(r['step'], {k: r[k] for k in keys if k in r}) for r in records
                          if any(k in r for k in keys)]
  # Equal losses at steps 6 and 8, after the resume at 5, mean the same batches in the same order.
  assert [s for s, _ in rows(a) if 'train/loss' in _] == [2, 4, 6, 8]
  assert [s for s, _ in rows(b) if 'train/loss' in _] == [2, 4, 5, 6, 8]  # The stopped run logged its last step.
  assert rows(a) == [row for row in rows(b) if row[0] != 5]
  for step in (4, 8):  # Samples at a periodic and at the final eval, drawn from the same keys.
    name = f'samples/step_{step:07d}.txt'
    assert (straight / name).read_text() == (resumed / name).read_text() != ''


# What a run measures of the machine rather than computes: the rest of its records is deterministic.
TIMINGS = ('train/step_seconds', 'train/tokens_per_second', 'train/mfu', 'train/compile_seconds',
           'train/peak_flops_per_device', 'eval/seconds')


@pytest.mark.slow
def test_the_same_config_twice_gives_bitwise_identical_metrics(straight_and_resumed, tfds_dir, play_files, tmp_path,
                                                               compile_cache):
  straight = straight_and_resumed[0]
  again = tmp_path / 'again'
  run_main(again, tiny_overrides(tfds_dir, play_files, **DROPOUT), compile_cache=compile_cache)
  computed = lambda w: [{k: v for k, v in r.items() if k not in TIMINGS} for r in read_metrics(w)]
  assert computed(again) == computed(straight)
  assert sum('train/loss' in r for r in computed(again)) == 4 and sum('eval/loss' in r for r in computed(again)) == 2
  for x, y in zip(jax.tree.leaves(_restore(straight, 8)), jax.tree.leaves(_restore(again, 8))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert (straight / 'samples' / 'step_0000008.txt').read_text() == (again / 'samples' / 'step_0000008.txt').read_text()


def _steps(workdir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()) if (
      workdir / 'checkpoints').is_dir() else []


def _logged_step(workdir: pathlib.Path) -> int:
  records = read_metrics(workdir) if (workdir / 'metrics.jsonl').exists() else []
  return max([int(r['step']) for r in records if 'train/loss' in r], default=0)


@pytest.mark.slow
def test_sigkill_at_random_points_loses_nothing(straight_and_resumed, tfds_dir, play_files, tmp_path, compile_cache):
  """SIGKILL during start-up, in the middle of an asynchronous checkpoint save, and at random steps of
  training; restarted each time on the same workdir, the run ends bitwise where one never killed does."""
  straight = straight_and_resumed[0]
  # The straight run's computation, logged and checkpointed more often.
  overrides = tiny_overrides(tfds_dir, play_files, **DROPOUT, **{'train.log_every': 1, 'checkpoint.every': 2})
  workdir, log = tmp_path / 'killed', tmp_path / 'killed.log'
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=compile_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1',
             LM_TEST_COMMIT_DELAY_S='2')
  flags = [f'--config={QUICKSTART}', f'--workdir={workdir}'] + [f'--config.{k}={v}' for k, v in overrides.items()]
  rng = random.Random(8)
  kills, misses = [], []

  def start(entry: list[str]) -> subprocess.Popen:
    with open(log, 'a', encoding='utf-8') as f:
      f.write(f'\n===== {" ".join(entry)}\n')
    return subprocess.Popen([sys.executable, *entry] + flags, stdout=open(log, 'a', encoding='utf-8'),
                            stderr=subprocess.STDOUT, env=env, cwd=ROOT)

  def kill_when(proc: subprocess.Popen, ready, what: str, pause: float) -> None:
    deadline = time.monotonic() + 300
    while not ready():
      assert time.monotonic() < deadline, f'timed out waiting for {what}'
      if proc.poll() is not None:
        assert proc.returncode == 0, log.read_text()[-3000:]
        misses.append(what)  # The run finished first.
        return
      time.sleep(0.02)
    time.sleep(pause)
    if proc.poll() is not None:
      assert proc.returncode == 0, log.read_text()[-3000:]
      misses.append(what)
      return
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kills.append(f'{what} (checkpoints then: {_steps(workdir)})')

  began, delay = time.monotonic(), rng.uniform(0.5, 4.0)
  kill_when(start(['-m', 'lm.main']), lambda: time.monotonic() - began > delay, f'{delay:.1f} s after launch', 0)
  saving = lambda: (workdir / 'checkpoints').is_dir() and any(
      p.name.endswith('.orbax-checkpoint-tmp') for p in (workdir / 'checkpoints').iterdir())
  kill_when(start([str(ROOT / 'tests' / 'save_slowly.py')]), saving, 'mid-save', rng.uniform(0, 0.3))
  assert kills[-1].startswith('mid-save') and saving(), 'the save had committed before the kill'
  for _ in range(2):
    proc, resumed_at = start(['-m', 'lm.main']), max(_steps(workdir), default=0)
    target = rng.randint(min(resumed_at + 2, 6), 6)
    # This run's own records (the metrics file is trimmed to the resumed step before it compiles),
    # and progress it has checkpointed.
    compiled = lambda: 'compiled the train step' in log.read_text().rsplit('=====', 1)[-1]
    ready = lambda: compiled() and _logged_step(workdir) >= target and max(_steps(workdir), default=0) > resumed_at
    kill_when(proc, ready, f'after step {target}', rng.uniform(0, 0.05))
  assert len(kills) >= 3, (kills, misses)
  final = run_main(workdir, overrides, compile_cache=compile_cache)
  assert 'resumed from step' in log.read_text() + final.stdout + final.stderr, kills
  # Each kill after start-up left the lock of a dead pid, taken over by the next run with a warning.
  taken_over = (log.read_text() + final.stdout).count(f'warning: {workdir}: took over the lock of an earlier writer')
  assert taken_over >= len(kills) - 1 and not (workdir / 'lock').exists(), kills
  assert _steps(workdir)[-1] == 8 and not (workdir / 'corrupt_checkpoints').exists(), kills
  a, b = _restore(workdir, 8), _restore(straight, 8)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  evals = [[r['eval/loss'] for r in read_metrics(w) if 'eval/loss' in r][-1] for w in (workdir, straight)]
  assert evals[0] == evals[1]
  print('kills:', '; '.join(kills), '| missed:', misses)


@pytest.mark.slow
def test_running_a_finished_workdir_again_does_nothing_and_exits_0(straight_and_resumed, tfds_dir, play_files,
                                                                  tmp_path):
  workdir = tmp_path / 'done'
  shutil.copytree(straight_and_resumed[0], workdir)
  before = {str(p): p.read_bytes() for p in workdir.rglob('*') if p.is_file()}
  again = run_main(workdir, tiny_overrides(tfds_dir, play_files, **DROPOUT), check=False)
  assert again.returncode == 0 and 'Traceback' not in again.stderr, again.stderr[-3000:]
  assert f'{workdir} is already at step 8: nothing to do (train.steps=8)' in again.stdout
  assert {str(p): p.read_bytes() for p in workdir.rglob('*') if p.is_file()} == before


def _env(compile_cache: str | None = None, **extra) -> dict:
  env = dict(os.environ, PYTHONPATH=str(ROOT), **extra)
  if compile_cache:
    env |= {'JAX_COMPILATION_CACHE_DIR': compile_cache, 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
            'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '-1'}
  return env


def _computed(workdir: pathlib.Path) -> list[dict]:
  return [{k: v for k, v in r.items() if k not in TIMINGS} for r in read_metrics(workdir)]


@pytest.mark.slow
def test_a_second_run_on_a_busy_workdir_is_refused_and_the_first_is_untouched(straight_and_resumed, tfds_dir,
                                                                              play_files, tmp_path, compile_cache):
  straight, workdir = straight_and_resumed[0], tmp_path / 'busy'
  overrides = tiny_overrides(tfds_dir, play_files, **DROPOUT)
  first = subprocess.Popen([sys.executable, '-m', 'lm.main', f'--config={QUICKSTART}', f'--workdir={workdir}']
                           + [f'--config.{k}={v}' for k, v in overrides.items()], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, env=_env(compile_cache), cwd=ROOT)
  deadline, held = time.monotonic() + 120, None
  while held is None:
    assert first.poll() is None and time.monotonic() < deadline, first.stdout.read()
    try:
      held = json.loads((workdir / 'lock').read_text())
    except (OSError, ValueError):  # Not there yet, or being written.
      time.sleep(0.05)
  second = run_main(workdir, overrides | {'optimizer.learning_rate': 0.01}, check=False)
  still_running = first.poll() is None
  output, _ = first.communicate(timeout=300)
  assert first.returncode == 0 and still_running, output[-3000:]
  since = time.strftime('%Y-%m-%d %H:%M', time.localtime(held['started']))
  assert _refusal(second) == (f'error: {workdir} is in use by pid {first.pid} on {socket.gethostname()} since {since} '
                              f'(lm.main); one writer at a time: wait for it to finish, or use another folder; if no '
                              f'process uses it, delete {workdir / "lock"}')
  assert not (workdir / 'lock').exists() and 'config_changes.jsonl' not in os.listdir(workdir)
  assert _computed(workdir) == _computed(straight)
  for x, y in zip(jax.tree.leaves(_restore(straight, 8)), jax.tree.leaves(_restore(workdir, 8))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _no_bigger_files(limit: int):
  """In the child: a disk that is full for files over `limit` bytes (writes past it fail with EFBIG)."""
  def apply():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
  return apply


@pytest.mark.slow
def test_a_disk_that_fills_during_a_save_stops_the_run_and_loses_nothing(straight_and_resumed, tfds_dir, play_files,
                                                                         tmp_path, compile_cache):
  straight, workdir = straight_and_resumed[0], tmp_path / 'full'
  overrides = tiny_overrides(tfds_dir, play_files, **DROPOUT)
  run_main(workdir, overrides, '--stop_after=4', compile_cache=compile_cache)
  args = [sys.executable, '-m', 'lm.main', f'--config={QUICKSTART}', f'--workdir={workdir}']
  args += [f'--config.{k}={v}' for k, v in overrides.items()]
  full = subprocess.run(args, capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=600,
                        preexec_fn=_no_bigger_files(64 << 10))  # The checkpoint's array file is ~400 KB.
  assert full.returncode == 1, full.stderr[-3000:]
  line = _refusal(full)
  assert line.startswith(f'error: checkpoint 8 could not be written in {workdir / "checkpoints"} (')
  assert line.endswith('; the checkpoints before it are kept (4): free space and run the same command to resume '
                       'from step 4'), line
  assert 'File too large' in line and 'Traceback' not in full.stdout + full.stderr
  assert _steps(workdir) == [4] and not (workdir / 'lock').exists()
  resumed = run_main(workdir, overrides, compile_cache=compile_cache)  # Space again: resumes from 4.
  assert 'resumed from step 4' in resumed.stdout and _steps(workdir) == [4, 8]
  for x, y in zip(jax.tree.leaves(_restore(straight, 8)), jax.tree.leaves(_restore(workdir, 8))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _refusal(result) -> str:
  assert result.returncode == 1, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  lines = [l for l in result.stderr.strip().splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and result.stderr.strip().endswith(lines[0]), result.stderr[-2000:]
  return lines[0]


@pytest.mark.parametrize('overrides, args, expected', [
    ({'model.d_modle': 3}, (), "unknown config key 'model.d_modle'; nearest valid keys: model.d_model"),
    ({'optimizer.lr': 3}, (), 'nearest valid keys: optimizer.'),
    ({'train.steps': 'many'}, (), "--config.train.steps=many"),
    ({'model.d_model': 97}, (), 'model.d_model=97 must be divisible by model.num_heads=2'),
    ({'data.seq_len': 512}, (), 'data.seq_len=512 exceeds the position table: must be <= model.max_len=256'),
    ({'optimizer.learning_rate': -1.0}, (), 'optimizer.learning_rate=-1.0: must be > 0'),
    ({'data.tokenizer': 'bpe'}, (), "data.tokenizer='bpe': must be one of 'sentencepiece', 'byte'"),
    ({'data.name': 'lm1b_not_a_dataset'}, (), "data.name='lm1b_not_a_dataset' is not a TFDS dataset"),
    ({}, ('--config=experiments/nope.py',), "--config: no such file 'experiments/nope.py'"),
    ({'mesh.shape': (2, 1, 1)}, (), 'mesh.shape=(2, 1, 1) uses 2 devices but there are 1'),
    ({'mesh.logical_axis_rules': (('batch', 'pipe'),)}, (), "names unknown mesh axis 'pipe'"),
])
def test_bad_input_is_refused_in_one_line(tfds_dir, tmp_path, overrides, args, expected):
  result = run_main(tmp_path / 'run', {'data.tfds_data_dir': tfds_dir, **overrides}, *args, check=False)
  assert expected in _refusal(result)


@pytest.mark.parametrize('body, expected', [
    ('def get_config(:\n', 'SyntaxError'),
    ('def get_config():\n  return {"model": 1}\n', 'get_config() must return an ml_collections.ConfigDict'),
])
def test_broken_experiment_file_is_refused_in_one_line(tmp_path, body, expected):
  path = tmp_path / 'broken.py'
  path.write_text(body)
  result = run_main(tmp_path / 'run', {}, f'--config={path}', check=False)
  assert expected in _refusal(result) or 'invalid syntax' in _refusal(result)


@pytest.mark.slow
def test_a_workdir_written_before_the_rehousing_resumes_exactly(tfds_dir, tmp_path):
  """tests/data/workdir_v1/run was stopped at step 4 of 8 by lm at commit 839c73f (a flat lm/, mesh.shape a
  tuple): today's lm resumes it, with mesh.shape named, to the records that commit's lm logged resuming it.
  (No shared compile cache: the executable is compiled here, as it was there.)"""
  fixture = ROOT / 'tests' / 'data' / 'workdir_v1'
  workdir = tmp_path / 'run'
  shutil.copytree(fixture / 'run', workdir)
  overrides = TINY | {'data.tfds_data_dir': tfds_dir, 'checkpoint.max_to_keep': 1, 'mesh.shape': 'data=1'}
  result = run_main(workdir, overrides)
  assert 'resumed from step 4' in result.stdout + result.stderr
  assert 'mesh: data=1 over 1 cpu devices' in result.stdout + result.stderr
  then = [json.loads(line) for line in (fixture / 'resumed_metrics.jsonl').read_text().splitlines()]
  now = read_metrics(workdir)
  keep = lambda r: {k: v for k, v in r.items() if k not in TIMINGS and k != 'time'}
  assert [keep(r) for r in now] == [keep(r) for r in then]
  assert [r['step'] for r in now if 'train/loss' in r] == [2, 4, 6, 8]
  # [-1, 1, 1] there and 'data=1' here resolve to the same mesh: not a change (the data's folder is; and
  # the default logical rules, which gained the expert axis since, are recorded as the free key they are).
  changes = json.loads((workdir / 'config_changes.jsonl').read_text())['changes']
  assert list(changes) == ['data.tfds_data_dir', 'mesh.logical_axis_rules']
  assert json.loads((workdir / 'config.json').read_text())['mesh.shape'] == 'data=1'


@pytest.mark.slow
def test_incompatible_workdir_is_refused_and_kept(straight_and_resumed, tfds_dir, play_files, tmp_path, compile_cache):
  straight = tmp_path / 'copy'
  shutil.copytree(straight_and_resumed[0], straight)
  before = sorted(p.name for p in (straight / 'checkpoints').iterdir())
  overrides = tiny_overrides(tfds_dir, play_files, **{'model.d_model': 64})
  message = _refusal(run_main(straight, overrides, check=False))
  assert ('holds checkpoints of a different model, data or optimizer config: model.d_model is 32 there, 64 here'
          in message)
  assert sorted(p.name for p in (straight / 'checkpoints').iterdir()) == before
  # Changes that are safe on resume are accepted and recorded.
  run_main(straight, tiny_overrides(tfds_dir, play_files, **{'train.steps': 10, 'eval.every': 5}),
           compile_cache=compile_cache)
  changes = [json.loads(l) for l in (straight / 'config_changes.jsonl').read_text().splitlines()]
  assert changes[-1]['step'] == 8 and changes[-1]['changes']['train.steps'] == [8, 10]
  assert read_metrics(straight)[-1]['step'] == 10


@pytest.mark.slow
def test_sigterm_stops_with_a_checkpoint_and_the_run_resumes_exactly(tfds_dir, play_files, tmp_path, compile_cache):
  """A preempted job: SIGTERM mid-run finishes the step, checkpoints it and exits 0; resuming from
  there gives the run that was never stopped, bit for bit."""
  overrides = tiny_overrides(tfds_dir, play_files, **{'train.steps': 100_000, 'train.log_every': 1,
                                                      'checkpoint.every': 100_000, 'eval.every': 100_000})
  workdir = tmp_path / 'preempted'
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=compile_cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0', JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='-1')
  proc = subprocess.Popen([sys.executable, '-m', 'lm.main', f'--config={QUICKSTART}', f'--workdir={workdir}']
                          + [f'--config.{k}={v}' for k, v in overrides.items()],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
  deadline = time.monotonic() + 300
  while not ((workdir / 'metrics.jsonl').exists() and
             any(r.get('train/loss') and r['step'] >= 3 for r in read_metrics(workdir))):
    assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else ''
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  output, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, output[-3000:]
  stopped = int(output.split('SIGTERM: stopped at step ')[1].split()[0])
  assert [p.name for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()] == [str(stopped)]
  resumed = run_main(workdir, overrides, f'--stop_after={stopped + 2}', compile_cache=compile_cache)
  assert f'resumed from step {stopped}' in resumed.stdout + resumed.stderr
  run_main(tmp_path / 'straight', overrides, f'--stop_after={stopped + 2}', compile_cache=compile_cache)
  a, b = _restore(workdir, stopped + 2), _restore(tmp_path / 'straight', stopped + 2)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.slow
def test_checkpoints_also_follow_the_clock(tfds_dir, play_files, tmp_path, compile_cache):
  overrides = tiny_overrides(tfds_dir, play_files, **{'checkpoint.every': 100, 'checkpoint.every_minutes': 1e-5})
  run_main(tmp_path / 'run', overrides, compile_cache=compile_cache)
  # Due after every step (0.6 ms), where checkpoint.every alone would keep only the final step's.
  assert sorted(int(p.name) for p in (tmp_path / 'run' / 'checkpoints').iterdir() if p.name.isdigit()) == [6, 7, 8]
