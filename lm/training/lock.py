"""One writer per folder: the lock file <folder>/lock that every command writing a workdir or an
output folder (lm.main, lm.hf import/export, lm.tokenize, lm.sweep) holds from start to exit.

The file is created with O_CREAT|O_EXCL (atomic on local disks and on NFS v3+; gcsfuse and other
object-store mounts do not make it atomic, and there the heartbeat is what a second writer reads).
It holds JSON: host, pid, command, start time, heartbeat (refreshed every HEARTBEAT_SECONDS by a
thread of the holder), and a random token. A lock whose holder is provably gone is taken over with a
warning: on this host when its pid is dead (or is another process now), from another host when its
heartbeat is older than STALE_SECONDS. Readers (lm.generate, lm.evaluate, lm.harness, lm.analysis.results)
take none. Written without JAX, so a command can refuse before it imports anything heavy.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import secrets
import socket
import sys
import threading
import time

from lm.config import ConfigError

LOCK_FILE = 'lock'
HEARTBEAT_SECONDS = 60.0
STALE_SECONDS = 600.0


_shared: set[pathlib.Path] = set()  # Folders whose lock this process's job holds (check_free lets them be).


class FolderInUse(ConfigError):
  """Another live writer holds the folder's lock."""


def _process_start(pid: int) -> str | None:
  """When `pid` started, in clock ticks since boot (/proc/PID/stat field 22): tells a live holder
  from a new process that reuses its pid. None where /proc has no such process (or no /proc)."""
  try:
    stat = pathlib.Path(f'/proc/{pid}/stat').read_text()
  except OSError:
    return None
  return stat.rsplit(')', 1)[1].split()[19]


def _pid_alive(pid: int, started: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Someone else's live process.
    return True
  now = _process_start(pid)
  return started is None or now is None or now == started


def _when(seconds: float) -> str:
  return datetime.datetime.fromtimestamp(seconds).strftime('%Y-%m-%d %H:%M')


def _read(path: pathlib.Path) -> tuple[bytes, dict | None]:
  """(the file's bytes, its record or None where it is not a lock record)."""
  raw = path.read_bytes()
  try:
    record = json.loads(raw)
  except (UnicodeDecodeError, json.JSONDecodeError):
    return raw, None
  return raw, record if isinstance(record, dict) and {'host', 'pid', 'heartbeat'} <= set(record) else None


def holder_gone(record: dict | None, path: pathlib.Path) -> str | None:
  """Why the lock's holder is provably gone (the warning's reason), or None when it may be alive."""
  if record is None:  # Cut short by a kill between its creation and its first write.
    age = time.time() - path.stat().st_mtime
    return f'an unreadable lock file {age:.0f} s old' if age > STALE_SECONDS else None
  if record['host'] == socket.gethostname():
    if not _pid_alive(int(record['pid']), record.get('pid_start')):
      return f'pid {record["pid"]} on {record["host"]} is gone'
    return None
  age = time.time() - float(record['heartbeat'])
  return f'the heartbeat of pid {record["pid"]} on {record["host"]} is {age / 60:.0f} minutes old' \
      if age > STALE_SECONDS else None


def in_use_message(folder: pathlib.Path, record: dict | None) -> str:
  path = folder / LOCK_FILE
  if record is None:
    who = 'holds a lock file being written, or unreadable,'
  else:
    who = (f'is in use by pid {record["pid"]} on {record["host"]} since {_when(float(record["started"]))} '
           f'({record.get("command", "?")});')
  return (f'{folder} {who} one writer at a time: wait for it to finish, or use another folder; if no process '
          f'uses it, delete {path}')


class Lock:
  """A held lock: refreshed by a heartbeat thread, released by release() (or `with`)."""

  def __init__(self, folder: pathlib.Path, record: dict, made_folder: bool = False):
    self.folder, self.path, self.record = folder, folder / LOCK_FILE, record
    self._made_folder = made_folder  # Removed again on release if nothing else was written into it.
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, name='lm-lock-heartbeat', daemon=True)
    self._thread.start()
    _shared.add(folder.absolute())

  def _ours(self) -> bool:
    try:
      return (_read(self.path)[1] or {}).get('token') == self.record['token']
    except OSError:
      return False

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_SECONDS):
      if not self._ours():  # Taken over (this host was thought gone): never overwrite the new holder's.
        return
      self.record = self.record | {'heartbeat': time.time()}
      tmp = self.path.with_name(f'{LOCK_FILE}.{self.record["token"]}.tmp')
      try:
        tmp.write_text(json.dumps(self.record))
        os.replace(tmp, self.path)
      except OSError:  # A full or vanished disk: the run itself will say so.
        pass

  def release(self) -> None:
    _shared.discard(self.folder.absolute())
    self._stop.set()
    self._thread.join()
    if self._ours():
      self.path.unlink(missing_ok=True)
    if self._made_folder:
      with contextlib.suppress(OSError):  # Not empty: the command wrote something.
        self.folder.rmdir()

  def __enter__(self) -> Lock:
    return self

  def __exit__(self, *exc) -> None:
    self.release()


