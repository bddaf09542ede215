"""train_group: runs that share a program (lib/arms.py) trained together as arms.

Every arm is an ordinary run kept by a RunBook (lib/runbook.py): its own
config.json, status.json, metrics.jsonl, TensorBoard events and Orbax
checkpoints, the files train_and_evaluate would leave. Its metrics equal those
of its separate run up to float rounding: same init, data order, random
streams and strengths (tests/test_vectorize.py). As between 1 and 4 devices,
rounding differences can grow in long, noisy runs (dropout 0.5: 1e-3 in the
train loss within 6 epochs, either way).

Checkpoints. Saving costs the same per arm however the arms are trained, so a
group saves an arm's checkpoint only where it is needed: at a new best val
accuracy (or a tie: Orbax keeps the latest of equals), at the arm's last step
(the end or an early stop) and at resume points, evaluations at least
`resume_every_s` seconds after the previous one.
A finished arm's checkpoints are those of its separate run: the latest and the
best. A kill loses at most `resume_every_s` seconds of training plus one
evaluation interval.

Resume. Each arm restores its own latest checkpoint. Arms that are behind
train while the others wait (frozen by the step's `active` mask), then all go
on together. So a group may mix runs killed at different steps, or started
one by one before.

Memory. The arms are split into programs that fit the devices: XLA's memory
analysis of the compiled step against 90% of an accelerator's memory (half
the host's for CPU devices), or at most `max_arms` per program.
"""
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from lib import arms as arms_lib
from lib import data, engine, sharding
from lib import lock as lock_lib
from lib import vector_engine as ve
from lib.checkpoint import NoValidCheckpoint
from lib.errors import UserError
from lib.metrics import echo, format_duration, progress_line
from lib.runbook import RunBook
from lib.train import Preempted, checkpoint_meta, is_eval_step

RESUME_EVERY_S = 60.0


def _agree(value):
  """Process 0's value on every process: choices from clocks or local memory must not
  differ between the hosts of one program (they would run different collectives)."""
  if jax.process_count() == 1:
    return value
  return multihost_utils.broadcast_one_to_all(np.asarray(value)).item()


