"""Reading learning curves: step 6 of the tuning recipe (domain.md section 1).

`diagnose(rows)` takes a run's metrics.jsonl rows (step, epoch, the train figures,
val_loss, val_accuracy, lr) and names what a practitioner would say about them, each
with its evidence. The train figures are those of the fixed training subset
evaluated like val (train_eval_loss / train_eval_accuracy), so that the train-val
gap is not blurred by augmentation, dropout or mixup; runs written before those
existed fall back to the running means (running_train_*, or train_* in old files):

  bad_init            loss flat at first, then a sudden drop
  plateau             loss fell, then flat at a constant rate: try a learning-rate decay
  decayed_too_early   loss still falling fast, flat right after a step decay
  overfitting         val accuracy falling (or val loss rising, or the gap growing)
                      while train accuracy rises
  underfitting        train and val accuracy equal, low and flat (unless a plateau
                      or an early decay already explains it)
  train_longer        train and val accuracy both still rising at a constant rate, the
                      gap steady

Thresholds are module constants, stated in each finding's evidence.
"""
import math
import os
from typing import Any, Dict, List, Sequence

import numpy as np

FLAT = 0.02          # relative loss change counted as flat
LOW_ACCURACY = 0.8   # "low" final train accuracy for underfitting
RISING = 0.01        # accuracy gain over the last quarter counted as still rising
FINDINGS = ('bad_init', 'plateau', 'decayed_too_early', 'overfitting', 'underfitting',
            'train_longer')


def _series(rows, key):
  return np.asarray([float(r[key]) for r in rows], np.float64)


def train_key(rows, what: str) -> str:
  """The key of the train `what` ('loss' or 'accuracy') that every row has: the
  train_eval figure if there is one, else the running mean (old files: train_*)."""
  for key in (f'train_eval_{what}', f'running_train_{what}', f'train_{what}'):
    if rows and all(key in r for r in rows):
      return key
  raise KeyError(f'no train {what} in the metrics rows')


