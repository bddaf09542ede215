"""Executing a sweep's runs: here one after another, in parallel worker processes, or
as a SLURM job array through submitit. Every run goes through `run_task`, which calls
the same `train.train_and_evaluate` as `launch.train`; with `vectorize`, runs that share
a program go through `run_group` together (`plan_groups`, lib/runs/group_train.py), and a
job is then a list of tasks.

Seeds by precision (lib/sweeps/adaptive.py) run as rounds of such executions
(`execute_adaptive`), each deciding the next from the run directories.

A sweep directory W holds W/sweep.json (what was launched) and one ordinary run
directory per arm and seed, W/<arm>/seed_<k>. Rerunning skips finished and diverged
runs, resumes interrupted ones from their checkpoints and retries failed ones.

The pieces: lib/sweeps/plan.py (the tasks, what a rerun skips), task.py (one job in any
process, with its test evaluation), executors.py (local, worker processes) and slurm.py
(submitit). `execute` ties them together; the names below are kept importable from here.
"""
from typing import Any, Callable, Dict, List, Optional, Sequence

from lib.core import sharding
from lib.runs import lock as lock_lib
from lib.runs.metrics import echo
from lib.runs.rundir import RunDir
from lib.sweeps import adaptive
from lib.sweeps.executors import (_device_groups, _run_workers, _worker_died,  # noqa: F401
                                  _worker_init, _worker_main, run_local)
from lib.sweeps.plan import (SKIP, SWEEP_FILE, _needs_test, pending, plan,  # noqa: F401
                             plan_groups, read_manifest, run_dir, stage_scores,
                             write_manifest)
from lib.sweeps.slurm import ArrayTask, run_submitit, submitit_params  # noqa: F401
from lib.sweeps.task import (Killed, _failed, _job_lost, _job_tasks,  # noqa: F401
                             _record_failure, _run_job, _test, run_group, run_task)

EXECUTORS = ('local', 'slurm', 'submitit_local')


def _held(task: Dict[str, Any], log) -> bool:
  """Whether another live process trains this run (or SLURM has it queued): not ours."""
  holder = lock_lib.live_holder(task['workdir'])
  if holder:
    log(f'{task["arm"]}/seed_{task["seed"]} is held by {lock_lib.describe(holder)}: skipped')
  return bool(holder)


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
  free = {id(t) for t in todo if not _held(t, log)}
  # The processes of one job read the run files at different moments (process 0 may
  # have locked a run already when another looks): all run what process 0 found to do.
  todo = [t for t, run in zip(tasks, sharding.agree([id(t) in free for t in tasks])) if run]
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


def execute_adaptive(base, sweep, workdir: str, run: Callable[[List[Dict[str, Any]]], Any],
                     primary: bool = True, log=echo) -> Dict[str, Any]:
  """An adaptive sweep's rounds on the run directories of W: `run(tasks)` executes a
  round's tasks (finished ones are skipped, as on any rerun); process 0 (`primary`)
  writes W/adaptive.json after each round; every process takes process 0's decision. The
  rounds recorded there by an earlier launch of the same sweep are replayed as decided."""
  arms = list(sweep.arms)
  tasks = lambda counts: plan(base, sweep.runs_for(counts), workdir)

  def read(counts):
    values = {}
    for t in tasks(counts):
      status = RunDir(t['workdir']).read_status()
      ok = status.get('status') == 'done' and adaptive._ok(status.get('best_val_accuracy'))
      values.setdefault(t['arm'], {})[t['seed']] = status['best_val_accuracy'] if ok else None
    return values, sum(counts.values())

  def agree(want):
    return dict(zip(arms, (int(n) for n in sharding.agree([want[a] for a in arms]))))

  def record(state):
    if primary:
      adaptive.write_state(workdir, state)
  history = adaptive.matching_state(workdir, read_manifest(workdir))
  return adaptive.run_rounds(sweep.adaptive, arms, sweep.baseline, lambda c: run(tasks(c)),
                             read, record, log, agree, history)
