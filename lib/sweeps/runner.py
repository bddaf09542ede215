"""Executing a sweep's runs: here one after another, in parallel worker processes, or
as a SLURM job array through submitit. Every run goes through `run_task`, which calls
the same `train.train_and_evaluate` as `launch.train`; with `vectorize`, runs that share
a program go through `run_group` together (`plan_groups`, lib/runs/group_train.py), and a
job is then a list of tasks.

A sweep directory W holds W/sweep.json (what was launched) and one ordinary run
directory per arm and seed, W/<arm>/seed_<k>. Rerunning skips finished and diverged
runs, resumes interrupted ones from their checkpoints and retries failed ones.
"""
import datetime
import json
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

import submitit

from lib.core import config as config_lib
from lib.core.errors import UserError, failure_reason
from lib.runs import lock as lock_lib
from lib.runs.metrics import echo, format_duration
from lib.runs.rundir import RunDir
from lib.sweeps import sweep as sweep_lib

SWEEP_FILE = 'sweep.json'
SKIP = ('done', 'diverged')   # statuses a rerun leaves alone
EXECUTORS = ('local', 'slurm', 'submitit_local')


class Killed(Exception):
  """A run stopped by the debug hook, as if the sweep process were killed."""


def run_dir(workdir: str, run: sweep_lib.Run) -> str:
  return os.path.join(workdir, run.arm, f'seed_{run.seed}')


def plan(base, runs: Sequence[sweep_lib.Run], workdir: str) -> List[Dict[str, Any]]:
  """One task per run, every config resolved and every run directory checked
  before anything is launched (errors name the arm and key). A task's config is
  the resolved config's JSON dict: run_task and run_group rebuild it without
  resolving it again, here or in a worker process or SLURM task."""
  tasks = []
  for run in runs:
    config = sweep_lib.make_config(base, run)
    config_dict = config_lib.to_json_dict(config)
    path = run_dir(workdir, run)
    rundir = RunDir(path)
    if rundir.has_run():
      differences = config_lib.diff(rundir.read_config(), config_dict)
      if differences:
        raise UserError(f'{path} holds a run of another config ({"; ".join(differences)}): '
                        f'arm {run.arm} changed since it ran; use another --workdir')
    tasks.append({'arm': run.arm, 'seed': run.seed, 'stage': run.stage,
                  'overrides': run.overrides_dict(), 'workdir': path, 'config': config_dict})
  return tasks


def write_manifest(workdir: str, manifest: Dict[str, Any]) -> None:
  """W/sweep.json. A sweep directory belongs to one experiment module and arg."""
  path = os.path.join(workdir, SWEEP_FILE)
  old = read_manifest(workdir)
  if old and 'stage2' in old and 'stage2' not in manifest:
    manifest = {**manifest, 'stage2': old['stage2']}   # derived; rewritten after stage 1
  if old and (old['module'], old.get('arg')) != (manifest['module'], manifest.get('arg')):
    raise UserError(f'{workdir} holds a sweep of {old["module"]}'
                    f'{":" + old["arg"] if old.get("arg") else ""}; use another --workdir')
  if old and old != manifest:   # kept, never overwritten
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S-%f')
    os.makedirs(os.path.join(workdir, 'archive'), exist_ok=True)
    shutil.copy(path, os.path.join(workdir, 'archive', f'sweep-{stamp}.json'))
  os.makedirs(workdir, exist_ok=True)
  with open(path + '.tmp', 'w') as f:
    json.dump(manifest, f, indent=2)
    f.write('\n')
  os.replace(path + '.tmp', path)