def _make_folder(folder: pathlib.Path) -> bool:
  """Makes the folder (and its parents); True when it did not exist."""
  if folder.is_dir():
    return False
  if folder.exists():
    raise ConfigError(f'{folder} is a file, not a folder: give a folder path (new or existing)')
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except (FileExistsError, NotADirectoryError):  # A parent is a file.
    raise ConfigError(f'{folder}: a part of the path is a file, not a folder') from None
  return True


def this_command() -> str:
  """What this process runs, as the lock names it: 'lm.main' for python -m lm.main."""
  script = pathlib.Path(sys.argv[0] if sys.argv and sys.argv[0] else 'python')
  return f'lm.{script.stem}' if script.parent.name == 'lm' else script.name


def acquire(folder: str | pathlib.Path, command: str | None = None, job: str | None = None,
            say=lambda line: print(line, flush=True)) -> Lock:
  """Takes <folder>/lock (creating the folder), or raises FolderInUse naming the holder. A lock whose
  holder is provably gone is taken over, with a `warning:` line through `say`. `command` defaults to
  this_command(); `job` names a multi-process job whose other processes check the lock with check_job."""
  folder = pathlib.Path(folder)
  made_folder = _make_folder(folder)
  path = folder / LOCK_FILE
  now = time.time()
  record = {'host': socket.gethostname(), 'pid': os.getpid(), 'pid_start': _process_start(os.getpid()),
            'command': command or this_command(), 'started': now, 'heartbeat': now, 'token': secrets.token_hex(8),
            'job': job}
  for _ in range(3):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      try:
        raw, holder = _read(path)
      except FileNotFoundError:  # Released meanwhile.
        continue
      gone = holder_gone(holder, path)
      if gone is None:
        raise FolderInUse(in_use_message(folder, holder)) from None
      if _take_over(path, raw):
        say(f'warning: {folder}: took over the lock of an earlier writer ({gone})')
      continue
    with os.fdopen(fd, 'w') as f:
      f.write(json.dumps(record))
      f.flush()
      os.fsync(f.fileno())
    return Lock(folder, record, made_folder)
  raise FolderInUse(in_use_message(folder, _read(path)[1] if path.exists() else None))


def _take_over(path: pathlib.Path, judged: bytes) -> bool:
  """Moves a stale lock aside, if it is still the one judged stale (a second process taking it over
  at the same time may have put a fresh one there); True when it was removed."""
  aside = path.with_name(f'{LOCK_FILE}.stale.{os.getpid()}.{time.time_ns()}')
  try:
    os.rename(path, aside)
  except FileNotFoundError:
    return False
  if aside.read_bytes() == judged:
    aside.unlink()
    return True
  with contextlib.suppress(FileExistsError):  # Someone's fresh lock: put it back.
    os.link(aside, path)
  aside.unlink()
  return False


def check_job(folder: str | pathlib.Path, job: str) -> None:
  """For the other processes of a multi-process job: the lock process 0 took names this job."""
  folder = pathlib.Path(folder)
  try:
    _, record = _read(folder / LOCK_FILE)
  except FileNotFoundError:
    record = None
  if not record or record.get('job') != job:
    raise FolderInUse(f'{folder}: the lock is not held by process 0 of this job'
                      + (f' but {in_use_message(folder, record).split(" ", 1)[1]}' if record else
                         ' (is the folder on a disk every process shares?)'))
  _shared.add(folder.absolute())


def check_free(folder: str | pathlib.Path) -> None:
  """Refuses a folder another live process holds the lock of (for writers that take no lock
  themselves, such as a Trainer built in a notebook)."""
  folder = pathlib.Path(folder)
  path = folder / LOCK_FILE
  if folder.absolute() in _shared:
    return
  try:
    _, record = _read(path)
  except (FileNotFoundError, NotADirectoryError):
    return
  if record and record['host'] == socket.gethostname() and int(record['pid']) == os.getpid():
    return
  if holder_gone(record, path) is None:
    raise FolderInUse(in_use_message(folder, record))