def plan_programs(configs: Sequence, dataset, devices, mode: str, max_arms: int = 0,
                  memory_budget: Optional[int] = None, log=echo):
  """(indices of `configs` per program, the engine of the first program): at
  most `max_arms` arms each (0: no cap), fewer where the compiled step would not
  fit `memory_budget` bytes per device. The engine's step is compiled already."""
  n = len(configs)
  sizes = arms_lib.chunk_sizes(n, max_arms or n)
  budget = _agree(memory_budget if memory_budget is not None
                  else ve.device_memory_budget(devices))
  while True:   # memory grows about linearly with the arms: one or two compiles
    eng = ve.VectorEngine(configs[:sizes[0]], dataset, devices, mode)
    need = eng.bytes_per_device()
    if need is None or need <= budget or sizes[0] == 1:
      break
    cap = max(1, min(sizes[0] - 1, int(budget // (need / sizes[0]))))
    log(f'{sizes[0]} arms need {need / 2**20:,.0f} MiB per device, over the '
        f'{budget / 2**20:,.0f} MiB budget: at most {cap} arms per program')
    sizes = arms_lib.chunk_sizes(n, cap)
  out, start = [], 0
  for size in sizes:
    out.append(list(range(start, start + size)))
    start += size
  return out, eng


def train_group(configs: Sequence, workdirs: Sequence[str], *, logs: Optional[Sequence] = None,
                log: Callable = echo, hparams: Optional[Sequence[Dict[str, Any]]] = None,
                stop_after_step: Optional[int] = None, devices=None, mode: Optional[str] = None,
                max_arms: Optional[int] = None, memory_budget: Optional[int] = None,
                resume_every_s: float = RESUME_EVERY_S) -> List[Dict[str, Any]]:
  """Trains every config in its workdir, as arms of as few programs as fit.

  `logs[i]` receives arm i's lines (its log.txt); `log` the group's. mode and
  max_arms default to the first config's train.vectorize_mode / max_arms.
  Returns each arm's final status, in order. Bad input raises UserError before
  anything is written.
  """
  n = len(configs)
  logs = list(logs) if logs is not None else [lambda m: None] * n
  books = [RunBook(c, w, log=l, hparams=h)
           for c, w, l, h in zip(configs, workdirs, logs, hparams or [None] * n)]
  groups, notes = arms_lib.group([b.config_dict for b in books])
  if len(groups) > 1:
    raise UserError(f'these runs cannot share a program: {notes[0]}')
  first = books[0].config
  mode = mode or first.train.vectorize_mode
  max_arms = first.train.max_arms if max_arms is None else max_arms
  devices = list(devices if devices is not None else jax.devices())
  dataset = data.load(first.data)
  total = first.train.epochs * engine.steps_per_epoch(first, dataset)
  batch = first.train.batch_size
  sharding.check_batch(batch, sharding.make_arm_mesh(devices, ve.arm_axis_size(
      len(devices), n, batch, ve.resolve_mode(mode, first, devices[0].platform, n))))

  results: List[Optional[Dict[str, Any]]] = []
  ended: Dict[int, Dict[str, Any]] = {}   # arm -> final status, as soon as it has one
  live: List[int] = []
  try:
    for b in books:
      try:
        results.append(b.open(total))   # takes each arm's lock
      except lock_lib.LockHeld as e:    # trained elsewhere: not this group's to touch
        b.log(f'skipped: {e}')
        results.append({'status': 'held', 'reason': str(e)})
    live = [i for i in range(n) if results[i] is None]
    if live:
      programs, eng = plan_programs([books[i].config for i in live], dataset, devices, mode,
                                    max_arms, memory_budget, log)
      for p, members in enumerate(programs):
        chunk = [live[j] for j in members]
        if len(programs) > 1:
          log(f'program {p + 1}/{len(programs)}: {len(chunk)} arms')
        if p > 0:   # the first program's engine comes compiled from the plan
          eng = ve.VectorEngine([books[i].config for i in chunk], dataset, devices, mode)
        finished: Dict[int, Dict[str, Any]] = {}
        try:
          _train_program(eng, [books[i] for i in chunk], log, stop_after_step, resume_every_s,
                         finished)
        finally:
          ended.update({chunk[j]: status for j, status in finished.items()})
  except (Exception, KeyboardInterrupt) as e:
    for i in live:   # an arm that ended keeps its status; the others record the failure
      if i not in ended:
        books[i].close_writer() if isinstance(e, Preempted) else books[i].fail(e)
    raise
  finally:
    for b in books:
      b.release()
  return [ended.get(i, r) for i, r in enumerate(results)]


def _summary(values: Sequence[float], fmt: str = '.4f') -> str:
  if len(values) == 1:
    return format(values[0], fmt)
  return f'{np.mean(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})'


def _train_program(eng: ve.VectorEngine, books: Sequence[RunBook], log, stop_after_step,
                   resume_every_s: float, finished: Dict[int, Dict[str, Any]]) -> None:
  """Trains the arms of one program, putting each arm's final status in
  `finished` as it ends (so a caller knows which arms ended if this raises)."""
  n, total, spe = eng.n, eng.total_steps, eng.steps_per_epoch
  abstract = eng.abstract_arm_state()
  restored = []
  for i, b in enumerate(books):
    try:
      restored.append(b.restore(abstract))
    except NoValidCheckpoint as e:   # this arm cannot go on; the others can
      b.fail(e)
      finished[i] = {'status': 'failed', 'reason': str(e)}
      restored.append(None)
  state = eng.stack([s if s is not None else eng.init_arm(i) for i, s in enumerate(restored)])
  del restored
  for i, b in enumerate(books):
    status = b.begin() if i not in finished else None
    if status is not None:
      finished[i] = status
  starts = [b.start for b in books]
  todo = [i for i in range(n) if i not in finished]
  if not todo:
    return
  first = min(starts[i] for i in todo)
  cfg = eng.program
  log(f'training {n} arms of {cfg.model.name} on {cfg.data.source} '
      f'({len(eng.dataset.train[1])} train / {len(eng.dataset.val[1])} val images) for '
      f'{total} steps as one program ({eng.mode}; mesh {eng.mesh.shape[sharding.ARMS]} arms x '
      f'{eng.mesh.shape[sharding.DATA]} data), batch {cfg.train.batch_size} per arm'
      + (f'; resuming from steps {sorted(set(starts))}' if max(starts) > 0 else ''))
  for i, b in enumerate(books):
    b.log(f'training as arm {i + 1} of {n} in one program ({eng.mode})')

  meta_base = checkpoint_meta(eng.base)
  batch = cfg.train.batch_size
  sums = eng.zero_sums()
  epoch_indices, current_epoch = None, -1
  window_start, window_steps = time.time(), 0
  train_time, segment_start, steps_run = 0.0, time.time(), 0
  last_resume_point = time.time()
  group_start = time.time()
  for step in range(first, total):
    active = np.array([i not in finished and starts[i] <= step for i in range(n)])
    if not active.any():   # every arm ended, or the rest start later (resumed further on)
      if len(finished) == n:
        break
      continue
    if step // spe != current_epoch:
      current_epoch = step // spe
      epoch_indices = eng.epoch_indices(current_epoch)
    state, sums = eng.train_step(state, epoch_indices, sums, active)
    done = step + 1
    window_steps += 1
    steps_run += 1
    is_eval = is_eval_step(done, total, spe, cfg.train.eval_every)
    if not (is_eval or done % cfg.train.log_every == 0):
      continue
    host = jax.device_get(sums)
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
    if stepped:
      log(f'step {done:>{len(str(total))}}/{total} | epoch {done / spe:6.2f} | '
          f'{len(stepped)} arms: train_loss {_summary(list(losses.values()))} '
          f'train_acc {_summary(list(accs.values()))} | {speed:,.0f} ex/s per arm, '
          f'{speed * len(stepped):,.0f} in all | ETA {format_duration(eta)}')
    if not is_eval:
      continue
    vals = eng.evaluate(state, 'val')
    for i in stepped:
      if not np.isfinite(vals[i]['loss']):   # never checkpoint a state that cannot predict
        finished[i] = books[i].diverged(done)
    stepped = [i for i in stepped if i not in finished]
    train_evals = eng.evaluate(state, engine.TRAIN_EVAL) if stepped else []
    stopping = stop_after_step is not None and done >= stop_after_step and done < total
    resume_point = (done == total or stopping
                    or _agree(time.time() - last_resume_point >= resume_every_s))
    save = [i for i in stepped if resume_point
            or books[i].is_best_checkpoint(vals[i]['accuracy'])
            or books[i].stops_at(done, vals[i]['accuracy'])]
    for i in stepped:
      histograms, arm_state = None, None
      if i in save or books[i].config.train.tb_histograms:   # one arm's copy at a time
        arm_state = eng.arm_state(state, i)
      if books[i].config.train.tb_histograms:
        histograms = (jax.device_get(arm_state.params), eng.base.activations(arm_state))
      try:
        row = books[i].log_eval(done, spe, losses[i], accs[i], vals[i], train_evals[i],
                                lrs[i], speed, histograms)
        if i in save:
          books[i].save(row, arm_state, meta_base)
      except lock_lib.LockHeld as e:
        if jax.process_count() > 1:   # only process 0 checks locks: end together
          raise
        # Another process took this arm's run over: it stops here, writing nothing
        # more (its run is the other process's now); the other arms go on.
        books[i].log(f'stopped: {e}')
        books[i].close_writer()
        finished[i] = {'status': 'held', 'reason': str(e)}
        continue
      finally:
        del arm_state
      status = books[i].stop_early(done, vals[i]['accuracy'])
      if status is not None:
        finished[i] = status
    if resume_point:
      last_resume_point = time.time()
    if stepped:
      accs_val = [vals[i]['accuracy'] for i in stepped]
      log(f'  eval step {done}: val_accuracy {_summary(accs_val)} over {len(stepped)} arms'
          f' ({len(save)} checkpoints saved)')
    sums = eng.zero_sums()
    segment_start = time.time()
    window_start = segment_start
    if stopping:
      for b in books:
        b.checkpoints.wait()
      raise Preempted(f'stopped after step {done} (stop_after_step)')
  seconds = time.time() - group_start
  for i, b in enumerate(books):
    if i not in finished:
      finished[i] = b.finish(total, seconds)
  best = [s['best_val_accuracy'] for s in finished.values()
          if s.get('status') == 'done' and s.get('best_val_accuracy') is not None]
  log(f'done in {format_duration(seconds)}: ' + (
      f'best val_accuracy {_summary(best)} over {len(best)} arms' if best else 'no arm finished'))
