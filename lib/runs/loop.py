"""The training loop: the arms of one compiled program trained together, each arm
an ordinary run kept by its RunBook (lib/runs/runbook.py). A single run is a group of
one: lib/runs/train.py hands it in through an adapter around the plain engine.Engine
step (no arm axis), lib/runs/group_train.py a VectorEngine's arms. Early stopping,
divergence, the evaluation cadence, progress lines and checkpoints are decided
here, once, for both.

Checkpoints. Saving costs the same per arm however the arms are trained, so an
arm's checkpoint is saved only where it is needed: at a new best val accuracy
(or a tie: Orbax keeps the latest of equals), at the arm's last step (the end or
an early stop) and at resume points, evaluations at least
`train.checkpoint_every_s` seconds (default 60; 0: every evaluation) after the
arm's previous one; `stop_after_step` makes its evaluation a resume point. A
finished run keeps its latest and its best (lib/runs/checkpoint.py); a kill loses at
most checkpoint_every_s seconds of training plus one evaluation interval.

Resume. Each arm restores its own latest checkpoint; the data order and RNG are
functions of (seed, epoch) and (seed, step), so a resumed run reproduces an
uninterrupted one exactly. Arms that are behind train while the others wait
(frozen by the step's `active` mask), then all go on together.

An error of one arm (no checkpoint restores; its lock taken over) ends that arm
and the others go on; a run trained alone raises it.

Repacking (train.repack, on by default). An arm that ended (early stopping,
divergence, an error of its own) is frozen by the step's mask but still costs its
share of every step. At an evaluation, once a quarter of the program's arms have
ended and at least an epoch of training is left, the live arms go on in a program
of their own: VectorEngine.repacked compiles it and carries their states over
exactly, and since an arm's data order and random streams are functions of its
own seed and the step, it goes on as it would have. Its metrics equal those
without repacking up to float rounding (the new program may split the devices
differently, as a group of those arms would). Not while a live arm waits for the
others to reach its start (a resumed group): that program is repacked at a later
evaluation. The decision reads only the arms' statuses and the step, which every
process of a multi-host job has alike. `finished` keeps the arms' indices in the
first program; the group log and each live arm's log.txt say where it repacked.
"""
import time
from typing import Any, Dict, List, Optional, Sequence

import jax
import numpy as np

from lib.core import profiling, sharding
from lib.data import device
from lib.runs import lock as lock_lib
from lib.runs import tying
from lib.runs.checkpoint import NoValidCheckpoint
from lib.runs.metrics import format_duration, progress_line
from lib.runs.runbook import RunBook
from lib.training import state as state_lib


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


def abandon(books: Sequence[RunBook], e: BaseException) -> None:
  """Records `e` in runs it ends before their time: failed, or only their writers
  closed when it is Preempted (as if killed: the run resumes later)."""
  for b in books:
    b.close_writer() if isinstance(e, Preempted) else b.fail(e)


def _summary(values: Sequence[float], fmt: str = '.4f') -> str:
  if len(values) == 1:
    return format(values[0], fmt)
  return f'{np.mean(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})'


def _header(eng, books: Sequence[RunBook], starts: List[int], log) -> None:
  """The 'training ...' lines: the run's own, or the group's and each arm's."""
  cfg, total = eng.program, eng.total_steps
  what = (f'{cfg.model.name} on {cfg.data.source} ({eng.dataset.num_examples("train")} train / '
          f'{eng.dataset.num_examples("val")} val images) for {total} steps')
  if not eng.grouped:
    books[0].log(f'training {what} on {eng.mesh.devices.size} device(s), batch '
                 f'{cfg.train.batch_size}')
    books[0].log(f'input pipeline: {eng.base.pipeline} ({eng.base.pipeline_reason})')
    return
  log(f'training {eng.n} arms of {what} as one program ({eng.mode}; mesh '
      f'{eng.mesh.shape[sharding.ARMS]} arms x {eng.mesh.shape[sharding.DATA]} data), batch '
      f'{cfg.train.batch_size} per arm'
      + (f'; resuming from steps {sorted(set(starts))}' if max(starts) > 0 else ''))
  for i, b in enumerate(books):
    b.log(f'training as arm {i + 1} of {eng.n} in one program ({eng.mode})')


