"""Executing a sweep's jobs as a SLURM job array through submitit (or submitit's local
executor, the same code path on one machine): the array task (`ArrayTask`, requeued
when preempted), submitting and waiting (`run_submitit`), and the executor's
parameters from the command line (`submitit_params`).
"""
import os
import time
from typing import Any, Dict, List, Sequence

import submitit

from lib.core.errors import UserError
from lib.runs import lock as lock_lib
from lib.runs.metrics import echo
from lib.sweeps.executors import _Progress
from lib.sweeps.task import _job_lost, _job_tasks, _run_job


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
