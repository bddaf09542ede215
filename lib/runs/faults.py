"""Fault injection at named points of the run lifecycle, for the fault tests and
launch.chaos: a process started with

  ABLATE_FAULT=metrics_write@3          SIGKILLs itself half-way through writing its
                                        3rd metrics row (a kill mid-write)
  ABLATE_FAULT=checkpoint_save@2        SIGKILLs itself while its 2nd checkpoint is
                                        being written (the asynchronous save under way)
  ABLATE_FAULT=checkpoint_save@2:enospc raises OSError(ENOSPC) there instead (a full disk)
  ABLATE_FAULT=metrics_write@2:pause    stops there (a hung process, its lock still
                                        beating) until the file named by
                                        ABLATE_FAULT_RELEASE exists, then goes on

Several entries are separated by commas. Counts are per process and per point.
Without the variable every `hit` is one dictionary lookup.
"""
import errno
import os
import signal
import time
from typing import Callable, Dict, Optional, Tuple

ENV = 'ABLATE_FAULT'
RELEASE_ENV = 'ABLATE_FAULT_RELEASE'
POINTS = ('metrics_write', 'checkpoint_save', 'status_write')
ACTIONS = ('kill', 'enospc', 'pause')

_plan: Optional[Dict[str, Tuple[int, str]]] = None
_counts: Dict[str, int] = {}


def _parse(text: str) -> Dict[str, Tuple[int, str]]:
  plan = {}
  for item in filter(None, (s.strip() for s in text.split(','))):
    where, _, action = item.partition(':')
    point, _, n = where.partition('@')
    action = action or 'kill'
    if point not in POINTS or action not in ACTIONS or not n.isdigit() or int(n) < 1:
      raise ValueError(f'{ENV}={text!r}: each item is POINT@N[:ACTION] with POINT in '
                       f'{", ".join(POINTS)}, N >= 1 and ACTION in {", ".join(ACTIONS)}')
    plan[point] = (int(n), action)
  return plan


def due(point: str) -> Optional[str]:
  """Counts one pass through `point`: the planned action if this is its N-th pass."""
  global _plan
  if _plan is None:
    _plan = _parse(os.environ.get(ENV, ''))
  if point not in _plan:
    return None
  _counts[point] = _counts.get(point, 0) + 1
  n, action = _plan[point]
  return action if _counts[point] == n else None


def perform(action: Optional[str], path: str = '',
            before_kill: Optional[Callable[[], None]] = None) -> None:
  """Does `action` (nothing for None): raise ENOSPC, wait for the release file, or
  SIGKILL this process (after `before_kill`, e.g. writing half a line)."""
  if action == 'pause':
    release = os.environ.get(RELEASE_ENV)
    if not release:
      raise ValueError(f'{ENV}: a pause needs {RELEASE_ENV}, the file that ends it')
    while not os.path.exists(release):
      time.sleep(0.05)
    return
  if action == 'enospc':
    raise OSError(errno.ENOSPC, f'No space left on device (injected by {ENV})', path)
  if action == 'kill':
    if before_kill is not None:
      before_kill()
    os.kill(os.getpid(), signal.SIGKILL)


def hit(point: str, path: str = '', before_kill: Optional[Callable[[], None]] = None) -> None:
  """`due` and `perform` at once."""
  perform(due(point), path, before_kill)


def reset() -> None:
  """Forgets the plan and the counts (tests that change the variable in-process)."""
  global _plan
  _plan = None
  _counts.clear()
