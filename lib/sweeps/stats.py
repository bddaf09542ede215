"""The statistics of a sweep's report: mean, std and t confidence interval over seeds
(`mean_ci`), the paired difference to the baseline with its t-test (`paired`), Holm's
step-down correction over the arms compared (`holm`), and per arm all of these, ranked
(`summarize`).

Statistics: std has ddof=1; the 95% CI is mean +- t(0.975, n-1) * std / sqrt(n); the paired
difference uses the seeds both arms finished, and its two-sided p-value comes from the
t distribution with n-1 degrees of freedom. With one seed there is no CI (n/a). With
paired differences that are all equal (no spread) the t-test is undefined: no p, and that
arm is left out of Holm's step-down correction over the arms compared with the baseline.
A sweep that chose its seeds by precision (`first_round`, lib/sweeps/adaptive.py) reports
Stein's interval instead (the spread of round 1's seeds, t with its degrees of freedom):
the interval the seeds were chosen for, and one whose 95% holds however many were run.
"""
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

NAN = float('nan')


def t_quantile(q: float, df: int) -> float:
  from scipy import stats
  return float(stats.t.ppf(q, df))


def mean_ci(values: Sequence[float], level: float = 0.95) -> Tuple[float, float, float]:
  """(mean, std with ddof=1, half-width of the t confidence interval); nan where n < 2."""
  x = np.asarray(values, dtype=np.float64)
  if x.size == 0:
    return NAN, NAN, NAN
  if x.size == 1:
    return float(x[0]), NAN, NAN
  std = float(x.std(ddof=1))
  return float(x.mean()), std, t_quantile(0.5 + level / 2, x.size - 1) * std / math.sqrt(x.size)


def paired(a: Sequence[float], b: Sequence[float], level: float = 0.95):
  """Paired difference a - b: (mean, CI half-width, two-sided p of a t-test, n)."""
  from scipy import stats
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  n = d.size
  if n == 0:
    return NAN, NAN, NAN, 0
  mean = float(d.mean())
  if n == 1:
    return mean, NAN, NAN, 1
  sd = float(d.std(ddof=1))
  half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
  # Equal differences (to rounding: accuracies are ratios of counts) make the t statistic
  # 0/0 or x/0: no p-value, rather than a p of 0 or 1.
  if sd <= 1e-12 * max(1.0, float(np.abs(d).max())):
    return mean, half, NAN, n
  return mean, half, float(2 * stats.t.sf(abs(mean / (sd / math.sqrt(n))), n - 1)), n


def holm(pvalues: Sequence[float]) -> List[float]:
  """Holm's step-down adjustment of a family of p-values (same order); entries that are
  not finite stay nan and are not members of the family."""
  family = sorted((p, i) for i, p in enumerate(pvalues) if _finite(p))
  out, running = [NAN] * len(pvalues), 0.0
  for rank, (p, i) in enumerate(family):
    # the k-th smallest of m is multiplied by m - k + 1, kept monotone and at most 1
    running = max(running, min(1.0, (len(family) - rank) * p))
    out[i] = running
  return out


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and x is not None and math.isfinite(x)


def per_seed_values(rows: Sequence[Dict[str, Any]], metric: str) -> Dict[str, Dict[int, Any]]:
  """{arm: {seed: metric, or None where the run did not finish}}: what the adaptive
  intervals (lib/sweeps/adaptive.py) are computed from."""
  out: Dict[str, Dict[int, Any]] = {}
  for r in rows:
    out.setdefault(r['arm'], {})[r['seed']] = (
        r[metric] if r['status'] == 'done' and _finite(r[metric]) else None)
  return out


def summarize(rows: Sequence[Dict[str, Any]], metric: str, baseline: Optional[str],
              first_round: Optional[int] = None) -> List[Dict[str, Any]]:
  """Per arm (finished runs only), ranked by mean `metric`, best first. With
  `first_round` (seeds by precision), the intervals the seeds were chosen for (of Δ, or of
  the mean without a baseline) are Stein's, from the first `first_round` seeds' spread."""
  from lib.sweeps import adaptive
  per_seed = per_seed_values(rows, metric) if first_round else {}
  by_arm: Dict[str, Dict[int, Dict[str, Any]]] = {}
  counts: Dict[str, Dict[str, int]] = {}
  for r in rows:
    counts.setdefault(r['arm'], {}).setdefault(r['status'], 0)
    counts[r['arm']][r['status']] += 1
    if r['status'] == 'done' and _finite(r[metric]):
      by_arm.setdefault(r['arm'], {})[r['seed']] = r
  base = by_arm.get(baseline, {}) if baseline else {}
  out = []
  for arm, count in counts.items():
    seeds = by_arm.get(arm, {})
    values = [seeds[s][metric] for s in sorted(seeds)]
    mean, std, half = mean_ci(values)
    finished = [r for r in rows if r['arm'] == arm and r['status'] == 'done']
    test_mean, test_std, _ = mean_ci([r['test_accuracy'] for r in finished
                                      if _finite(r.get('test_accuracy'))])
    entry = {'arm': arm, 'n': len(values), 'runs': sum(count.values()), 'counts': count,
             'mean': mean, 'std': std, 'ci': half, 'values': values,
             'overrides': next((r['overrides'] for r in rows if r['arm'] == arm), ''),
             'best_val_mean': mean_ci([seeds[s]['best_val_accuracy'] for s in seeds])[0],
             'test_mean': test_mean, 'test_std': test_std,
             'gap_mean': mean_ci([seeds[s]['train_val_gap'] for s in seeds
                                  if _finite(seeds[s].get('train_val_gap'))])[0]}
    stein = first_round and adaptive.interval(per_seed, baseline if arm != baseline else None,
                                              arm, first_round, len(per_seed[arm]))
    if baseline and arm != baseline:
      common = sorted(set(seeds) & set(base))
      d, dh, p, n = paired([seeds[s][metric] for s in common], [base[s][metric] for s in common])
      if stein:
        d, dh, p, n = stein['mean'], stein['halfwidth'], stein['p'], stein['pairs']
      entry.update(diff=d, diff_ci=dh, p=p, pairs=n, p_undefined=n >= 2 and not _finite(p))
    elif stein and not baseline:
      entry['ci'] = stein['halfwidth']
    out.append(entry)
  compared = [e for e in out if 'p' in e]
  for e, adjusted in zip(compared, holm([e['p'] for e in compared])):
    e['p_holm'] = adjusted
  out.sort(key=lambda e: (-e['mean'] if _finite(e['mean']) else math.inf, e['arm']))
  return out