def _restore(eng, books: Sequence[RunBook], finished: Dict[int, Dict[str, Any]]):
  """The arms' states stacked: each arm's latest checkpoint that restores, or its init."""
  restored = []
  for i, b in enumerate(books):
    try:
      restored.append(b.restore(eng.abstract_arm_state()))
    except NoValidCheckpoint as e:   # this arm cannot go on; the others can
      if not eng.grouped:
        raise
      b.fail(e)
      finished[i] = {'status': 'failed', 'reason': str(e)}
      restored.append(None)
  fresh = [i for i, s in enumerate(restored) if s is None]
  # The weights regularize.tie_to names, read once (the arms of a program share it).
  ref = tying.reference(eng.program, eng.abstract_arm_state().params) if fresh else None
  return eng.stack([s if s is not None else eng.init_arm(i, ref) for i, s in enumerate(restored)])


class _Renumbered(dict):
  """Final statuses by an arm's place in the current (repacked) program, each also
  written to `out` under the arm's index in the first program, the caller's."""

  def __init__(self, out: Dict[int, Dict[str, Any]], ids: Sequence[int]):
    super().__init__()
    self.out, self.ids = out, list(ids)

  def __setitem__(self, i: int, status: Dict[str, Any]) -> None:
    super().__setitem__(i, status)
    self.out[self.ids[i]] = status


def repack_pays(n: int, live: Sequence[int], starts: Sequence[int], done: int, total: int,
                steps_per_epoch: int) -> bool:
  """Whether to repack a program of `n` arms to its `live` ones after step `done`: a
  quarter of them ended, an epoch or more is left, and no live arm waits for a later
  start (they are all at `done`)."""
  return (0 < len(live) and n - len(live) >= n / 4 and total - done >= steps_per_epoch
          and all(starts[i] <= done for i in live))


def _repack(eng, state, live: List[int], books: Sequence[RunBook], done: int, log):
  """The live arms' engine and states (VectorEngine.repacked), with the lines that say so."""
  t0 = time.time()
  new, state = eng.repacked(state, live)
  mesh = f'mesh {new.mesh.shape[sharding.ARMS]} arms x {new.mesh.shape[sharding.DATA]} data'
  log(f'repacked at step {done}: {eng.n - len(live)} of {eng.n} arms ended; recompiled for '
      f'the {new.n} live arm{"s" if new.n > 1 else ""} ({new.mode}; {mesh}) in '
      f'{time.time() - t0:.1f} s')
  for j, i in enumerate(live):
    books[i].log(f'repacked at step {done}: {eng.n - len(live)} of {eng.n} arms ended; '
                 f'training as arm {j + 1} of {new.n} in one program ({new.mode})')
  return new, state


def train_arms(eng, books: Sequence[RunBook], log, *, stop_after_step: Optional[int] = None,
               checkpoint_every_s: Optional[float] = None,
               finished: Optional[Dict[int, Dict[str, Any]]] = None,
               repack: Optional[bool] = None) -> Dict[int, Dict[str, Any]]:
  """Trains the arms of `eng` (one per open RunBook of `books`) to their ends;
  returns {arm: final status}. Each status goes into `finished` as its arm ends, so
  a caller knows which arms ended if this raises. `log` gets a group's own lines;
  `checkpoint_every_s` (default: each arm's train.checkpoint_every_s) the policy above;
  `repack` (default: the program's train.repack) whether a group repacks as above.
  train.profile_steps traces those steps into the first arm's W/profile."""
  profiler = profiling.StepProfiler(eng.program.train.profile_steps, books[0].workdir,
                                    log=books[0].log)
  try:
    return _train_arms(eng, books, log, profiler, stop_after_step=stop_after_step,
                       checkpoint_every_s=checkpoint_every_s, finished=finished, repack=repack)
  finally:
    profiler.stop()   # a trace still running when training ended or failed


