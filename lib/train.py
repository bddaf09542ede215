"""train_and_evaluate: one run from config to checkpoints, resumable.

Resuming restores the latest checkpoint (saved at evaluation points, where the
running train metrics restart) and the data order and RNG are functions of
(seed, epoch) and (seed, step), so a resumed run reproduces an uninterrupted
one exactly. The run's files are kept by a RunBook (lib/runbook.py), shared
with the loop that trains many arms at once (lib/group_train.py).
"""
import time
from typing import Any, Dict, Optional

import jax
import numpy as np

from lib import data, engine, sharding
from lib.metrics import echo, progress_line
from lib.runbook import RunBook


class Preempted(Exception):
  """Raised by the `stop_after_step` debug hook, as if the process were killed."""


def is_eval_step(done: int, total: int, steps_per_epoch: int, eval_every: int) -> bool:
  if done == total:
    return True
  return done % (eval_every if eval_every > 0 else steps_per_epoch) == 0


def checkpoint_meta(eng) -> Dict[str, Any]:
  """What every checkpoint records beside the state, so evaluation needs only the workdir."""
  return {'mean': eng.mean.tolist(), 'std': eng.std.tolist(),
          'num_classes': eng.dataset.num_classes, 'image_shape': list(eng.dataset.image_shape)}


def train_and_evaluate(config, workdir: str, *, fresh: bool = False, mesh=None,
                       stop_after_step: Optional[int] = None, log=echo,
                       hparams: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds this config's run).

  `hparams` (default: the flattened config) go to TensorBoard's HParams tab.
  Returns the final status record. Bad input raises UserError before anything
  is written to disk.
  """
  book = RunBook(config, workdir, fresh=fresh, log=log, hparams=hparams)   # reads only
  config = book.config
  dataset = data.load(config.data)                    # may fail: nothing written yet
  mesh = mesh if mesh is not None else sharding.make_mesh()
  eng = engine.Engine(config, dataset, mesh)
  try:
    finished = book.open(eng.total_steps)             # takes the run's lock
    if finished is not None:
      return finished
    return _train(eng, book, log, stop_after_step)
  finally:
    book.release()


def _train(eng, book: RunBook, log, stop_after_step: Optional[int]) -> Dict[str, Any]:
  """The loop of train_and_evaluate, from the open RunBook `book` on."""
  config, dataset, mesh = eng.config, eng.dataset, eng.mesh
  total, spe = eng.total_steps, eng.steps_per_epoch
  try:
    state = book.restore(eng.abstract_state())
    state = eng.owned(state) if state is not None else eng.init_state()
    start = book.start
    finished = book.begin()
    if finished is not None:
      return finished
    log(f'training {config.model.name} on {config.data.source} '
        f'({len(dataset.train[1])} train / {len(dataset.val[1])} val images) for {total} steps '
        f'on {mesh.devices.size} device(s), batch {config.train.batch_size}')

    meta_base = checkpoint_meta(eng)
    batch = config.train.batch_size
    sums = eng.zero_sums()
    epoch_indices, current_epoch = None, -1
    window_start, window_examples = time.time(), 0   # for examples/s since the last log
    train_time = 0.0                                  # excludes evaluation, for the ETA
    segment_start = time.time()
    for step in range(start, total):
      if step // spe != current_epoch:
        current_epoch = step // spe
        epoch_indices = eng.epoch_indices(current_epoch)
      state, sums = eng.train_step(state, epoch_indices, sums)
      done = step + 1
      window_examples += batch
      is_eval = is_eval_step(done, total, spe, config.train.eval_every)
      if not (is_eval or done % config.train.log_every == 0):
        continue
      host = jax.device_get(sums)          # the only sync between evaluations
      if host['first_nonfinite_step'] >= 0:
        return book.diverged(int(host['first_nonfinite_step']))
      now = time.time()
      train_time += now - segment_start
      segment_start = now
      speed = window_examples / max(now - window_start, 1e-9)
      window_start, window_examples = now, 0
      eta = train_time / (done - start) * (total - done)
      train_loss = float(host['loss'] / host['steps'])
      train_acc = float(host['correct'] / host['examples'])
      lr = eng.learning_rate(step)
      log(progress_line(done, total, spe, train_loss, train_acc, lr, speed, eta))
      if not is_eval:
        continue
      val = eng.evaluate(state, 'val')
      if not np.isfinite(val['loss']):   # never checkpoint a state that cannot predict
        return book.diverged(done)
      train_eval = eng.evaluate(state, engine.TRAIN_EVAL)
      # Every process runs the same programs (multi-host); only the primary writes.
      histograms = None
      if config.train.tb_histograms:
        histograms = (jax.device_get(state.params), eng.activations(state))
      row = book.log_eval(done, spe, train_loss, train_acc, val, train_eval, lr, speed,
                          histograms)
      book.save(row, state, meta_base)   # asynchronous: returns once off the devices
      stopped = book.stop_early(done, val['accuracy'])
      if stopped is not None:
        return stopped
      sums = eng.zero_sums()
      segment_start = time.time()   # evaluation and saving are not train time
      window_start = segment_start
      if stop_after_step is not None and done >= stop_after_step and done < total:
        book.checkpoints.wait()
        raise Preempted(f'stopped after step {done} (stop_after_step)')
    # Inside the try: the last save's background write may fail here (a full disk),
    # and the run must then end 'failed', not stay 'running'.
    return book.finish(total, time.time() - book.run_start)
  except (Exception, KeyboardInterrupt) as e:
    if not isinstance(e, Preempted):
      book.fail(e)
    raise
