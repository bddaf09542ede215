"""Orbax checkpoints of a run: the two latest (to resume) and the best by val_accuracy.

Each checkpoint holds the train state (StandardSave) and a small JSON `meta`
(epoch, wall time, the normalization statistics of the training split and the
data shape) so that evaluation needs nothing but the workdir.

Saving is asynchronous: `save` returns once Orbax has copied the state from the
devices to host memory (so the train step may donate those buffers right away)
and the files are written by a background thread while training goes on. Orbax
waits for that write before starting the next save; `wait()` (called before
anything reads the checkpoints, and at the end of a run) waits for it too. An
interrupted write leaves only a temporary directory, removed at the next start.

Two latest are kept so that an unreadable latest checkpoint (a truncated file,
a bad disk block) costs one evaluation interval, not the run: `restore_latest`
restores the one before and then moves the bad one to W/archive/ (never deletes
it). If none restores, nothing is moved: the cause may not be the files.
"""
import dataclasses
import hashlib
import os
import shutil
import sys
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from lib.core.errors import UserError
from lib.runs import faults
from lib.runs.rundir import timestamp

BEST_METRIC = 'val_accuracy'
KEEP_LATEST = 2


class NoValidCheckpoint(UserError):
  """Every checkpoint of a run failed to restore (all are left in place)."""


def _quiet_closed_loop_callbacks() -> None:
  """After a failed restore, tensorstore's reads still in flight report to the asyncio
  loop Orbax has closed; Python prints each as an unraisable 'Event loop is closed'.
  Those (and only those) are dropped: the failure itself is reported once."""
  previous = sys.unraisablehook
  if getattr(previous, 'quiet_closed_loop', False):
    return

  def hook(unraisable):
    if not (unraisable.exc_type is RuntimeError and 'Event loop is closed' in
            str(unraisable.exc_value)):
      previous(unraisable)
  hook.quiet_closed_loop = True
  sys.unraisablehook = hook


