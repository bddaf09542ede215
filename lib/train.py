"""train_and_evaluate: one run from config to checkpoints, resumable.

Resuming restores the latest checkpoint (saved at evaluation points, where the
running train metrics restart) and the data order and RNG are functions of
(seed, epoch) and (seed, step), so a resumed run reproduces an uninterrupted
one exactly.
"""
import time
from typing import Any, Dict, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from lib import config as config_lib
from lib import data, engine, sharding
from lib.checkpoint import Checkpoints
from lib.errors import UserError
from lib.metrics import MetricsWriter, echo, format_duration, progress_line
from lib.rundir import RunDir


class Preempted(Exception):
  """Raised by the `stop_after_step` debug hook, as if the process were killed."""


def _is_eval_step(done: int, total: int, steps_per_epoch: int, eval_every: int) -> bool:
  if done == total:
    return True
  return done % (eval_every if eval_every > 0 else steps_per_epoch) == 0


def train_and_evaluate(config, workdir: str, *, fresh: bool = False, mesh=None,
                       stop_after_step: Optional[int] = None, log=echo,
                       hparams: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds this config's run).

  `hparams` (default: the flattened config) go to TensorBoard's HParams tab.
  Returns the final status record. Bad input raises UserError before anything
  is written to disk.
  """
  config = config_lib.resolve(config)
  config_dict = config_lib.to_json_dict(config)
  rundir = RunDir(workdir)
  resume = rundir.check_config(config_dict, fresh)   # reads only
  previous = rundir.read_status() if resume else {}
  if previous.get('status') == 'diverged':
    raise UserError(f'{workdir} diverged ({previous.get("reason", "")}); rerunning it would '
                    'diverge again: pass --fresh to archive it and start over, or use another '
                    '--workdir')
  dataset = data.load(config.data)                    # may fail: nothing written yet
  mesh = mesh if mesh is not None else sharding.make_mesh()
  eng = engine.Engine(config, dataset, mesh)
  primary = jax.process_index() == 0

  if fresh and rundir.has_run() and primary:
    log(f'archived the earlier run to {rundir.archive()}')
  if primary and not resume:
    rundir.write_config(config_dict)
  if jax.process_count() > 1:   # the workdir is ready before any process opens it
    multihost_utils.sync_global_devices('run directory ready')
  checkpoints = Checkpoints(rundir.checkpoint_dir)
  start, wall_offset = 0, 0.0
  latest = checkpoints.latest_step() if resume else None
  total, spe = eng.total_steps, eng.steps_per_epoch
  if previous.get('status') == 'done' and previous.get('stopped_early'):
    log(f'{workdir} already finished (stopped early at step {previous["step"]})')
    checkpoints.close()
    return previous
  if latest is not None and latest >= total:   # nothing to restore for
    log(f'{workdir} already finished ({total} steps)')
    if previous.get('status') == 'done':
      checkpoints.close()
      return previous
    return _finish(rundir, checkpoints, total, log, primary)
  if latest is not None:
    state, meta = checkpoints.restore(latest, eng.abstract_state())
    state = eng.owned(state)
    start, wall_offset = int(state.step), float(meta['wall_time'])
    log(f'resuming {workdir} from step {start}')
  else:
    state = eng.init_state()
  if resume and primary:   # rows logged after the last checkpoint are recomputed
    rundir.drop_metrics_after(start)
  # Early stopping: evaluations since the best val accuracy (rebuilt on resume).
  patience = config.train.early_stop_patience
  best_acc, since_best = -1.0, 0
  for row in (rundir.read_metrics() if resume else []):
    if row['step'] <= start:
      best_acc, since_best = ((row['val_accuracy'], 0) if row['val_accuracy'] > best_acc
                              else (best_acc, since_best + 1))
  if patience and since_best >= patience and start < total:   # killed before it could stop
    log(f'early stop at step {start}: no new best val_accuracy in {patience} evaluations')
    return _finish(rundir, checkpoints, start, log, primary, stopped_early=True)
  if primary:
    rundir.set_status('running', step=start, total_steps=total)
  writer = MetricsWriter(rundir, purge_step=start + 1 if resume else None) if primary else None
  if writer and start == 0:
    writer.hparams(hparams if hparams is not None else config_lib.flatten(config_dict))
  log(f'training {config.model.name} on {config.data.source} '
      f'({len(dataset.train[1])} train / {len(dataset.val[1])} val images) for {total} steps '
      f'on {mesh.devices.size} device(s), batch {config.train.batch_size}')

  meta_base = {'mean': eng.mean.tolist(), 'std': eng.std.tolist(),
               'num_classes': dataset.num_classes, 'image_shape': list(dataset.image_shape)}
  batch = config.train.batch_size
  sums = eng.zero_sums()
  epoch_indices, current_epoch = None, -1
  run_start = time.time()
  window_start, window_examples = time.time(), 0   # for examples/s since the last log
  train_time = 0.0                                  # excludes evaluation, for the ETA
  segment_start = time.time()
  try:
    for step in range(start, total):
      if step // spe != current_epoch:
        current_epoch = step // spe
        epoch_indices = eng.epoch_indices(current_epoch)
      state, sums = eng.train_step(state, epoch_indices, sums)
      done = step + 1
      window_examples += batch
      is_eval = _is_eval_step(done, total, spe, config.train.eval_every)
      if not (is_eval or done % config.train.log_every == 0):
        continue
      host = jax.device_get(sums)          # the only sync between evaluations
      if host['first_nonfinite_step'] >= 0:
        return _diverged(rundir, checkpoints, writer, int(host['first_nonfinite_step']), log,
                         primary)
      now = time.time()
      train_time += now - segment_start
      segment_start = now
      speed = window_examples / max(now - window_start, 1e-9)
      window_start, window_examples = now, 0
      steps_done_here = done - start
      eta = train_time / steps_done_here * (total - done)
      train_loss = float(host['loss'] / host['steps'])
      train_acc = float(host['correct'] / host['examples'])
      lr = eng.learning_rate(step)
      log(progress_line(done, total, spe, train_loss, train_acc, lr, speed, eta))
      if not is_eval:
        continue
      val = eng.evaluate(state, 'val')
      if not np.isfinite(val['loss']):   # never checkpoint a state that cannot predict
        return _diverged(rundir, checkpoints, writer, done, log, primary)
      row = {'step': done, 'epoch': done / spe, 'train_loss': train_loss,
             'train_accuracy': train_acc, 'val_loss': val['loss'],
             'val_accuracy': val['accuracy'], 'lr': lr,
             'examples_per_sec': speed, 'wall_time': wall_offset + time.time() - run_start}
      log(f'  eval step {done}: val_loss {val["loss"]:.4f} val_accuracy {val["accuracy"]:.4f}')
      # Every process runs the same programs (multi-host); only the primary writes.
      acts = eng.activations(state) if config.train.tb_histograms else None
      if primary:
        writer.write(row)
        if acts is not None:
          writer.histograms(done, jax.device_get(state.params), acts)
      checkpoints.save(done, state, {**meta_base, 'step': done, 'epoch': row['epoch'],
                                     'wall_time': row['wall_time']},
                       {'val_accuracy': val['accuracy'], 'val_loss': val['loss']})
      if val['accuracy'] > best_acc:
        best_acc, since_best = val['accuracy'], 0
      else:
        since_best += 1
      if patience and since_best >= patience and done < total:
        log(f'early stop at step {done}: no new best val_accuracy in {patience} evaluations')
        if writer:
          writer.close()
        return _finish(rundir, checkpoints, done, log, primary, time.time() - run_start,
                       stopped_early=True)
      sums = eng.zero_sums()
      segment_start = time.time()   # evaluation and saving are not train time
      window_start = segment_start
      if stop_after_step is not None and done >= stop_after_step and done < total:
        checkpoints.wait()
        raise Preempted(f'stopped after step {done} (stop_after_step)')
  except (Exception, KeyboardInterrupt) as e:
    if not isinstance(e, Preempted) and primary:
      rundir.set_status('failed', f'{type(e).__name__}: {e}')
    if writer:
      writer.close()
    raise
  if writer:
    writer.close()
  return _finish(rundir, checkpoints, total, log, primary, time.time() - run_start)


def _finish(rundir, checkpoints, final: int, log, primary: bool,
            seconds: Optional[float] = None, stopped_early: bool = False) -> Dict[str, Any]:
  """Marks the run done at step `final`, with its best and final val accuracy
  (from metrics.jsonl); the best checkpoint is the one evaluation uses."""
  checkpoints.wait()
  best = checkpoints.best_step()
  status = {'step': final, 'total_steps': rundir.read_status().get('total_steps', final),
            'best_step': best, 'stopped_early': stopped_early}
  if primary:
    rows = {r['step']: r for r in rundir.read_metrics()}
    status['best_val_accuracy'] = rows.get(best, {}).get('val_accuracy')
    status['final_val_accuracy'] = rows.get(final, {}).get('val_accuracy')
    rundir.set_status('done', **status)
    took = f' in {format_duration(seconds)}' if seconds is not None else ''
    log(f'done{took}: final val_accuracy {status["final_val_accuracy"]:.4f}, '
        f'best {status["best_val_accuracy"]:.4f} at step {best}')
  checkpoints.close()
  return {'status': 'done', **status}


def _diverged(rundir, checkpoints, writer, step: int, log, primary) -> Dict[str, Any]:
  reason = (f'loss not finite at step {step}; kept the last good checkpoint '
            f'(step {checkpoints.latest_step()}); lower optim.lr or set optim.clip_norm')
  checkpoints.wait()
  if primary:
    rundir.set_status('diverged', reason, step=step)
  if writer:
    writer.close()
  log(f'diverged: {reason}')
  checkpoints.close()
  return {'status': 'diverged', 'reason': reason, 'step': step}
