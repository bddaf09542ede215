"""One run's bookkeeping while it trains: its directory, status, metrics,
TensorBoard events, checkpoints, early stopping and divergence.

Shared by the single-run loop (lib/train.py) and the loop that trains many
arms in one program (lib/group_train.py), so a run trained alone or as one arm
of a group leaves the same files behind. The order of calls:

  book = RunBook(config, workdir)       # checks only; raises UserError, writes nothing
  book.open(total_steps)                # directory ready; a status if nothing is left to do
  book.restore(abstract_state)          # latest checkpoint, or None (start at step 0)
  book.begin()                          # metrics past the start dropped, status 'running'
  ... book.log_eval(...); book.save(...); book.stop_early(...) at every evaluation ...
  book.finish(total) or book.diverged(step)
"""
import time
from typing import Any, Dict, Optional

import jax
from jax.experimental import multihost_utils

from lib import config as config_lib
from lib.checkpoint import Checkpoints
from lib.errors import UserError
from lib.metrics import MetricsWriter, echo, format_duration
from lib.rundir import RunDir


class RunBook:

  def __init__(self, config, workdir: str, *, fresh: bool = False, log=echo,
               hparams: Optional[Dict[str, Any]] = None):
    """Resolves `config` and checks `workdir` against it (reads only).

    `hparams` (default: the flattened config) go to TensorBoard's HParams tab.
    """
    self.config = config_lib.resolve(config)
    self.config_dict = config_lib.to_json_dict(self.config)
    self.workdir, self.fresh, self.log = workdir, fresh, log
    self.hparams = hparams
    self.rundir = RunDir(workdir)
    self.resume = self.rundir.check_config(self.config_dict, fresh)
    self.previous = self.rundir.read_status() if self.resume else {}
    if self.previous.get('status') == 'diverged':
      raise UserError(f'{workdir} diverged ({self.previous.get("reason", "")}); rerunning it '
                      'would diverge again: pass --fresh to archive it and start over, or use '
                      'another --workdir')
    self.checkpoints = None
    self.writer = None
    self.start, self.wall_offset, self.total = 0, 0.0, 0
    self.best_acc, self.since_best = -1.0, 0

  @property
  def primary(self) -> bool:
    return jax.process_index() == 0

  def open(self, total_steps: int) -> Optional[Dict[str, Any]]:
    """Archives an earlier run (fresh), writes config.json and opens the
    checkpoints. Returns the run's final status if it has nothing left to train."""
    self.total = total_steps
    if self.fresh and self.rundir.has_run() and self.primary:
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
      self.checkpoints.close()
      return self.previous
    if self.latest is not None and self.latest >= total_steps:   # nothing to restore for
      self.log(f'{self.workdir} already finished ({total_steps} steps)')
      if self.previous.get('status') == 'done':
        self.checkpoints.close()
        return self.previous
      return self.finish(total_steps)
    return None

  def restore(self, abstract_state):
    """The state of the latest checkpoint (restored onto `abstract_state`'s
    sharding), or None when the run starts from scratch."""
    if self.latest is None:
      return None
    state, meta = self.checkpoints.restore(self.latest, abstract_state)
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
        self._update_best(row['val_accuracy'])
    patience = self.config.train.early_stop_patience
    if patience and self.since_best >= patience and self.start < self.total:
      self.log(f'early stop at step {self.start}: no new best val_accuracy in {patience} '
               'evaluations')
      return self.finish(self.start, stopped_early=True)
    if self.primary:
      self.rundir.set_status('running', step=self.start, total_steps=self.total)
      self.writer = MetricsWriter(self.rundir, purge_step=self.start + 1 if self.resume else None)
      if self.start == 0:
        self.writer.hparams(self.hparams if self.hparams is not None
                            else config_lib.flatten(self.config_dict))
    self.run_start = time.time()
    return None

  # ----- at an evaluation -----
  def log_eval(self, done: int, steps_per_epoch: int, train_loss: float, train_acc: float,
               val: Dict[str, float], lr: float, examples_per_sec: float,
               histograms=None) -> Dict[str, Any]:
    """Appends the evaluation's row to metrics.jsonl and TensorBoard (and the
    histograms: a (params, activations) pair of host values)."""
    row = {'step': done, 'epoch': done / steps_per_epoch, 'train_loss': train_loss,
           'train_accuracy': train_acc, 'val_loss': val['loss'],
           'val_accuracy': val['accuracy'], 'lr': lr,
           'examples_per_sec': examples_per_sec,
           'wall_time': self.wall_offset + time.time() - self.run_start}
    self.log(f'  eval step {done}: val_loss {val["loss"]:.4f} val_accuracy {val["accuracy"]:.4f}')
    if self.primary:
      self.writer.write(row)
      if histograms is not None:
        self.writer.histograms(done, *histograms)
    return row

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
    self.checkpoints.save(row['step'], state,
                          {**meta_base, 'step': row['step'], 'epoch': row['epoch'],
                           'wall_time': row['wall_time']},
                          {'val_accuracy': row['val_accuracy'], 'val_loss': row['val_loss']})

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
    """Records an exception that ends the run (the caller re-raises it)."""
    if self.primary:
      self.rundir.set_status('failed', f'{type(e).__name__}: {e}')
    self.close_writer()

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
      status['best_val_accuracy'] = rows.get(best, {}).get('val_accuracy')
      status['final_val_accuracy'] = rows.get(final, {}).get('val_accuracy')
      self.rundir.set_status('done', **status)
      took = f' in {format_duration(seconds)}' if seconds is not None else ''
      self.log(f'done{took}: final val_accuracy {status["final_val_accuracy"]:.4f}, '
               f'best {status["best_val_accuracy"]:.4f} at step {best}')
    self.checkpoints.close()
    return {'status': 'done', **status}

  def diverged(self, step: int) -> Dict[str, Any]:
    reason = (f'loss not finite at step {step}; kept the last good checkpoint '
              f'(step {self.checkpoints.latest_step()}); lower optim.lr or set optim.clip_norm')
    self.checkpoints.wait()
    if self.primary:
      self.rundir.set_status('diverged', reason, step=step)
    self.close_writer()
    self.log(f'diverged: {reason}')
    self.checkpoints.close()
    return {'status': 'diverged', 'reason': reason, 'step': step}
