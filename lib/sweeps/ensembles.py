"""Per arm of a sweep, the ensemble of its seeds: the mean of the softmax outputs of its
finished runs' best-val checkpoints (lib/runs/ensemble.py, as `launch.eval
--ensemble=W/<arm>`), beside the mean of the members' own accuracies, on val and test.

Arms with fewer than two finished seeds have none. It restores checkpoints and
evaluates them on this process's devices, one compiled program per arm and split;
W/ensembles.json keeps each arm's result with what it was computed from (each
member's best step and the time of its status.json), so a report written again over
the same runs reuses it. `launch.report --noensembles` leaves it out.
"""
import csv
import json
import os
from typing import Any, Dict, List, Sequence

from lib.core.errors import UserError
from lib.sweeps.stats import NAN, _finite

COLUMNS = ('arm', 'seeds', 'members_val_accuracy', 'ensemble_val_accuracy',
           'members_test_accuracy', 'ensemble_test_accuracy', 'ensemble_test_gain',
           'ensemble_val_loss', 'ensemble_test_loss', 'reason')
CACHE_FILE = 'ensembles.json'
CSV_FILE = 'ensembles.csv'


def _fingerprint(workdir: str, run_rows) -> List[Any]:
  out = []
  for r in run_rows:
    path = os.path.join(workdir, r['workdir'])
    status = os.path.join(path, 'status.json')
    out.append([r['workdir'], r.get('best_step', ''),
                os.path.getmtime(status) if os.path.exists(status) else None])
  return out


def _read_cache(workdir: str) -> Dict[str, Any]:
  try:
    with open(os.path.join(workdir, CACHE_FILE)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _mean(xs: Sequence[float]) -> float:
  return sum(xs) / len(xs) if xs else NAN


def arm_ensembles(workdir: str, rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
  """One row (COLUMNS) per arm with two or more finished seeds, in the arms' order of
  `rows` (collect.results); an arm whose ensemble cannot be evaluated gets its reason."""
  by_arm: Dict[str, List[Dict[str, Any]]] = {}
  for r in rows:
    by_arm.setdefault(r['arm'], [])
    if r['status'] == 'done':
      by_arm[r['arm']].append(r)
  cache, fresh, out = _read_cache(workdir), {}, []
  for arm, done in by_arm.items():
    if len(done) < 2:
      continue
    key = _fingerprint(workdir, done)
    kept = cache.get(arm)
    if kept and kept.get('fingerprint') == json.loads(json.dumps(key)):
      row = kept['row']
    else:
      row = _evaluate(arm, [os.path.join(workdir, r['workdir']) for r in done])
    fresh[arm] = {'fingerprint': key, 'row': row}
    out.append(row)
  if fresh or cache:
    with open(os.path.join(workdir, CACHE_FILE), 'w') as f:
      json.dump(fresh, f, indent=1)
  return out


def _evaluate(arm: str, dirs: List[str]) -> Dict[str, Any]:
  from lib.runs import ensemble   # jax: only where ensembles are evaluated
  row = {c: NAN for c in COLUMNS}
  row.update(arm=arm, seeds=len(dirs), reason='')
  try:
    result = ensemble.evaluate_ensemble(dirs, ('val', 'test'))
  except UserError as e:
    row['reason'] = str(e)
    return row
  for split in ('val', 'test'):
    row[f'members_{split}_accuracy'] = _mean([m[split]['accuracy'] for m in result['members']])
    row[f'ensemble_{split}_accuracy'] = result['ensemble'][split]['accuracy']
    row[f'ensemble_{split}_loss'] = result['ensemble'][split]['loss']
  row['ensemble_test_gain'] = row['ensemble_test_accuracy'] - row['members_test_accuracy']
  return row


def write_csv(workdir: str, ens: Sequence[Dict[str, Any]]) -> None:
  with open(os.path.join(workdir, CSV_FILE), 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(COLUMNS)
    for r in ens:
      w.writerow(['' if isinstance(r[c], float) and not _finite(r[c]) else r[c] for c in COLUMNS])


def _f(x, signed=False) -> str:
  if not _finite(x):
    return 'n/a'
  return f'{x:+.4f}' if signed else f'{x:.4f}'


def markdown(ens: Sequence[Dict[str, Any]]) -> List[str]:
  """The report.md section: what the columns are, and the table."""
  if not ens:
    return []
  return ['## Ensembles of each arm\'s seeds', '',
          'The mean of the softmax outputs of an arm\'s finished seeds (their best-val '
          'checkpoints; `launch.eval --ensemble=W/<arm>`), beside the mean of the same '
          'members\' own accuracies. Δ test is the ensemble\'s test accuracy minus the '
          'members\' mean. One ensemble per arm: no spread over seeds, no CI.', ''] + \
      table(ens) + ['']


def table(ens: Sequence[Dict[str, Any]]) -> List[str]:
  lines = ['| arm | seeds | val accuracy: members\' mean | ensemble | test accuracy: members\' '
           'mean | ensemble | Δ test |',
           '| --- | ---: | ---: | ---: | ---: | ---: | ---: |']
  for r in ens:
    if r['reason']:
      lines.append(f'| {r["arm"]} | {r["seeds"]} | n/a: {r["reason"]} | | | | |')
      continue
    lines.append(f'| {r["arm"]} | {r["seeds"]} | {_f(r["members_val_accuracy"])} | '
                 f'{_f(r["ensemble_val_accuracy"])} | {_f(r["members_test_accuracy"])} | '
                 f'{_f(r["ensemble_test_accuracy"])} | {_f(r["ensemble_test_gain"], True)} |')
  return lines
