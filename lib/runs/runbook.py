"""One run's bookkeeping while it trains: its directory, lock, provenance, status,
metrics, TensorBoard events, checkpoints, early stopping and divergence.

The training loop (lib/runs/loop.py) keeps one per arm, a single run being a group
of one, so a run trained alone or as one arm of a group leaves the same files
behind. The order of calls:

  book = RunBook(config, workdir)       # checks only; raises UserError, writes nothing
  book.open(total_steps)                # the lock taken (lib/runs/lock.py), directory ready;
                                        # a status if nothing is left to do
  book.restore(abstract_state)          # latest checkpoint that restores, or None (step 0)
  book.begin()                          # metrics past the start dropped, provenance, 'running'
  ... book.log_eval(...); book.save(...) (where the loop's policy saves);
      book.stop_early(...) at every evaluation ...
  book.finish(total) or book.diverged(step) or book.fail(e)
  book.release()                        # always (a finally): waits for saves, frees the lock
"""
import time
from typing import Any, Dict, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from lib.core import config as config_lib
from lib.core import determinism
from lib.core.errors import UserError, failure_reason
from lib.runs import provenance
from lib.runs import lock as lock_lib
from lib.runs.checkpoint import Checkpoints
from lib.runs.metrics import MetricsWriter, echo, format_duration
from lib.runs.rundir import RunDir
from lib.training import resolve as resolve_lib


def selection_key(config) -> str:
  """The metrics column that picks a run's best checkpoint and gives its
  best_val_accuracy: the moving average's with train.ema_decay on and
  train.select_by=ema, else the weights'."""
  if config.train.ema_decay > 0 and config.train.select_by == 'ema':
    return 'val_accuracy_ema'
  return 'val_accuracy'


