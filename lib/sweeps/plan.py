"""The tasks of a sweep: one per run, every config resolved and checked before launch
(`plan`), which of them a rerun still has to run or test (`pending`), how a vectorized
sweep groups them into jobs (`plan_groups`), the sweep directory's manifest
(W/sweep.json) and the stage-1 scores a coarse-to-fine search refines from.
"""
import datetime
import json
import os
import shutil
from typing import Any, Dict, List, Optional, Sequence

from lib.core import config as config_lib
from lib.core.errors import UserError
from lib.runs.metrics import echo
from lib.runs.rundir import RunDir, read_json
from lib.sweeps import sweep as sweep_lib

SWEEP_FILE = 'sweep.json'
SKIP = ('done', 'diverged')   # statuses a rerun leaves alone


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
  return read_json(os.path.join(workdir, SWEEP_FILE))


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


def stage_scores(tasks: Sequence[Dict[str, Any]]) -> Dict[str, float]:
  """Mean best val accuracy over the seeds of each arm (runs that finished)."""
  by_arm: Dict[str, List[float]] = {}
  for t in tasks:
    status = RunDir(t['workdir']).read_status()
    if status.get('status') == 'done' and status.get('best_val_accuracy') is not None:
      by_arm.setdefault(t['arm'], []).append(status['best_val_accuracy'])
  return {arm: sum(v) / len(v) for arm, v in by_arm.items()}
