"""One process trains a run directory at a time: W/lock.json names the holder.

The lock records the holder's host, pid, SLURM job (if any), command line and a
heartbeat time that a daemon thread refreshes every HEARTBEAT_S seconds. A second
launch on the same directory refuses with one line naming the holder (`LockHeld`).
A stale lock is taken over with a warning; lib/runs/lock_rules.py says when a lock is
stale (a dead pid, an old heartbeat, this SLURM job's own earlier incarnation).

A sweep submitted to SLURM places a `queued` lock for each run (no pid; the job
id), so that rerunning the sweep command while the array waits in the queue does
not submit the runs twice; the job takes it over when it starts. A task that SLURM
preempts turns its locks back into `queued` ones before it is requeued.

Taking a lock is atomic (a hard link of a complete file, which fails if the lock
exists); taking over a stale one renames it aside first, so two processes racing
for a stale lock cannot both win. Locks are released when the run ends, however it
ends (and at interpreter exit); a kill -9 leaves a stale lock, taken over next time.
Environment: ABLATE_LOCK_LEASE_S, ABLATE_LOCK_HEARTBEAT_S (tests shorten them).
"""
import atexit
import errno
import json
import os
import shlex
import socket
import subprocess  # noqa: F401  (lock_rules calls squeue; tests patch lock.subprocess.run)
import sys
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Optional

from lib.core import cli
from lib.core.errors import UserError
from lib.runs.lock_rules import (LOCK_FILE, _ENDED, _load, _pid_alive,  # noqa: F401
                                 _slurm_job_active, describe, is_live, is_mine, lease_s,
                                 live_holder, read, slurm_job, slurm_restart)


def heartbeat_s() -> float:
  return float(os.environ.get('ABLATE_LOCK_HEARTBEAT_S', 30))


class LockHeld(UserError):
  """The run directory is being trained by another live process."""


def _record(state: str = 'running', job: Optional[str] = None) -> Dict[str, Any]:
  now = time.time()
  return {'state': state, 'host': socket.gethostname(),
          'pid': os.getpid() if state == 'running' else None,
          'slurm_job': job if job is not None else slurm_job(),
          'slurm_restart': slurm_restart(),
          'command': shlex.join(sys.argv), 'since': now, 'heartbeat': now,
          'nonce': uuid.uuid4().hex}


def _write_tmp(path: str, record: Dict[str, Any]) -> str:
  """`record` in a temporary file beside `path`, named uniquely (threads may race)."""
  tmp = f'{path}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp'
  with open(tmp, 'w') as f:
    json.dump(record, f)
  return tmp


def _link_new(path: str, record: Dict[str, Any]) -> bool:
  """Creates `path` holding `record`, atomically and only if it does not exist."""
  tmp = _write_tmp(path, record)
  try:
    os.link(tmp, path)
    return True
  except FileExistsError:
    return False
  except OSError as e:   # a filesystem without hard links
    if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
      raise
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w') as f:
      json.dump(record, f)
    return True
  finally:
    os.remove(tmp)


def _age(path: str) -> float:
  """Seconds since `path` was last written (0 if it is gone)."""
  try:
    return time.time() - os.path.getmtime(path)
  except OSError:
    return 0.0


def _replace(path: str, record: Dict[str, Any]) -> None:
  os.replace(_write_tmp(path, record), path)


def _set_aside(path: str, seen: Dict[str, Any]) -> bool:
  """Moves the stale lock `seen` out of the way; False if another process got there
  first (the lock now there is not the one we judged stale)."""
  aside = f'{path}.stale.{os.getpid()}.{uuid.uuid4().hex[:8]}'
  try:
    os.rename(path, aside)
  except FileNotFoundError:
    return False
  try:
    with open(aside) as f:
      moved = json.load(f)
  except (OSError, ValueError):
    moved = {}
  if moved.get('nonce') != seen.get('nonce'):   # a fresh lock: put it back
    try:
      os.link(aside, path)   # only if nobody made a new one meanwhile
    except FileExistsError:
      pass
    except OSError:   # a filesystem without hard links
      if not os.path.exists(path):
        os.rename(aside, path)
        return False
    try:
      os.remove(aside)
    except OSError:
      pass
    return False
  os.remove(aside)
  return True


_HELD: List['RunLock'] = []