def _train_arms(eng, books: Sequence[RunBook], log, profiler: profiling.StepProfiler, *,
                stop_after_step: Optional[int], checkpoint_every_s: Optional[float],
                finished: Optional[Dict[int, Dict[str, Any]]],
                repack: Optional[bool]) -> Dict[int, Dict[str, Any]]:
  finished = {} if finished is None else finished
  out = finished   # keyed by the arms' indices in `eng`, which repacking renumbers
  repack = eng.grouped and (eng.program.train.repack if repack is None else repack)
  ids = list(range(eng.n))   # each current arm's index in the first program
  n, total, spe = eng.n, eng.total_steps, eng.steps_per_epoch
  state = _restore(eng, books, finished)
  for i, b in enumerate(books):
    status = b.begin() if i not in finished else None
    if status is not None:
      finished[i] = status
  starts = [b.start for b in books]
  todo = [i for i in range(n) if i not in finished]
  if not todo:
    return finished
  _header(eng, books, starts, log)
  every = [b.config.train.checkpoint_every_s if checkpoint_every_s is None
           else checkpoint_every_s for b in books]
  cfg = eng.program   # the first program's cadence (log_every, a watch key) stays after a repack
  ema = state_lib.has_ema(cfg)   # the arms of one program all keep one, or none do
  meta_base = checkpoint_meta(eng.base)
  batch = cfg.train.batch_size
  sums = eng.zero_sums()
  window_start, window_steps = time.time(), 0       # for examples/s since the last log
  train_time, segment_start, steps_run = 0.0, time.time(), 0   # excludes evaluation: the ETA
  last_resume_point = [time.time()] * n
  group_start = time.time()
  # Which arms step: it changes only where an arm's start is reached and where arms
  # end (at log points), so it is rebuilt there, not on the host at every step.
  active, stale, start_steps = None, True, set(starts)
  for step in range(min(starts[i] for i in todo), total):
    if stale or step in start_steps:
      active = np.array([i not in finished and starts[i] <= step for i in range(n)])
      stale = False
    if not active.any():   # every arm ended, or the rest start later (resumed further on)
      if len(finished) == n:
        break
      continue
    profiler.before(step)
    state, sums = eng.train_step(state, eng.step_inputs(step), sums, active)
    profiler.after(step, state)
    done = step + 1
    window_steps += 1
    steps_run += 1
    is_eval = is_eval_step(done, total, spe, cfg.train.eval_every)
    if not (is_eval or done % cfg.train.log_every == 0):
      continue
    stale = True   # arms may end from here on
    # The only sync between evaluations; a single run's 0-d sums become one arm's.
    host = jax.tree.map(np.atleast_1d, jax.device_get(sums))
    stepped = [i for i in range(n) if active[i]]
    for i in stepped:
      if host['first_nonfinite_step'][i] >= 0:
        finished[i] = books[i].diverged(int(host['first_nonfinite_step'][i]))
    stepped = [i for i in stepped if i not in finished]
    now = time.time()
    train_time += now - segment_start
    segment_start = now
    speed = window_steps * batch / max(now - window_start, 1e-9)   # per arm
    window_start, window_steps = now, 0
    eta = train_time / steps_run * (total - done)
    lrs = eng.learning_rates(step)
    losses = {i: float(host['loss'][i] / host['steps'][i]) for i in stepped}
    accs = {i: float(host['correct'][i] / host['examples'][i]) for i in stepped}
    for i in stepped:
      books[i].log(progress_line(done, total, spe, losses[i], accs[i], lrs[i], speed, eta))
    if stepped and eng.grouped:
      log(f'step {done:>{len(str(total))}}/{total} | epoch {done / spe:6.2f} | '
          f'{len(stepped)} arms: train_loss {_summary(list(losses.values()))} '
          f'train_acc {_summary(list(accs.values()))} | {speed:,.0f} ex/s per arm, '
          f'{speed * len(stepped):,.0f} in all | ETA {format_duration(eta)}')
    if not is_eval:
      continue
    vals = eng.evaluate(state, 'val') if stepped else []
    for i in stepped:
      if not np.isfinite(vals[i]['loss']):   # never checkpoint a state that cannot predict
        finished[i] = books[i].diverged(done)
    stepped = [i for i in stepped if i not in finished]
    train_evals = eng.evaluate(state, device.TRAIN_EVAL) if stepped else []
    # The moving average of the weights (train.ema_decay), evaluated beside them.
    emas = eng.evaluate(state_lib.ema_view(state), 'val') if stepped and ema else [None] * n
    # The accuracy that picks the best checkpoint and stops early: the EMA's or the weights'.
    chosen = {i: books[i].chosen(vals[i], emas[i]) for i in stepped}
    stopping = stop_after_step is not None and done >= stop_after_step and done < total
    due = sharding.agree([time.time() - last_resume_point[i] >= every[i] for i in range(n)])
    resume_points = [i for i in stepped if done == total or stopping or due[i]]
    save = [i for i in stepped if i in resume_points
            or books[i].is_best_checkpoint(chosen[i])
            or books[i].stops_at(done, chosen[i])]
    for i in stepped:
      _evaluated(eng, books[i], i, state, done, losses[i], accs[i], vals[i], emas[i],
                 train_evals[i], lrs[i], speed, i in save, meta_base, finished)
    for i in resume_points:
      last_resume_point[i] = time.time()
    if stepped and eng.grouped:
      accs_val = [chosen[i] for i in stepped]
      log(f'  eval step {done}: val_accuracy {_summary(accs_val)} over {len(stepped)} arms'
          f' ({len(save)} checkpoints saved)')
    if stopping and len(finished) < n:
      for b in books:
        b.checkpoints.wait()
      raise Preempted(f'stopped after step {done} (stop_after_step)')
    live = [i for i in range(n) if i not in finished]
    if repack and repack_pays(n, live, starts, done, total, spe):
      if not eng.can_repack(len(live)):   # the live arms' mesh would not split the batch
        log(f'not repacking: a program of {len(live)} arms would not split the batch of '
            f'{batch} over its devices')
        repack = False
      else:   # the same arms in a smaller program: each list renumbered alike
        eng, state = _repack(eng, state, live, books, done, log)
        ids = [ids[i] for i in live]
        books, starts, every, last_resume_point = (
            [x[i] for i in live] for x in (books, starts, every, last_resume_point))
        n, finished = eng.n, _Renumbered(out, ids)
        stale, start_steps = True, set(starts)
    sums = eng.zero_sums()
    segment_start = time.time()   # evaluation and saving are not train time
    window_start = segment_start
  seconds = time.time() - group_start
  for i, b in enumerate(books):
    if i not in finished:   # the last save's background write may fail here (a full disk)
      finished[i] = b.finish(total, seconds)
  if eng.grouped:
    best = [s['best_val_accuracy'] for s in out.values()
            if s.get('status') == 'done' and s.get('best_val_accuracy') is not None]
    log(f'done in {format_duration(seconds)}: ' + (
        f'best val_accuracy {_summary(best)} over {len(best)} arms' if best
        else 'no arm finished'))
  return out