def _everywhere(ok: bool) -> bool:
  """Whether `ok` holds on every process (one process: `ok`)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


_OPENED: Dict[str, int] = {}


def _barrier_prefix(directory: str) -> str:
  """Orbax names the barriers of a multi-process save after the step alone: the arms
  of a vectorized group save the same step at once, each through its own manager,
  and without a prefix of their own their barriers would be one (a process passes
  arm 2's barrier for arm 1's, and process 0 finalizes a checkpoint the others have
  not finished). The same on every process: the directory, and how many managers of
  it this process opened before (every process opens the same ones, in order)."""
  _OPENED[directory] = _OPENED.get(directory, 0) + 1
  digest = hashlib.sha1(directory.encode()).hexdigest()[:12]
  return f'ckpt-{digest}-{_OPENED[directory]}'


def _fields(state):
  """A train state as the checkpoint holds it: a dict of its fields, without those
  that are None (the moving average of a run without train.ema_decay). So a field
  added to the state for an option leaves the checkpoints of runs without it what
  they were, and checkpoints written before it existed restore."""
  if not dataclasses.is_dataclass(state):
    return state
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
          if getattr(state, f.name) is not None}


def _best_metric(metrics):
  return metrics[BEST_METRIC]


class Checkpoints:

  def __init__(self, directory: str, read_only: bool = False, asynchronous: bool = True):
    """`asynchronous=False` writes each checkpoint before `save` returns (only
    launch.benchmark uses it, to measure what the asynchronous save saves)."""
    self.directory = os.path.abspath(directory)
    self.read_only, self.asynchronous = read_only, asynchronous
    if read_only and not os.path.isdir(self.directory):
      raise UserError(f'no checkpoints in {directory}: the run saved none yet')
    self.manager = self._open()

  def _open(self):
    policy = pp.AnyPreservationPolicy([
        pp.LatestN(n=KEEP_LATEST),
        pp.BestN(get_metric_fn=_best_metric, reverse=False, n=1),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=_best_metric, best_mode='max',
        create=not self.read_only, read_only=self.read_only,
        cleanup_tmp_directories=not self.read_only,
        enable_async_checkpointing=self.asynchronous and not self.read_only,
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            barrier_sync_key_prefix=_barrier_prefix(self.directory)))
    return ocp.CheckpointManager(self.directory, options=options, item_names=('state', 'meta'))

  def save(self, step: int, state, meta: Dict[str, Any], metrics: Dict[str, float]) -> None:
    """Starts saving `state` at `step`; returns once it is copied off the devices."""
    fault = faults.due('checkpoint_save')   # lib/runs/faults.py: a full disk, or a kill mid-write
    if fault == 'enospc':
      faults.perform(fault, self.directory)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_fields(state)), meta=ocp.args.JsonSave(meta)),
        metrics=metrics)
    faults.perform(fault, self.directory)   # kill: while the background write is under way

  def steps(self):
    return sorted(self.manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def best_step(self) -> Optional[int]:
    return self.manager.best_step()

  def resolve(self, which: str) -> int:
    """'best', 'latest' or a step number -> an existing step, or one clear error."""
    available = self.steps()
    if not available:
      raise UserError(f'no checkpoints in {self.directory}: the run saved none yet')
    if which in ('best', 'latest'):
      return self.best_step() if which == 'best' else self.latest_step()
    try:
      step = int(which)
    except ValueError:
      raise UserError(f'--checkpoint={which!r}: use best, latest or a step number') from None
    if step not in available:
      raise UserError(f'no checkpoint at step {step} in {self.directory}; available: '
                      f'{", ".join(map(str, available))} (best: {self.best_step()})')
    return step

  def restore(self, step: int, abstract_state) -> Tuple[Any, Dict[str, Any]]:
    self.wait()
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(_fields(abstract_state)), meta=ocp.args.JsonRestore()))
    state = out['state']
    if dataclasses.is_dataclass(abstract_state):
      state = dataclasses.replace(abstract_state, **state)
    return state, out['meta']

  def restore_latest(self, abstract_state, archive_dir: str, log: Callable[[str], None],
                     primary: bool = True) -> Optional[Tuple[int, Any, Dict[str, Any]]]:
    """(step, state, meta) of the latest checkpoint that restores, or None if the run
    has none. The steps after it that failed to restore are bad files (an older one
    restored here, under the same code, memory and filesystem): they are moved to
    `archive_dir` (by the primary process), never deleted. When none restores, the
    cause may be elsewhere (out of memory, a changed model, a filesystem error), so
    nothing is moved and NoValidCheckpoint says what each failure was."""
    failed = []
    _quiet_closed_loop_callbacks()
    for step in reversed(self.steps()):
      reason = 'it failed to restore on another process'
      try:
        state, meta = self.restore(step, abstract_state)
        ok = True
      except Exception as e:   # noqa: BLE001 - judged below, once an older one restores
        text = str(e).strip()
        reason = f'{type(e).__name__}: {text.splitlines()[0] if text else ""}'[:200]
        ok = False
      if not _everywhere(ok):   # every process resumes from the same step
        failed.append((step, reason))
        continue
      for bad, reason in failed:
        dest = os.path.join(archive_dir, f'checkpoint-{bad}-{timestamp()}')
        if primary:
          os.makedirs(archive_dir, exist_ok=True)
          shutil.move(os.path.join(self.directory, str(bad)), dest)
        log(f'warning: checkpoint at step {bad} does not restore ({reason}); moved it to '
            f'{dest}; resuming from step {step}, the one before')
      if failed:
        _sync('bad checkpoints archived')   # by the primary, before anyone reloads
        self.manager.reload()
      return step, state, meta
    if failed:
      what = '; '.join(f'step {s}: {r}' for s, r in failed)
      raise NoValidCheckpoint(
          f'no checkpoint of {os.path.dirname(self.directory)} restores ({what}); all are '
          'left in place: if the cause is elsewhere (memory, a changed model, the '
          'filesystem), fix it and rerun; if the files are damaged, rerun with --fresh to '
          'start over (the run is archived, not deleted)')
    return None

  def restore_meta(self, step: int) -> Dict[str, Any]:
    """Only the JSON meta (data shape, normalization statistics), not the state."""
    self.wait()
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def wait(self) -> None:
    """Waits for a save in progress to be written (a no-op when none is)."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