def read_manifest(workdir: str) -> Optional[Dict[str, Any]]:
  path = os.path.join(workdir, SWEEP_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _needs_test(status: Dict[str, Any]) -> bool:
  """A finished run whose test evaluation never happened (the process died between
  the two): a rerun evaluates it, and trains nothing."""
  return status.get('status') == 'done' and 'test' not in status and \
      'test_skipped' not in status


def pending(tasks: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
  out = []
  for t in tasks:
    status = RunDir(t['workdir']).read_status()
    if status.get('status') not in SKIP or _needs_test(status):
      out.append(t)
  return out


# ---------------------------------------------------------------- one run, any process


def _arm_log(task: Dict[str, Any], primary: bool):
  """(log function, file) for a run: its log.txt, and the console if task['echo']."""
  os.makedirs(task['workdir'], exist_ok=True)
  log_file = open(os.path.join(task['workdir'], 'log.txt'), 'a') if primary else None

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
  recorded in its status.json and returned, so the sweep goes on."""
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
  try:
    for i, (task, status) in enumerate(zip(tasks, statuses)):
      if status.get('status') == 'done' and 'test' not in status:
        try:
          statuses[i] = _test(RunDir(task['workdir']), evaluate, status, logs[i][0], primary)
        except Exception as e:   # as run_task: this run failed (a rerun retries its test)
          statuses[i] = _failed(task['workdir'], e, *logs[i], primary)
  finally:
    for _, log_file in logs:
      if log_file:
        log_file.close()
  seconds = time.time() - start
  return [{**s, 'arm': t['arm'], 'seed': t['seed'], 'seconds': seconds}
          for t, s in zip(tasks, statuses)]


def plan_groups(tasks: Sequence[Dict[str, Any]], log=echo) -> List[List[Dict[str, Any]]]:
  """The tasks of a vectorized sweep as jobs: runs that share a program go
  together (at most train.max_arms per job; 0 = no cap), the others alone. Says
  which runs could not join the largest group, and why."""
  from lib.training import arms
  groups, notes = arms.group([t['config'] for t in tasks])
  jobs = []
  for g in groups:
    cap = tasks[g[0]]['config']['train']['max_arms']
    start = 0
    for size in arms.chunk_sizes(len(g), cap):
      jobs.append([tasks[i] for i in g[start:start + size]])
      start += size
  names = lambda g: ', '.join(sorted({tasks[i]['arm'] for i in g}))
  log(f'vectorized: {len(tasks)} runs in {len(groups)} program group(s)' +
      (f', {len(jobs)} jobs (train.max_arms)' if len(jobs) > len(groups) else ''))
  for k, g in enumerate(groups):
    why = f': {notes[k - 1]}' if k else ''
    log(f'  group {k + 1}: {len(g)} run(s) of arms {names(g)}{why}')
  return jobs


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
  log(f'test accuracy of the best checkpoint (step {result["step"]}): {result["accuracy"]:.4f}')
  status = {**status, 'test': result}
  if primary:
    record = rundir.read_status()
    record.update(test=result)
    rundir.set_status(**{k: v for k, v in record.items() if k != 'updated'})
  return status


# ---------------------------------------------------------------- executors


def _line(i: int, n: int, result: Dict[str, Any]) -> str:
  status = result.get('status')
  if status == 'done':
    what = f'best val {result.get("best_val_accuracy", float("nan")):.4f}'
    if 'test' in result:
      what += f', test {result["test"]["accuracy"]:.4f}'
  else:
    what = f'{status}: {result.get("reason", "")}'
  return f'[{i}/{n}] {result["arm"]}/seed_{result["seed"]} {what} ' \
         f'({format_duration(result.get("seconds", 0))})'


class _Progress:
  def __init__(self, n: int, parallel: int, log):
    self.n, self.parallel, self.log = n, parallel, log
    self.done, self.start = 0, time.time()

  def finished(self, result) -> None:
    self.done += 1
    elapsed = time.time() - self.start
    eta = elapsed / self.done * (self.n - self.done)
    self.log(f'{_line(self.done, self.n, result)} | sweep ETA {format_duration(eta)}')


def _run_job(job):
  """A job is one task (run_task) or a list of tasks trained together (run_group)."""
  return run_group(job) if isinstance(job, list) else [run_task(job)]


def _job_tasks(job) -> List[Dict[str, Any]]:
  return job if isinstance(job, list) else [job]


def run_local(jobs: Sequence, parallel: int = 1, log=echo) -> List[Dict[str, Any]]:
  """One after another in this process (progress on the console), or `parallel`
  worker processes, each with its own share of the local GPUs. A job is a task
  or a list of tasks trained together."""
  n = sum(len(_job_tasks(j)) for j in jobs)
  progress, results = _Progress(n, parallel, log), []
  if parallel <= 1:
    for job in jobs:
      tasks = _job_tasks(job)
      first = progress.done + 1
      what = (f'{tasks[0]["arm"]}/seed_{tasks[0]["seed"]} -> {tasks[0]["workdir"]}'
              if len(tasks) == 1 else f'{len(tasks)} runs as one program')
      log(f'[{first}{"" if len(tasks) == 1 else f"-{first + len(tasks) - 1}"}/{n}] {what}')
      echoed = [{**t, 'echo': True} for t in tasks]
      for result in _run_job(echoed if isinstance(job, list) else echoed[0]):
        progress.finished(result)
        results.append(result)
    return results
  what = f'{n} runs' if len(jobs) == n else f'{n} runs as {len(jobs)} jobs'
  log(f'{what} on {parallel} worker processes; each run logs to <run>/log.txt')
  for out in _run_workers(jobs, parallel):
    for result in out:
      progress.finished(result)
      results.append(result)
  return results


def _run_workers(jobs: Sequence, parallel: int):
  """Yields each job's results as it ends, running `parallel` jobs at once, each in
  a fresh worker process (nothing accumulates across runs) with its own share of
  the GPUs. A worker that dies (killed by the OS, out of memory) fails only the
  runs it held: recorded as 'worker died: signal N' and the sweep goes on."""
  ctx = multiprocessing.get_context('spawn')
  slots = _device_groups(parallel)
  waiting = list(jobs)
  watched: Dict[Any, Dict[str, Any]] = {}   # a process sentinel or its pipe -> its worker
  while waiting or watched:
    while waiting and slots:
      job, slot = waiting.pop(0), slots.pop(0)
      receive, send = ctx.Pipe(duplex=False)
      process = ctx.Process(target=_worker_main, args=(job, slot, send, os.getpid()),
                            name='sweep-worker')
      process.start()
      send.close()
      worker = {'process': process, 'receive': receive, 'job': job, 'slot': slot, 'out': None}
      watched[process.sentinel] = watched[receive] = worker
    for ready in multiprocessing.connection.wait(list(watched)):
      worker = watched.get(ready)
      if worker is None:
        continue
      if ready is worker['receive']:   # read as it comes, so a large result never blocks
        try:
          worker['out'] = ready.recv()
        except (EOFError, OSError):
          pass
        del watched[ready]
        continue
      del watched[ready]
      if worker['receive'] in watched:   # exited: anything still in the pipe
        del watched[worker['receive']]
        try:
          if worker['receive'].poll():
            worker['out'] = worker['receive'].recv()
        except (EOFError, OSError):
          pass
      worker['process'].join()
      worker['receive'].close()
      slots.append(worker['slot'])
      yield (worker['out'] if worker['out'] is not None
             else _worker_died(worker['job'], worker['process']))


def _worker_main(job, slot: Optional[str], send, parent: int) -> None:
  """A worker process: one job, its results sent back, then exit. It exits too if
  the sweep process that started it dies (its runs resume on the next rerun)."""
  _worker_init(slot)
  import threading

  def watch_parent():
    while True:
      time.sleep(1.0)
      if os.getppid() != parent:
        os._exit(1)
  threading.Thread(target=watch_parent, daemon=True).start()
  send.send(_run_job(job))
  send.close()


def _worker_died(job, process) -> List[Dict[str, Any]]:
  """The results of a job whose worker process ended without sending them: runs that
  had ended keep their status, the others fail naming how the worker ended."""
  code = process.exitcode
  if code is not None and code < 0:
    try:
      name = f' ({signal.Signals(-code).name})'
    except ValueError:
      name = ''
    reason = f'worker died: signal {-code}{name}'
  else:
    reason = f'worker died: exit code {code}'
  return _job_lost(job, reason, pid=process.pid)


def _device_groups(parallel: int) -> List[Optional[str]]:
  """CUDA_VISIBLE_DEVICES per worker: the visible GPUs dealt out evenly (None on a
  machine without GPUs, where every worker sees the same CPU devices)."""
  visible = os.environ.get('CUDA_VISIBLE_DEVICES')
  if visible is not None:
    gpus = [g for g in visible.split(',') if g.strip()]
  else:
    try:
      out = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, timeout=20)
      gpus = [str(i) for i, l in enumerate(out.stdout.splitlines()) if l.startswith('GPU')]
    except (OSError, subprocess.SubprocessError):
      gpus = []
  if not gpus:
    return [None] * parallel
  if len(gpus) < parallel:
    raise UserError(f'--parallel={parallel} needs at least as many GPUs; {len(gpus)} visible')
  per = len(gpus) // parallel
  return [','.join(gpus[i * per:(i + 1) * per]) for i in range(parallel)]


def _worker_init(group: Optional[str]) -> None:
  from absl import logging
  logging.set_verbosity(logging.ERROR)   # as in the parent (lib/core/cli.py): no Orbax INFO/WARNING
  if group is not None:
    os.environ['CUDA_VISIBLE_DEVICES'] = group
  os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')


class ArrayTask(submitit.helpers.Checkpointable):
  """One array task of a submitit job array: a job (a run, or runs trained together).

  Checkpointable: when SLURM preempts the task or its time limit nears, submitit
  signals it (USR2), calls `checkpoint` and requeues the same call. The requeued
  task takes over its runs' locks (same SLURM job id) and each run resumes from its
  latest checkpoint, so nobody has to rerun anything. What is lost is the training
  since that checkpoint (at most one evaluation interval)."""

  def __call__(self, job):
    return _run_job(job)

  def checkpoint(self, job) -> submitit.helpers.DelayedSubmission:
    # The runs' state is in their checkpoints: requeue the same call. The locks of
    # this process become `queued` ones of this job, which its next incarnation takes.
    lock_lib.requeue_all()
    return submitit.helpers.DelayedSubmission(self, job)


def run_submitit(jobs: Sequence, workdir: str, cluster: str,
                 params: Dict[str, Any], wait: bool = True, log=echo) -> List[Dict[str, Any]]:
  """A job array, one array task per job (a run, or a group of runs trained as
  one program), through submitit (cluster 'slurm', or 'local' for its local
  executor: the same code path on one machine). Each array task may span
  several hosts (nodes x tasks_per_node processes), which join through
  jax.distributed."""
  folder = os.path.join(workdir, 'slurm', '%j')
  executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
  executor.update_parameters(**params)
  jobs = [[{**t, 'distributed': 'auto'} for t in job] if isinstance(job, list)
          else {**job, 'distributed': 'auto'} for job in jobs]
  submitted = executor.map_array(ArrayTask(), jobs)
  if cluster == 'slurm':   # while the array waits in the queue, a rerun must not resubmit it
    for array_task, job in zip(submitted, jobs):
      for task in _job_tasks(job):
        lock_lib.place_queued(task['workdir'], array_task.job_id)
  n = sum(len(_job_tasks(j)) for j in jobs)
  log(f'submitted {n} runs as {len(submitted)} array tasks of job '
      f'{submitted[0].job_id.split("_")[0]} ({cluster}); logs in '
      f'{os.path.join(workdir, "slurm")}; a preempted or timed-out task is requeued and '
      'resumes from its latest checkpoint')
  if not wait:
    log('not waiting: rerun the same command later to resubmit what did not finish, or '
        f'python -m launch.report {workdir} for the results so far')
    return []
  progress, results, left = _Progress(n, len(jobs), log), [], dict(zip(submitted, jobs))
  while left:
    for array_task in [j for j in left if j.done()]:
      job = left.pop(array_task)
      try:
        out = array_task.result()
      except Exception as e:   # the job failed outside run_task (killed, timed out, ...)
        reason = f'{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ""}'
        out = _job_lost(job, reason, slurm_job=array_task.job_id)
      for result in out:
        progress.finished(result)
        results.append(result)
    if left:
      time.sleep(2)
  return results


def submitit_params(cluster: str, timeout_min: int, partition: str = '', gpus_per_task: int = 0,
                    nodes: int = 1, tasks_per_node: int = 1, cpus_per_task: int = 0,
                    mem_gb: float = 0, array_parallelism: int = 0, account: str = '',
                    qos: str = '', extra: Sequence[str] = (), name: str = 'sweep') -> Dict:
  params: Dict[str, Any] = {'timeout_min': timeout_min, 'name': name, 'nodes': nodes,
                            'tasks_per_node': tasks_per_node}
  if gpus_per_task:
    params['gpus_per_node'] = gpus_per_task
  if cpus_per_task:
    params['cpus_per_task'] = cpus_per_task
  if mem_gb:
    params['mem_gb'] = mem_gb
  if cluster == 'slurm':
    for key, value in (('partition', partition), ('array_parallelism', array_parallelism),
                       ('account', account), ('qos', qos)):
      if value:
        params[f'slurm_{key}'] = value
    additional = {}
    for item in extra:
      if '=' not in item:
        raise UserError(f'--slurm_extra item {item!r} must be key=value (an sbatch option)')
      k, v = item.split('=', 1)
      additional[k.strip()] = v.strip()
    if additional:
      params['slurm_additional_parameters'] = additional
  elif nodes > 1:
    raise UserError('--slurm_nodes > 1 needs --executor=slurm (the local executor has one node)')
  return params


def stage_scores(tasks: Sequence[Dict[str, Any]]) -> Dict[str, float]:
  """Mean best val accuracy over the seeds of each arm (runs that finished)."""
  by_arm: Dict[str, List[float]] = {}
  for t in tasks:
    status = RunDir(t['workdir']).read_status()
    if status.get('status') == 'done' and status.get('best_val_accuracy') is not None:
      by_arm.setdefault(t['arm'], []).append(status['best_val_accuracy'])
  return {arm: sum(v) / len(v) for arm, v in by_arm.items()}


def execute(tasks: Sequence[Dict[str, Any]], workdir: str, executor: str, parallel: int = 1,
            submitit_args: Optional[Dict[str, Any]] = None, wait: bool = True, log=echo,
            kill_at=None, vectorize: bool = False) -> List[Dict[str, Any]]:
  """Runs the pending tasks; with `vectorize`, runs that share a program train
  together as one job (plan_groups). kill_at {'run': i, 'step': s} stops the job
  holding pending run i after its first checkpoint at or past step s (tests)."""
  todo = pending(tasks)
  skipped = len(tasks) - len(todo)
  if skipped:
    log(f'{skipped} of {len(tasks)} runs already finished (or diverged): skipped')
  free = []
  for t in todo:   # runs another process is training (or SLURM has queued) are not ours
    holder = lock_lib.live_holder(t['workdir'])
    if holder:
      log(f'{t["arm"]}/seed_{t["seed"]} is held by {lock_lib.describe(holder)}: skipped')
    else:
      free.append(t)
  todo = free
  if not todo:
    return []
  if kill_at and executor == 'local' and parallel <= 1:
    todo = [{**t, 'stop_after_step': kill_at['step']} if i == kill_at['run'] else t
            for i, t in enumerate(todo)]
  jobs: List[Any] = list(todo)
  if vectorize:
    jobs = [job if len(job) > 1 else job[0] for job in plan_groups(todo, log)]
  if executor == 'local':
    return run_local(jobs, parallel, log)
  cluster = 'slurm' if executor == 'slurm' else 'local'
  return run_submitit(jobs, workdir, cluster, submitit_args or {}, wait, log)