def _evaluated(eng, book: RunBook, i: int, state, done: int, loss: float, acc: float,
               val: Dict[str, float], val_ema: Optional[Dict[str, float]],
               train_eval: Dict[str, float], lr: float, speed: float, save: bool,
               meta_base: Dict[str, Any], finished: Dict[int, Dict[str, Any]]):
  """Arm i's evaluation written: its metrics row, histograms, checkpoint (`save`)
  and early stopping."""
  histograms, arm_state = None, None
  if save or book.config.train.tb_histograms:   # one arm's copy at a time
    arm_state = eng.arm_state(state, i)
  # Every process runs the same programs (multi-host); only the primary writes.
  if book.config.train.tb_histograms:
    histograms = (jax.device_get(arm_state.params), eng.base.activations(arm_state))
  try:
    row = book.log_eval(done, eng.steps_per_epoch, loss, acc, val, train_eval, lr, speed,
                        histograms, val_ema)
    if save:
      book.save(row, arm_state, meta_base)   # asynchronous: returns once off the devices
  except lock_lib.LockHeld as e:
    if jax.process_count() > 1 or not eng.grouped:   # only process 0 checks locks: end together
      raise
    # Another process took this arm's run over: it stops here, writing nothing more
    # (its run is the other process's now); the other arms go on.
    book.log(f'stopped: {e}')
    book.close_writer()
    finished[i] = {'status': 'held', 'reason': str(e)}
    return
  finally:
    del arm_state
  status = book.stop_early(done, book.chosen(val, val_ema))
  if status is not None:
    finished[i] = status