def diagnose(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, str]]:
  """[{'finding', 'evidence', 'advice'}] for one run's evaluations, in FINDINGS order."""
  n = len(rows)
  if n < 4:
    return []
  ep = _series(rows, 'epoch')
  tl, ta = _series(rows, train_key(rows, 'loss')), _series(rows, train_key(rows, 'accuracy'))
  vl, va, lr = _series(rows, 'val_loss'), _series(rows, 'val_accuracy'), _series(rows, 'lr')
  if not (np.all(np.isfinite(tl)) and np.all(np.isfinite(va))):
    return []
  out = []

  def add(name, evidence, advice):
    out.append({'finding': name, 'evidence': evidence, 'advice': advice})

  # bad initialization: the first evaluations flat, then a sudden drop
  k = max(2, n // 5)
  if k < n - 1 and np.all(np.abs(tl[:k] - tl[0]) <= FLAT * 2.5 * tl[0]):
    after = tl[k:]
    if after.min() < 0.7 * tl[0]:
      j = k + int(np.argmax(after < 0.7 * tl[0]))
      add('bad_init', f'train loss stayed within 5% of {tl[0]:.3f} for the first {k} '
          f'evaluations (to epoch {ep[k - 1]:g}), then fell to {tl[j]:.3f} by epoch {ep[j]:g}',
          'check the initialization (launch.diagnose --checks=initial_loss,activations)')

  # decays: the rate cut by 2x or more between evaluations and then held
  decays = [i for i in range(1, n - 2) if lr[i] < 0.5 * lr[i - 1]
            and abs(lr[i + 1] - lr[i]) <= 0.01 * lr[i]]
  too_early = False
  if decays:
    i = decays[0]
    m = min(3, i)
    before = (tl[i - m] - tl[i - 1]) / tl[i - m] / max(m - 1, 1)
    after = (tl[i] - tl[-1]) / tl[i] / (n - 1 - i)
    if before > 2 * FLAT and after < 0.25 * before and ta[-1] < 0.99:
      too_early = True
      add('decayed_too_early', f'train loss was falling {before:.1%} per evaluation before '
          f'the rate was cut from {lr[i - 1]:.3g} to {lr[i]:.3g} at epoch {ep[i]:g}, then only '
          f'{after:.1%} per evaluation', 'decay later (schedule.milestone_fractions) or '
          'train longer before the first decay')

  # plateau: the last third flat at a constant rate after an earlier fall
  s = max(n - max(3, n // 3), 1)
  constant = lr[s:].max() <= 1.01 * lr[s:].min()
  if (not too_early and constant and tl[s] < 0.9 * tl[0] and ta[-1] < 0.99
      and abs(tl[-1] - tl[s]) <= FLAT * tl[s]):
    add('plateau', f'train loss flat at {tl[-1]:.3f} (within {FLAT:.0%}) since epoch '
        f'{ep[s]:g} at a constant lr {lr[-1]:.3g}, after falling from {tl[0]:.3f}',
        'add learning-rate decay (schedule.name=step or cosine)')

  # overfitting: val accuracy falls (or val loss rises, or the gap grows) while train improves
  p = int(np.argmax(va))
  gap = ta - va
  h = n // 2
  if p < n - 1 and va[-1] < va[p] - 0.02 and ta[-1] > ta[p]:
    add('overfitting', f'val accuracy peaked at {va[p]:.3f} (epoch {ep[p]:g}) and fell to '
        f'{va[-1]:.3f} while train accuracy rose from {ta[p]:.3f} to {ta[-1]:.3f}',
        'more regularization or data, a smaller model, or early stopping '
        '(train.early_stop_patience)')
  elif gap[-1] > gap[h] + 0.05 and gap[-1] > 0.1:
    add('overfitting', f'the train-val accuracy gap grew from {gap[h]:.3f} (epoch {ep[h]:g}) '
        f'to {gap[-1]:.3f}', 'more regularization or data, or a smaller model')
  elif vl.argmin() < n - 2 and vl[-1] > 1.2 * vl.min() and tl[-1] < tl[int(vl.argmin())]:
    q = int(vl.argmin())
    add('overfitting', f'val loss rose from {vl[q]:.3f} (epoch {ep[q]:g}) to {vl[-1]:.3f} '
        f'while train loss fell to {tl[-1]:.3f}', 'more regularization or early stopping')

  # the last quarter: still rising?
  q = max(n - max(2, n // 4) - 1, 0)
  train_gain, val_gain = ta[-1] - ta[q], va[-1] - va[q]
  # Only at a constant rate: a decaying schedule's final rise is its annealing.
  rising = (train_gain > RISING and val_gain > RISING
            and lr[q:].max() <= 1.01 * lr[q:].min())
  schedule_problem = any(f['finding'] in ('plateau', 'decayed_too_early') for f in out)
  if abs(gap[-1]) < 0.03 and ta[-1] < LOW_ACCURACY and not rising and not schedule_problem:
    add('underfitting', f'train and val accuracy equal and low at the end ({ta[-1]:.3f} vs '
        f'{va[-1]:.3f}, gap {gap[-1]:+.3f}) and no longer rising',
        'a bigger model, less regularization, a higher learning rate')
  if rising and abs(gap[-1] - gap[q]) < 0.05:
    add('train_longer', f'train and val accuracy both rose over the last {n - 1 - q} '
        f'evaluations (+{train_gain:.3f}, +{val_gain:.3f}) with a steady gap '
        f'({gap[q]:+.3f} -> {gap[-1]:+.3f})', 'train longer (train.epochs), then go back '
        'to step 5')
  return out


def find_runs(path: str) -> List[str]:
  """Run directories (holding metrics.jsonl) at or below `path`, sorted."""
  if os.path.isfile(os.path.join(path, 'metrics.jsonl')):
    return [path]
  found = []
  for root, dirs, files in os.walk(path):
    dirs[:] = sorted(d for d in dirs if d not in ('archive', 'checkpoints', 'tb', 'slurm'))
    if 'metrics.jsonl' in files:
      found.append(root)
  return sorted(found)


def plot(path: str, runs: Dict[str, Sequence[Dict[str, Any]]],
         findings: Dict[str, List[Dict[str, str]]], max_runs: int = 12) -> str:
  """Loss and accuracy curves of up to `max_runs` runs, titled with their findings."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  names = list(runs)[:max_runs]
  fig, axes = plt.subplots(len(names), 2, figsize=(10, 2.6 * len(names)), squeeze=False)
  for (a, b), name in zip(axes, names):
    rows = runs[name]
    ep = [r['epoch'] for r in rows]
    label = 'train' if train_key(rows, 'loss').startswith('train_eval') else 'train (running)'
    a.plot(ep, [r[train_key(rows, 'loss')] for r in rows], label=label)
    a.plot(ep, [r['val_loss'] for r in rows], label='val')
    a.set_ylabel('loss')
    b.plot(ep, [r[train_key(rows, 'accuracy')] for r in rows], label=label)
    b.plot(ep, [r['val_accuracy'] for r in rows], label='val')
    b.set_ylabel('accuracy')
    title = ', '.join(f['finding'] for f in findings[name]) or 'no problem found'
    a.set_title(f'{name}: {title}', fontsize=9, loc='left')
    for ax in (a, b):
      ax.grid(alpha=0.3)
      ax.set_xlabel('epoch')
    b.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path
