"""The results of a sweep directory W, one row per run (from W/sweep.json, or every run
directory below W when there is none), and W/results.csv: arm, seed, overrides, best /
final val accuracy, test accuracy of the best checkpoint, train_eval - val accuracy gap
at the last evaluation, steps, wall time, status.
"""
import csv
import math
import os
import re
from typing import Any, Dict, List, Optional, Tuple

from lib.core.errors import UserError
from lib.runs import lock as lock_lib
from lib.runs.rundir import RunDir
from lib.sweeps import adaptive
from lib.sweeps.plan import read_manifest
from lib.sweeps.stats import NAN, _finite

COLUMNS = ('arm', 'seed', 'stage', 'status', 'overrides', 'best_val_accuracy',
           'final_val_accuracy', 'test_accuracy', 'train_val_gap', 'best_step', 'steps',
           'wall_time_s', 'reason', 'workdir')


def _runs(workdir: str) -> Tuple[Optional[Dict[str, Any]], List[Dict[str, Any]]]:
  """(manifest, [{arm, seed, stage, overrides, workdir}]) in launch order."""
  manifest = read_manifest(workdir)
  if manifest:
    out = []
    stages = [(1, manifest['arms'])]
    if manifest.get('stage2'):
      stages.append((2, manifest['stage2']['arms']))
    counts = adaptive.planned_seeds(workdir, manifest)   # seeds by precision: per arm
    for stage, arms in stages:
      for arm, overrides in arms.items():
        for seed in (range(counts[arm]) if counts else manifest['seeds']):
          out.append({'arm': arm, 'seed': seed, 'stage': stage, 'overrides': overrides,
                      'workdir': os.path.join(workdir, arm, f'seed_{seed}')})
    return manifest, out
  # No sweep.json: every run directory below W, named by its path.
  out = []
  for root, dirs, files in sorted(os.walk(workdir)):
    dirs[:] = sorted(d for d in dirs if d not in ('archive', 'checkpoints', 'tb', 'slurm'))
    if 'config.json' in files:
      rel = os.path.relpath(root, workdir)
      m = re.match(r'^(.*)/seed_(\d+)$', rel)
      arm = m.group(1) if m else rel
      seed = int(m.group(2)) if m else RunDir(root).read_config().get('seed', 0)
      out.append({'arm': arm, 'seed': seed, 'stage': 1, 'overrides': {}, 'workdir': root})
  return None, out


def results(workdir: str) -> Tuple[Optional[Dict[str, Any]], List[Dict[str, Any]]]:
  if not os.path.isdir(workdir):
    raise UserError(f'no sweep directory {workdir}')
  manifest, runs = _runs(workdir)
  if not runs:
    raise UserError(f'{workdir} holds no runs (no sweep.json, no run directories)')
  rows = []
  for run in runs:
    rd = RunDir(run['workdir'])
    status = rd.read_status()
    metrics = rd.read_metrics()
    last = metrics[-1] if metrics else {}
    best = status.get('best_step')
    state = status.get('status', 'pending' if not rd.has_run() else 'running')
    if state == 'running' and lock_lib.live_holder(run['workdir']) is None:
      state = 'interrupted'   # nobody trains it now: rerunning the sweep resumes it
    row = {
        'arm': run['arm'], 'seed': run['seed'], 'stage': run['stage'],
        'status': state,
        'overrides': '; '.join(f'{k}={v}' for k, v in run['overrides'].items()),
        'best_val_accuracy': status.get('best_val_accuracy', NAN),
        'final_val_accuracy': status.get('final_val_accuracy', NAN),
        'test_accuracy': status.get('test', {}).get('accuracy', NAN),
        # train_eval (a fixed training subset in eval mode) - val: n/a where not recorded
        'train_val_gap': (last['train_eval_accuracy'] - last['val_accuracy'])
                         if _finite(last.get('train_eval_accuracy')) else NAN,
        'best_step': best if best is not None else '', 'steps': last.get('step', ''),
        'wall_time_s': round(last['wall_time'], 1) if last else NAN,
        'reason': status.get('reason', ''), 'workdir': os.path.relpath(run['workdir'], workdir),
        '_curve': metrics, '_overrides': run['overrides']}
    for key in (manifest or {}).get('searched_keys', []):
      row[key] = run['overrides'].get(key, '')
    rows.append(row)
  return manifest, rows


def _write_csv(path: str, rows, keys) -> None:
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(list(COLUMNS) + list(keys))
    for r in rows:
      w.writerow([_csv(r.get(c, '')) for c in COLUMNS] + [_csv(r.get(k, '')) for k in keys])


def _csv(x):
  if isinstance(x, float):
    return '' if not math.isfinite(x) else repr(x)
  return x


def read_csv(path: str) -> List[Dict[str, str]]:
  with open(path) as f:
    return list(csv.DictReader(f))
