"""Executing a sweep's jobs on this machine: one after another in this process, or in
`--parallel` spawned worker processes, each with its own share of the GPUs (GPU
discovery: `_device_groups`); and the progress lines with the sweep's ETA.
"""
import multiprocessing
import multiprocessing.connection
import os
import signal
import subprocess
import time
from typing import Any, Dict, List, Optional, Sequence

from lib.core.errors import UserError
from lib.runs.metrics import echo, format_duration
from lib.sweeps.task import _job_lost, _job_tasks, _run_job


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
