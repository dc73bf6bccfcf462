"""One writer per folder (lm/training/lock.py): taken, refused, taken over only from a holder provably gone."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from lm.training import lock


def _write_lock(folder, **fields):
  record = {'host': socket.gethostname(), 'pid': os.getpid(), 'command': 'lm.main', 'started': time.time(),
            'heartbeat': time.time(), 'token': 'someone'} | fields
  folder.mkdir(parents=True, exist_ok=True)
  (folder / 'lock').write_text(json.dumps(record))
  return record


def _dead_pid() -> int:
  child = subprocess.Popen([sys.executable, '-c', 'pass'])
  child.wait()
  return child.pid


def test_a_lock_is_held_refused_and_released(tmp_path):
  folder = tmp_path / 'new' / 'run'
  held = lock.acquire(folder, 'lm.tokenize')
  record = json.loads((folder / 'lock').read_text())
  assert (record['pid'], record['host'], record['command']) == (os.getpid(), socket.gethostname(), 'lm.tokenize')
  # The same process asking again (a second command in a notebook) is refused like any other writer.
  with pytest.raises(lock.FolderInUse) as refused:
    lock.acquire(folder, 'lm.main')
  when = time.strftime('%Y-%m-%d %H:%M', time.localtime(record['started']))
  assert str(refused.value) == (
      f'{folder} is in use by pid {os.getpid()} on {socket.gethostname()} since {when} (lm.tokenize); one writer '
      f'at a time: wait for it to finish, or use another folder; if no process uses it, delete {folder / "lock"}')
  held.release()
  assert not folder.exists()  # Made for the lock and left empty: removed with it.
  folder.mkdir(parents=True)
  with lock.acquire(folder):
    (folder / 'kept.txt').write_text('x')
  assert sorted(p.name for p in folder.iterdir()) == ['kept.txt']


@pytest.mark.parametrize('holder, reason', [
    (lambda: {'pid': _dead_pid()}, 'pid {pid} on {host} is gone'),
    (lambda: {'pid_start': '1'}, 'pid {pid} on {host} is gone'),  # Its pid now names another process.
    (lambda: {'host': 'host-b', 'heartbeat': time.time() - 660},
     'the heartbeat of pid {pid} on host-b is 11 minutes old'),
])
def test_a_lock_whose_holder_is_gone_is_taken_over(tmp_path, capsys, holder, reason):
  record = _write_lock(tmp_path, **holder())
  with lock.acquire(tmp_path) as held:
    assert json.loads((tmp_path / 'lock').read_text())['token'] == held.record['token'] != 'someone'
  assert capsys.readouterr().out == (f'warning: {tmp_path}: took over the lock of an earlier writer ('
                                     + reason.format(**record) + ')\n')
  assert not (tmp_path / 'lock').exists() and list(tmp_path.iterdir()) == []


def test_a_lock_that_may_be_alive_is_kept(tmp_path):
  _write_lock(tmp_path, host='host-b', heartbeat=time.time() - 500)  # Within STALE_SECONDS.
  with pytest.raises(lock.FolderInUse, match=f'^{tmp_path} is in use by pid {os.getpid()} on host-b since'):
    lock.acquire(tmp_path)
  (tmp_path / 'lock').write_text('')  # A holder cut short between creating and writing it.
  with pytest.raises(lock.FolderInUse, match='holds a lock file being written, or unreadable'):
    lock.acquire(tmp_path)
  old = time.time() - lock.STALE_SECONDS - 5
  os.utime(tmp_path / 'lock', (old, old))
  with lock.acquire(tmp_path):
    pass
  assert not (tmp_path / 'lock').exists()


def test_check_free_lets_readers_and_the_holders_own_process_through(tmp_path):
  lock.check_free(tmp_path / 'nothing')
  record = _write_lock(tmp_path, pid=1, pid_start=None)  # init: alive, and not this process.
  with pytest.raises(lock.FolderInUse, match=f'in use by pid 1 on {record["host"]}'):
    lock.check_free(tmp_path)
  (tmp_path / 'lock').unlink()
  with lock.acquire(tmp_path):
    lock.check_free(tmp_path)  # A Trainer built inside the command that holds the lock.


def test_the_heartbeat_is_refreshed_and_never_overwrites_a_new_holder(tmp_path, monkeypatch):
  monkeypatch.setattr(lock, 'HEARTBEAT_SECONDS', 0.05)
  held = lock.acquire(tmp_path)
  first = held.record['heartbeat']
  time.sleep(0.3)
  assert json.loads((tmp_path / 'lock').read_text())['heartbeat'] > first
  taken = _write_lock(tmp_path, host='host-b')  # Another host decided this one was gone.
  time.sleep(0.3)
  held.release()
  assert json.loads((tmp_path / 'lock').read_text()) == taken


def test_the_processes_of_one_job_share_process_0s_lock(tmp_path):
  with lock.acquire(tmp_path, job='0a1b2c3d'):
    lock.check_job(tmp_path, '0a1b2c3d')
    with pytest.raises(lock.FolderInUse, match='the lock is not held by process 0 of this job but is in use by pid'):
      lock.check_job(tmp_path, 'ffffffff')


@pytest.mark.parametrize('argv', [
    ['lm.tokenize', '--config=experiments/quickstart.py', '--out={folder}'],
    ['lm.hf', 'import', '--hf_dir={folder}', '--workdir={folder}'],
    ['lm.hf', 'export', '--workdir={folder}', '--hf_dir={folder}'],
    ['lm.sweep', '--config=experiments/ablations/positions.py', '--workdir={folder}'],
    ['lm.main', '--config=experiments/quickstart.py', '--workdir={folder}'],
])
def test_every_writing_command_refuses_a_held_folder(tmp_path, argv):
  folder = tmp_path / 'held'
  child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  try:
    _write_lock(folder, pid=child.pid, pid_start=lock._process_start(child.pid), command='lm.main')
    before = (folder / 'lock').read_bytes()
    result = subprocess.run([sys.executable, '-m', *[a.format(folder=folder) for a in argv]], capture_output=True,
                            text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
  finally:
    child.kill()
  output = result.stdout + result.stderr
  errors = [line for line in output.splitlines() if line.startswith('error:')]
  assert result.returncode == 1 and 'Traceback' not in output, output[-3000:]
  assert len(errors) == 1 and errors[0].startswith(f'error: {folder} is in use by pid {child.pid} on '), output
  assert [p.name for p in folder.iterdir()] == ['lock'] and (folder / 'lock').read_bytes() == before