class RunLock:
  """The lock of one run directory, held by this process while it trains it."""

  def __init__(self, directory: str, log: Callable[[str], None] = print):
    self.directory, self.log = directory, log
    self.path = os.path.join(directory, LOCK_FILE)
    self.record: Optional[Dict[str, Any]] = None
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def acquire(self) -> 'RunLock':
    """Takes the lock, or raises LockHeld naming the live holder."""
    os.makedirs(self.directory, exist_ok=True)
    record = _record()
    for _ in range(20):
      if _link_new(self.path, record):
        self.record = record
        break
      exists, current = _load(self.path)
      age = _age(self.path)
      if current is None and exists and age > lease_s():   # unreadable and old
        if _set_aside(self.path, {}):
          self.log(f'warning: {self.directory}: took over an unreadable lock file last '
                   f'written {age:.0f} s ago')
        continue
      if current is None:   # being replaced this instant
        time.sleep(0.05)
        continue
      if is_mine(current):   # this process, or this SLURM job's own earlier incarnation
        if current.get('state') == 'running' and current.get('pid') != os.getpid():
          self.log(f'{self.directory}: taking over the lock of this SLURM job\'s previous '
                   f'run ({describe(current)}): requeued')
        _replace(self.path, record)
        self.record = record
        break
      if is_live(current):
        raise LockHeld(f'{self.directory} is being trained by {describe(current)}; wait for '
                       f'it to end (if it is dead, the lock is taken over once its heartbeat '
                       f'is {lease_s():.0f} s old, or remove {self.path})')
      if _set_aside(self.path, current):
        self.log(f'warning: {self.directory}: took over a stale lock ({describe(current)}: '
                 'not running any more)')
    else:
      raise LockHeld(f'could not take the lock {self.path}: it is unreadable or other '
                     f'processes keep taking it (an unreadable lock is taken over once it '
                     f'is {lease_s():.0f} s old; or remove it)')
    _HELD.append(self)
    self._thread = threading.Thread(target=self._beat, name='run-lock-heartbeat', daemon=True)
    self._thread.start()
    return self

  def _beat(self) -> None:
    while not self._stop.wait(heartbeat_s()):
      record = self.record
      try:
        if record is None or self._lost() is not None:
          return
        if not self._stop.is_set():
          _replace(self.path, {**record, 'heartbeat': time.time()})
      except OSError:   # a full disk, a filesystem hiccup: the next beat tries again
        pass

  def _lost(self) -> Optional[Dict[str, Any]]:
    """The lock of the process that took this one over, or None while it is ours.
    Only a readable lock of another holder counts as lost: a read that fails (a
    filesystem hiccup, a racing takeover's rename in flight) is retried, and a lock
    file found missing is taken again if nobody else has."""
    if self.record is None:
      return None
    for _ in range(20):
      exists, current = _load(self.path)
      if current is not None:
        return None if current.get('nonce') == self.record['nonce'] else current
      if not exists and _link_new(self.path, {**self.record, 'heartbeat': time.time()}):
        return None
      time.sleep(0.05)
    return None   # unreadable throughout: no evidence that another process holds it

  def held(self) -> bool:
    """Whether the lock file is still ours (nobody took it over)."""
    return self.record is not None and self._lost() is None

  def check(self) -> None:
    """Raises if another process took the lock over (this one was judged dead)."""
    other = self._lost()
    if other is not None:
      raise LockHeld(f'lost the lock of {self.directory} to {describe(other)}: stopping '
                     'without writing more')

  def _stop_beating(self) -> None:
    self._stop.set()
    if self._thread is not None and self._thread is not threading.current_thread():
      self._thread.join(timeout=10)   # a beat under way must not rewrite the file after
    self._thread = None

  def release(self) -> None:
    """Removes the lock if it is still ours (idempotent)."""
    self._stop_beating()
    if self.record is None:
      return
    exists, current = _load(self.path)
    if current is not None and current.get('nonce') == self.record['nonce']:
      try:
        os.remove(self.path)
      except OSError:
        pass
    self.record = None
    if self in _HELD:
      _HELD.remove(self)

  def requeue(self) -> None:
    """Turns the lock into a `queued` one of this SLURM job (kept while the job waits
    to run again; its next incarnation takes it over)."""
    self._stop_beating()
    if self.record is not None and self._lost() is None:
      _replace(self.path, _record('queued', slurm_job()))
    self.record = None
    if self in _HELD:
      _HELD.remove(self)


def release_all() -> None:
  """Releases every lock this process holds (at exit)."""
  for lock in list(_HELD):
    lock.release()


def requeue_all() -> None:
  """Before a SLURM requeue: every lock this process holds becomes a `queued` lock
  of its job, so that nobody else trains those runs while the job waits."""
  for lock in list(_HELD):
    lock.requeue()


atexit.register(release_all)
cli.at_abort(release_all)   # a failed process of a multi-process job skips atexit


def place_queued(directory: str, job: str) -> bool:
  """A `queued` lock for a run submitted as SLURM job `job`, unless a lock exists."""
  os.makedirs(directory, exist_ok=True)
  return _link_new(os.path.join(directory, LOCK_FILE), _record('queued', job))


def remove_dead(directory: str, pid: Optional[int] = None, job: Optional[str] = None) -> None:
  """Removes the lock of a holder known to have ended: the worker process `pid` on
  this host (its parent saw it die), or SLURM job `job` (its scheduler said so)."""
  lock = read(directory)
  if lock is None:
    return
  if (pid is not None and lock.get('pid') == pid and lock.get('host') == socket.gethostname()) \
      or (job is not None and lock.get('slurm_job') == job):
    try:
      os.remove(os.path.join(directory, LOCK_FILE))
    except OSError:
      pass
