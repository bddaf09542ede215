"""What produced a run: W/provenance.json, one record per session that trained it.

A record holds the git commit of this checkout and whether it had uncommitted
changes, the Python and library versions, the devices (kind, count), the
process count, the host, the command line, the time, the step the session
started from, XLA_FLAGS and whether the deterministic flags were in effect
(train.deterministic, lib/core/determinism.py). A resume under another commit or library version is allowed (a
bug fix may be why one resumes) but says so in one line.
"""
import functools
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from importlib import metadata
from typing import Any, Callable, Dict, List, Optional

from lib.core import config as config_lib
from lib.core import determinism
from lib.runs.rundir import RunDir, timestamp, write_json

PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'ml-collections')
ROOT = config_lib.REPO_ROOT
# What must match for a resumed run to compute what the first session would have.
COMPARED = ('git_commit', 'git_dirty', 'python', 'packages', 'deterministic')


@functools.lru_cache(maxsize=1)
def git_state() -> Dict[str, Any]:
  """{'git_commit', 'git_dirty'} of the checkout holding lib/ (None where git or the
  repository is missing). Computed once per process."""
  def git(*args):
    out = subprocess.run(['git', '-C', ROOT, *args], capture_output=True, text=True, timeout=20)
    if out.returncode != 0:
      raise OSError(out.stderr.strip())
    return out.stdout.strip()
  try:
    commit = git('rev-parse', 'HEAD')
    dirty = bool(git('status', '--porcelain', '--untracked-files=no'))
  except (OSError, subprocess.SubprocessError):
    return {'git_commit': None, 'git_dirty': None}
  return {'git_commit': commit, 'git_dirty': dirty}


def _version(name: str) -> Optional[str]:
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return None


def collect(start_step: int = 0) -> Dict[str, Any]:
  """This session's record."""
  import jax
  devices = jax.devices()
  return {**git_state(), 'python': platform.python_version(),
          'packages': {name: _version(name) for name in PACKAGES},
          'device_kind': devices[0].device_kind, 'platform': devices[0].platform,
          'device_count': len(devices), 'local_device_count': jax.local_device_count(),
          'process_count': jax.process_count(), 'host': socket.gethostname(),
          'command': shlex.join(sys.argv), 'time': time.strftime('%Y-%m-%dT%H:%M:%S'),
          'start_step': start_step, **determinism.record()}


def differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
  """What changed between two sessions that could change the results."""
  out = []
  for key in COMPARED:
    a, b = old.get(key), new.get(key)
    if key == 'deterministic':   # records written before it was recorded: off
      a, b = bool(a), bool(b)
    if key == 'packages':
      out += [f'{p} {(a or {}).get(p)} -> {(b or {}).get(p)}' for p in sorted(set(a or {}) |
                                                                            set(b or {}))
              if (a or {}).get(p) != (b or {}).get(p)]
    elif a != b:
      label = {'git_commit': 'commit', 'git_dirty': 'uncommitted changes'}.get(key, key)
      short = lambda v: v[:10] if key == 'git_commit' and isinstance(v, str) else v
      out.append(f'{label} {short(a)} -> {short(b)}')
  return out


def record(rundir: RunDir, start_step: int, resume: bool, log: Callable[[str], None]) -> None:
  """Appends this session to W/provenance.json; on a resume, warns in one line if
  the code or the libraries differ from the previous session's."""
  new = collect(start_step)
  sessions = []
  if resume and os.path.exists(rundir.provenance_path):
    try:
      with open(rundir.provenance_path) as f:
        sessions = json.load(f).get('sessions', [])
    except (OSError, ValueError):   # kept, never overwritten: moved to the archive
      os.makedirs(rundir.archive_dir, exist_ok=True)
      dest = os.path.join(rundir.archive_dir, f'provenance-{timestamp()}.json')
      os.replace(rundir.provenance_path, dest)
      log(f'warning: {rundir.provenance_path} is unreadable; moved it to {dest} and '
          'started a new one')
  if sessions:
    changed = differences(sessions[-1], new)
    if changed:
      log(f'warning: resuming {rundir.path} under other code or libraries than its previous '
          f'session ({"; ".join(changed)}): the rest of the run may differ from an '
          'uninterrupted one')
  write_json(rundir.provenance_path, {'sessions': sessions + [new]})
