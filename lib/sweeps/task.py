"""One job of a sweep, in whatever process runs it (this one, a worker, a SLURM task):
a run (`run_task`) or runs that share a program trained together (`run_group`), each
followed by the test evaluation of its best checkpoint (`_test`). A failed run is
recorded in its status.json and returned, never raised, so the sweep goes on; a job
whose process died is accounted for by `_job_lost`.
"""
import os
import time
import traceback
from typing import Any, Dict, List, Optional, Sequence

from lib.core import config as config_lib
from lib.core.errors import UserError, failure_reason
from lib.runs import lock as lock_lib
from lib.runs.metrics import echo
from lib.runs.rundir import RunDir
from lib.sweeps.plan import SKIP


class Killed(Exception):
  """A run stopped by the debug hook, as if the sweep process were killed."""


def _arm_log(task: Dict[str, Any], primary: bool):
  """(log function, file) for a run: its log.txt, and the console if task['echo'].
  Only process 0 of a multi-process job touches the run directory (the others would
  create it, racing process 0's lock and archive)."""
  log_file = None
  if primary:
    os.makedirs(task['workdir'], exist_ok=True)
    log_file = open(os.path.join(task['workdir'], 'log.txt'), 'a')

  def log(message):
    if log_file:
      log_file.write(message + '\n')
      log_file.flush()
    if task.get('echo') and primary:
      echo(f'  {message}')
  return log, log_file


def _failed(workdir: str, e: Exception, log, log_file, primary: bool) -> Dict[str, Any]:
  """Records that a run failed with `e`: its log (with the traceback) and status.json."""
  reason = failure_reason(e)
  log(f'failed: {reason}')
  if log_file:
    log_file.write(traceback.format_exc())
  return _record_failure(workdir, reason, primary)


def _record_failure(workdir: str, reason: str, primary: bool = True) -> Dict[str, Any]:
  """Marks a run failed, unless another live process holds it now: its status is
  then not ours to set (the result says 'held')."""
  holder = lock_lib.live_holder(workdir)
  if holder is not None:
    return {'status': 'held', 'reason': f'held by {lock_lib.describe(holder)}'}
  if primary and os.path.isdir(workdir):
    RunDir(workdir).set_status('failed', reason)
  return {'status': 'failed', 'reason': reason}


def _job_lost(job, reason: str, pid: Optional[int] = None,
              slurm_job: Optional[str] = None) -> List[Dict[str, Any]]:
  """The results of a job whose process ended without sending them (a dead worker,
  a failed array task): its own lock is removed, runs that had ended keep their
  status, the others fail with `reason` (unless another process holds them)."""
  out = []
  for task in _job_tasks(job):
    lock_lib.remove_dead(task['workdir'], pid=pid, job=slurm_job)
    ended = RunDir(task['workdir']).read_status()
    result = ended if ended.get('status') in SKIP else _record_failure(task['workdir'], reason)
    out.append({**result, 'arm': task['arm'], 'seed': task['seed']})
  return out


def run_task(task: Dict[str, Any]) -> Dict[str, Any]:
  """Trains one run of a sweep (resuming it if interrupted), then evaluates its best
  checkpoint on the test split. Never raises for a failed run: the failure is
  recorded in its status.json and returned, so the sweep goes on. In a job of
  several processes it raises after recording it: the failure may be this
  process's alone (a full disk), and the others would wait for it in a collective."""
  from lib.core import sharding
  sharding.initialize_distributed(task.get('distributed', 'off'))
  import jax
  from lib.runs import evaluate
  from lib.runs import train
  primary = jax.process_index() == 0
  rundir = RunDir(task['workdir'])
  log, log_file = _arm_log(task, primary)
  start = time.time()
  try:
    config = config_lib.from_resolved_json_dict(task['config'])   # resolved by plan
    hparams = {'arm': task['arm'], **config_lib.flatten(task['config'])}
    status = train.train_and_evaluate(config, task['workdir'], log=log, hparams=hparams,
                                      stop_after_step=task.get('stop_after_step'))
    if status.get('status') == 'done' and 'test' not in status:
      status = _test(rundir, evaluate, status, log, primary)
  except train.Preempted as e:
    raise Killed(str(e)) from None
  except lock_lib.LockHeld as e:   # another process trains this run: touch nothing
    log(f'skipped: {e}')
    status = {'status': 'held', 'reason': str(e)}
  except Exception as e:   # recorded, and the sweep goes on
    status = _failed(task['workdir'], e, log, log_file, primary)
    if sharding.joined():   # perhaps this process's alone: the others would wait for it
      raise
  finally:
    if log_file:
      log_file.close()
  return {**status, 'arm': task['arm'], 'seed': task['seed'], 'seconds': time.time() - start}


