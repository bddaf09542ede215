"""Who holds a run directory's lock (W/lock.json, lib/runs/lock.py) and whether that
holder is still alive: reading the lock, this process's SLURM job, and the staleness
rules. A lock is stale, and taken over with a warning, when

  * its pid is dead on this host, or
  * its heartbeat is older than LEASE_S seconds (a holder on another host that
    died, or a hung one), or
  * it belongs to this process's own SLURM job (a requeued job, after a
    preemption or time limit, finds the lock of its previous incarnation: a dead
    pid on this host, or an earlier SLURM_RESTART_COUNT on another), or
  * it cannot be parsed and was last written over LEASE_S seconds ago.

A `queued` lock (no pid; the SLURM job id) stays live while `squeue` still knows the
job (or, where squeue cannot be asked, for LEASE_S seconds after the last heartbeat).
Environment: ABLATE_LOCK_LEASE_S (tests shorten it).
"""
import json
import os
import socket
import subprocess
import time
from typing import Any, Dict, Optional

LOCK_FILE = 'lock.json'


def lease_s() -> float:
  return float(os.environ.get('ABLATE_LOCK_LEASE_S', 300))


def slurm_job() -> Optional[str]:
  """This process's SLURM job as squeue names it: ARRAYJOB_TASK for an array task (or,
  under submitit's local executor, its local job id: the same requeue path)."""
  array, task = os.environ.get('SLURM_ARRAY_JOB_ID'), os.environ.get('SLURM_ARRAY_TASK_ID')
  if array and task:
    return f'{array}_{task}'
  return os.environ.get('SLURM_JOB_ID') or os.environ.get('SUBMITIT_LOCAL_JOB_ID') or None


def slurm_restart() -> int:
  """How many times SLURM has requeued this job (0 for its first run)."""
  try:
    return int(os.environ.get('SLURM_RESTART_COUNT', 0))
  except ValueError:
    return 0


def _load(path: str):
  """(exists, record): (False, None) when there is no lock file, (True, None) when
  it cannot be read or parsed this instant (being written, a filesystem hiccup)."""
  try:
    with open(path) as f:
      return True, json.load(f)
  except FileNotFoundError:
    return False, None
  except (OSError, ValueError):
    return True, None


def read(directory: str) -> Optional[Dict[str, Any]]:
  """The lock of `directory`, or None (no lock, or one being replaced this instant)."""
  return _load(os.path.join(directory, LOCK_FILE))[1]


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # someone else's process
    return True
  return True


# squeue states of a job that has ended or is ending (it will not run the task again).
_ENDED = {'BOOT_FAIL', 'CANCELLED', 'COMPLETED', 'COMPLETING', 'DEADLINE', 'FAILED',
          'NODE_FAIL', 'OUT_OF_MEMORY', 'PREEMPTED', 'SPECIAL_EXIT', 'STOPPED', 'TIMEOUT'}


def _slurm_job_active(job: str) -> Optional[bool]:
  """Whether squeue lists `job` in a state that will still run it (pending, running,
  requeued, suspended...); None if squeue cannot be asked."""
  try:
    out = subprocess.run(['squeue', '-h', '-j', job, '-o', '%T'], capture_output=True,
                         text=True, timeout=30)
  except (OSError, subprocess.SubprocessError):
    return None
  if out.returncode != 0:
    return False if 'Invalid job id' in out.stderr else None
  return any(state not in _ENDED for state in out.stdout.split())


def is_mine(lock: Dict[str, Any]) -> bool:
  """Held by this process, or placed for (or left by an earlier incarnation of) this
  SLURM job. Another live process of the same job on this host (two launches in one
  allocation) is not this process."""
  same_host = lock.get('host') == socket.gethostname()
  if lock.get('pid') == os.getpid() and same_host:
    return True
  job = slurm_job()
  if job is None or lock.get('slurm_job') != job:
    return False
  if lock.get('state') == 'queued' or lock.get('pid') is None:
    return True
  if same_host:   # a dead process of this job (a requeue on the same node)
    return not _pid_alive(int(lock['pid']))
  # Another node: an earlier incarnation of this job (requeued since), not another
  # live step of the same allocation.
  return int(lock.get('slurm_restart') or 0) < slurm_restart()


def is_live(lock: Dict[str, Any]) -> bool:
  """Whether the holder of `lock` should be taken to be alive."""
  age = time.time() - float(lock.get('heartbeat', 0))
  if lock.get('state') == 'queued':
    active = _slurm_job_active(lock['slurm_job']) if lock.get('slurm_job') else None
    return active if active is not None else age <= lease_s()
  if lock.get('host') == socket.gethostname() and lock.get('pid') is not None \
      and not _pid_alive(int(lock['pid'])):
    return False
  return age <= lease_s()


def describe(lock: Dict[str, Any]) -> str:
  job = f', SLURM job {lock["slurm_job"]}' if lock.get('slurm_job') else ''
  age = time.time() - float(lock.get('heartbeat', 0))
  if lock.get('state') == 'queued':
    return f'queued as SLURM job {lock.get("slurm_job")} (submitted from {lock.get("host")})'
  return f'host {lock.get("host")} pid {lock.get("pid")}{job}, heartbeat {age:.0f} s ago'


def live_holder(directory: str) -> Optional[Dict[str, Any]]:
  """The lock of `directory` if another live process holds it (reads only)."""
  lock = read(directory)
  if lock is None or is_mine(lock) or not is_live(lock):
    return None
  return lock