class RunBook:

  def __init__(self, config, workdir: str, *, fresh: bool = False, log=echo,
               hparams: Optional[Dict[str, Any]] = None):
    """Resolves `config` and checks `workdir` against it (reads only).

    `hparams` (default: the flattened config) go to TensorBoard's HParams tab.
    """
    self.config = resolve_lib.resolve(config)
    determinism.request(self.config.train.deterministic)   # before the backend starts, or one line
    self.config_dict = config_lib.to_json_dict(self.config)
    self.workdir, self.fresh, self.log = workdir, fresh, log
    self.hparams = hparams
    self.rundir = RunDir(workdir)
    self._read_previous()
    self.checkpoints = None
    self.writer = None
    self.lock: Optional[lock_lib.RunLock] = None
    self.start, self.wall_offset, self.total = 0, 0.0, 0
    self.best_acc, self.since_best = -1.0, 0
    self.best_key = selection_key(self.config)

  def _read_previous(self) -> None:
    """Whether the workdir holds this config's run, and its last status (reads only)."""
    self.resume = self.rundir.check_config(self.config_dict, self.fresh)
    orphans = self.rundir.orphans()
    if orphans and not self.fresh:
      raise UserError(f'{self.workdir} holds {", ".join(orphans)} but no config.json (an '
                      'interrupted --fresh, or files copied in): rerun with --fresh to '
                      'archive them, or use another --workdir')
    self.previous = self.rundir.read_status() if self.resume else {}
    how = None
    if self.previous.get('status') == 'diverged':
      how = f'diverged ({self.previous.get("reason", "")}); rerunning it would diverge again'
    elif self.previous.get('status') == 'failed' and self.previous.get('unrecoverable'):
      # written by an earlier version, which archived every checkpoint that failed
      how = f'cannot be resumed ({self.previous.get("reason", "")})'
    if how:
      raise UserError(f'{self.workdir} {how}: pass --fresh to archive it and start over, or '
                      'use another --workdir')

  @property
  def primary(self) -> bool:
    return jax.process_index() == 0

  def open(self, total_steps: int) -> Optional[Dict[str, Any]]:
    """Archives an earlier run (fresh), writes config.json and opens the
    checkpoints. Returns the run's final status if it has nothing left to train."""
    self.total = total_steps
    self._lock()
    self._read_previous()   # again, now that no other process can change the directory
    if self.fresh and (self.rundir.has_run() or self.rundir.orphans()) and self.primary:
      self.log(f'archived the earlier run to {self.rundir.archive()}')
    if self.primary and not self.resume:
      self.rundir.write_config(self.config_dict)
    if jax.process_count() > 1:   # the workdir is ready before any process opens it
      multihost_utils.sync_global_devices('run directory ready')
    self.checkpoints = Checkpoints(self.rundir.checkpoint_dir)
    self.latest = self.checkpoints.latest_step() if self.resume else None
    if self.previous.get('status') == 'done' and self.previous.get('stopped_early'):
      self.log(f'{self.workdir} already finished (stopped early at step '
               f'{self.previous["step"]})')
      return self.previous
    if self.latest is not None and self.latest >= total_steps and \
        self.previous.get('status') == 'done':   # nothing to restore for
      self.log(f'{self.workdir} already finished ({total_steps} steps)')
      return self.previous
    # Trained to the end but killed before it was marked done: the final checkpoint is
    # restored like any other (an unreadable one falls back), then the run finishes.
    return None

  def _lock(self) -> None:
    """Takes the run directory's lock (process 0 of a multi-host job, for all of them)."""
    error = ''
    if self.primary:
      try:
        self.lock = lock_lib.RunLock(self.workdir, self.log).acquire()
      except lock_lib.LockHeld as e:
        error = str(e)
    self._raise_together(error, f'{self.workdir} is being trained by another process (see '
                                'process 0)')

  def _check_lock(self) -> None:
    """Raises LockHeld if another process took the run over (this one writes nothing more)."""
    error = ''
    if self.lock is not None:
      try:
        self.lock.check()
      except lock_lib.LockHeld as e:
        error = str(e)
    self._raise_together(error, f'{self.workdir}: process 0 lost the run\'s lock; stopping '
                                'without writing more')

  def _raise_together(self, error: str, elsewhere: str) -> None:
    """Raises LockHeld(error) on every process at once: only process 0 holds the lock
    of a multi-host run, so it says whether all must stop (`elsewhere`, on the others)."""
    if jax.process_count() > 1:
      if int(multihost_utils.broadcast_one_to_all(np.int32(bool(error)))) and not error:
        error = elsewhere
    if error:
      raise lock_lib.LockHeld(error)

  def restore(self, abstract_state):
    """The state of the latest checkpoint that restores (onto `abstract_state`'s
    sharding), or None when the run starts from scratch. A checkpoint that fails to
    restore is archived and the one before it used (lib/runs/checkpoint.py)."""
    if self.latest is None:
      return None
    found = self.checkpoints.restore_latest(abstract_state, self.rundir.archive_dir, self.log,
                                            self.primary)
    if found is None:
      return None
    step, state, meta = found
    self.start, self.wall_offset = int(state.step), float(meta['wall_time'])
    self.log(f'resuming {self.workdir} from step {self.start}')
    return state

  def begin(self) -> Optional[Dict[str, Any]]:
    """Drops metrics rows past the start (they are recomputed), rebuilds the
    early-stopping count, marks the run 'running' and opens its writers. Returns
    the final status if the run had met its early-stopping criterion before a kill."""
    if self.resume and self.primary:
      self.rundir.drop_metrics_after(self.start)
    for row in (self.rundir.read_metrics() if self.resume else []):
      if row['step'] <= self.start:
        self._update_best(row[self.best_key])
    patience = self.config.train.early_stop_patience
    if patience and self.since_best >= patience and self.start < self.total:
      self.log(f'early stop at step {self.start}: no new best val_accuracy in {patience} '
               'evaluations')
      return self.finish(self.start, stopped_early=True)
    if self.primary:
      provenance.record(self.rundir, self.start, self.resume, self.log)
      self.rundir.set_status('running', step=self.start, total_steps=self.total)
      self.writer = MetricsWriter(self.rundir, purge_step=self.start + 1 if self.resume else None)
      if self.start == 0:
        self.writer.hparams(self.hparams if self.hparams is not None
                            else config_lib.flatten(self.config_dict))
    self.run_start = time.time()
    return None

  # ----- at an evaluation -----
  def log_eval(self, done: int, steps_per_epoch: int, train_loss: float, train_acc: float,
               val: Dict[str, float], train_eval: Dict[str, float], lr: float,
               examples_per_sec: float, histograms=None,
               val_ema: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
    """Appends the evaluation's row to metrics.jsonl and TensorBoard (and the
    histograms: a (params, activations) pair of host values). train_loss/acc are the
    running means since the last evaluation (under augmentation and regularization);
    `train_eval` is the fixed training subset evaluated as val is. Their top5_accuracy
    (datasets of more than 10 classes) becomes train_eval_top5_accuracy and
    val_top5_accuracy, each beside its accuracy. `val_ema` (train.ema_decay on): the
    moving average's val_loss_ema, val_accuracy_ema (val_top5_accuracy_ema)."""
    row = {'step': done, 'epoch': done / steps_per_epoch,
           'running_train_loss': train_loss, 'running_train_accuracy': train_acc}
    for prefix, result in (('train_eval', train_eval), ('val', val)):
      row[f'{prefix}_loss'], row[f'{prefix}_accuracy'] = result['loss'], result['accuracy']
      if 'top5_accuracy' in result:
        row[f'{prefix}_top5_accuracy'] = result['top5_accuracy']
    if val_ema is not None:
      row['val_loss_ema'], row['val_accuracy_ema'] = val_ema['loss'], val_ema['accuracy']
      if 'top5_accuracy' in val_ema:
        row['val_top5_accuracy_ema'] = val_ema['top5_accuracy']
    row.update({'lr': lr, 'examples_per_sec': examples_per_sec,
                'wall_time': self.wall_offset + time.time() - self.run_start})
    top5 = f' val_top5_accuracy {val["top5_accuracy"]:.4f}' if 'top5_accuracy' in val else ''
    ema = '' if val_ema is None else f' | val_accuracy_ema {val_ema["accuracy"]:.4f}'
    self.log(f'  eval step {done}: val_loss {val["loss"]:.4f} val_accuracy {val["accuracy"]:.4f}'
             f'{top5}{ema} | train_eval_accuracy {train_eval["accuracy"]:.4f}')
    self._check_lock()   # another process took the run over: write nothing more
    if self.primary:
      self.writer.write(row)
      if histograms is not None:
        self.writer.histograms(done, *histograms)
    return row

  def chosen(self, val: Dict[str, float], val_ema: Optional[Dict[str, float]]) -> float:
    """The val accuracy that selects checkpoints and stops early: the moving
    average's when train.select_by says so (train.ema_decay on), else the weights'."""
    return val_ema['accuracy'] if self.best_key == 'val_accuracy_ema' else val['accuracy']

  def is_new_best(self, val_accuracy: float) -> bool:
    return val_accuracy > self.best_acc

  def is_best_checkpoint(self, val_accuracy: float) -> bool:
    """Whether a checkpoint at this accuracy becomes the best one: Orbax keeps the
    latest of equal accuracies, so a tie counts."""
    return val_accuracy >= self.best_acc

  def stops_at(self, done: int, val_accuracy: float) -> bool:
    """Whether `stop_early(done, val_accuracy)` will stop the run (changes nothing)."""
    patience = self.config.train.early_stop_patience
    since = 0 if self.is_new_best(val_accuracy) else self.since_best + 1
    return bool(patience) and since >= patience and done < self.total

  def save(self, row: Dict[str, Any], state, meta_base: Dict[str, Any]) -> None:
    """The checkpoint of `state` at row['step'] (every process takes part)."""
    self._check_lock()
    self.checkpoints.save(row['step'], state,
                          {**meta_base, 'step': row['step'], 'epoch': row['epoch'],
                           'wall_time': row['wall_time']},
                          {'val_accuracy': row[self.best_key],
                           'val_loss': row[self.best_key.replace('accuracy', 'loss')]})

  def stop_early(self, done: int, val_accuracy: float) -> Optional[Dict[str, Any]]:
    """Counts this evaluation for early stopping; the final status if the run stops here."""
    self._update_best(val_accuracy)
    patience = self.config.train.early_stop_patience
    if patience and self.since_best >= patience and done < self.total:
      self.log(f'early stop at step {done}: no new best val_accuracy in {patience} evaluations')
      return self.finish(done, time.time() - self.run_start, stopped_early=True)
    return None

  def _update_best(self, val_accuracy: float) -> None:
    if val_accuracy > self.best_acc:
      self.best_acc, self.since_best = val_accuracy, 0
    else:
      self.since_best += 1

  # ----- endings -----
  def close_writer(self) -> None:
    if self.writer:
      self.writer.close()
      self.writer = None

  def fail(self, e: BaseException) -> None:
    """Records an exception that ends the run (the caller re-raises it). A run whose
    lock was taken over writes nothing: the run is someone else's now."""
    self.close_writer()
    if isinstance(e, lock_lib.LockHeld):
      return
    if self.primary:
      self.rundir.set_status('failed', failure_reason(e))

  def release(self) -> None:
    """Ends this process's hold on the run, however the run ended: waits for a
    checkpoint being written, closes the writers and frees the lock. Idempotent."""
    self.close_writer()
    try:
      if self.checkpoints is not None:
        checkpoints, self.checkpoints = self.checkpoints, None
        checkpoints.wait()
        checkpoints.close()
    except Exception as e:   # noqa: BLE001 - every success path waited before its status;
      # here a run is already ending on another exception, which must not be replaced
      self.log(f'warning: {self.workdir}: the last checkpoint write failed '
               f'({failure_reason(e)}); a rerun resumes from the one before')
    finally:
      if self.lock is not None:
        self.lock.release()
        self.lock = None

  def finish(self, final: int, seconds: Optional[float] = None,
             stopped_early: bool = False) -> Dict[str, Any]:
    """Marks the run done at step `final`, with its best and final val accuracy
    (from metrics.jsonl); the best checkpoint is the one evaluation uses."""
    self.close_writer()
    self.checkpoints.wait()
    best = self.checkpoints.best_step()
    status = {'step': final, 'total_steps': self.rundir.read_status().get('total_steps', final),
              'best_step': best, 'stopped_early': stopped_early}
    if self.primary:
      rows = {r['step']: r for r in self.rundir.read_metrics()}
      status['best_val_accuracy'] = rows.get(best, {}).get(self.best_key)
      status['final_val_accuracy'] = rows.get(final, {}).get(self.best_key)
      if self.best_key != 'val_accuracy':
        status['selected_by'] = self.best_key
      self.rundir.set_status('done', **status)
      took = f' in {format_duration(seconds)}' if seconds is not None else ''
      self.log(f'done{took}: final val_accuracy {status["final_val_accuracy"]:.4f}, '
               f'best {status["best_val_accuracy"]:.4f} at step {best}')
    return {'status': 'done', **status}

  def diverged(self, step: int) -> Dict[str, Any]:
    reason = (f'loss not finite at step {step}; kept the last good checkpoint '
              f'(step {self.checkpoints.latest_step()}); lower optim.lr or set optim.clip_norm')
    self.checkpoints.wait()
    if self.primary:
      self.rundir.set_status('diverged', reason, step=step)
    self.close_writer()
    self.log(f'diverged: {reason}')
    return {'status': 'diverged', 'reason': reason, 'step': step}