def run_group(tasks: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
  """Trains runs that share a program (lib/training/arms.py) together as arms of one
  compiled program (lib/runs/group_train.py), then evaluates each arm's best
  checkpoint on the test split, as run_task does for one run. A failure fails
  the arms that had not ended (recorded in their status.json); the sweep goes on."""
  from lib.core import sharding
  sharding.initialize_distributed(tasks[0].get('distributed', 'off'))
  import jax
  from lib.runs import evaluate
  from lib.runs import group_train
  from lib.runs import train
  primary = jax.process_index() == 0
  logs = [_arm_log({**t, 'echo': False}, primary) for t in tasks]
  echo_group = tasks[0].get('echo') and primary
  group_log = (lambda m: echo(f'  {m}')) if echo_group else (lambda m: None)
  start = time.time()
  try:
    configs = [config_lib.from_resolved_json_dict(t['config']) for t in tasks]
    hparams = [{'arm': t['arm'], **config_lib.flatten(t['config'])} for t in tasks]
    statuses = group_train.train_group(
        configs, [t['workdir'] for t in tasks], logs=[l for l, _ in logs], log=group_log,
        hparams=hparams, stop_after_step=next((t['stop_after_step'] for t in tasks
                                                if t.get('stop_after_step') is not None), None))
  except train.Preempted as e:
    raise Killed(str(e)) from None
  except Exception as e:   # recorded in every arm that had not ended; the sweep goes on
    group_log(f'failed: {type(e).__name__}: {e}')
    statuses = []
    for task, (log, log_file) in zip(tasks, logs):
      ended = RunDir(task['workdir']).read_status()
      statuses.append(ended if ended.get('status') in SKIP
                      else _failed(task['workdir'], e, log, log_file, primary))
    if sharding.joined():   # as run_task
      raise
  try:
    for i, (task, status) in enumerate(zip(tasks, statuses)):
      if status.get('status') == 'done' and 'test' not in status:
        try:
          statuses[i] = _test(RunDir(task['workdir']), evaluate, status, logs[i][0], primary)
        except Exception as e:   # as run_task: this run failed (a rerun retries its test)
          statuses[i] = _failed(task['workdir'], e, *logs[i], primary)
          if sharding.joined():
            raise
  finally:
    for _, log_file in logs:
      if log_file:
        log_file.close()
  seconds = time.time() - start
  return [{**s, 'arm': t['arm'], 'seed': t['seed'], 'seconds': seconds}
          for t, s in zip(tasks, statuses)]


def _test(rundir: RunDir, evaluate, status: Dict[str, Any], log, primary: bool):
  """Test accuracy of the best checkpoint, kept in status.json (not used for selection)."""
  try:
    result = evaluate.evaluate_checkpoint(rundir.path, 'best', 'test')
  except UserError as e:   # e.g. a dataset without a test split
    log(f'no test evaluation: {e}')
    if primary and 'no test split' in str(e):   # said once: a rerun does not try again
      record = rundir.read_status()
      record.update(test_skipped=str(e))
      rundir.set_status(**{k: v for k, v in record.items() if k != 'updated'})
    return status
  top5 = f', top-5 {result["top5_accuracy"]:.4f}' if 'top5_accuracy' in result else ''
  log(f'test accuracy of the best checkpoint (step {result["step"]}): {result["accuracy"]:.4f}'
      f'{top5}')
  status = {**status, 'test': result}
  if primary:
    record = rundir.read_status()
    record.update(test=result)
    rundir.set_status(**{k: v for k, v in record.items() if k != 'updated'})
  return status


def _run_job(job):
  """A job is one task (run_task) or a list of tasks trained together (run_group)."""
  return run_group(job) if isinstance(job, list) else [run_task(job)]


def _job_tasks(job) -> List[Dict[str, Any]]:
  return job if isinstance(job, list) else [job]
