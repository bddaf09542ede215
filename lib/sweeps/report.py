"""The ablation report of a sweep directory W.

  W/results.csv   one row per run: arm, seed, overrides, best / final val accuracy, test
                  accuracy of the best checkpoint, train_eval - val accuracy gap at the last
                  evaluation, steps, wall time, status
  W/report.md     per arm: mean +- std and 95% CI over seeds of the ranking metric (best
                  val accuracy unless asked otherwise), the test accuracy of the best-val
                  checkpoints beside it; the difference to the baseline arm, paired over
                  seeds (t-test, raw and Holm-adjusted p); ranked; failures listed
  W/curves.png    train (train_eval where recorded, else running) and val accuracy per arm
                  (mean over seeds) against epochs
  W/accuracy.png  each arm's mean with its 95% CI, and every seed
  W/search.png    searches: (log lr, log wd) or the first two searched keys, coloured by
                  val accuracy

Statistics: std has ddof=1; the 95% CI is mean +- t(0.975, n-1) * std / sqrt(n); the paired
difference uses the seeds both arms finished, and its two-sided p-value comes from the
t distribution with n-1 degrees of freedom. With one seed there is no CI (n/a). With
paired differences that are all equal (no spread) the t-test is undefined: no p, and that
arm is left out of Holm's step-down correction over the arms compared with the baseline.

Ranking is by a validation metric by default, for every kind of sweep: ranking by test
accuracy would be selection on the test split, so the test accuracy of each run's best-val
checkpoint is reported, never ranked on, unless the caller asks (and the report warns).
"""
import csv
import json
import math
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from lib.core.errors import UserError
from lib.runs import lock as lock_lib
from lib.runs.rundir import RunDir
from lib.sweeps import runner

COLUMNS = ('arm', 'seed', 'stage', 'status', 'overrides', 'best_val_accuracy',
           'final_val_accuracy', 'test_accuracy', 'train_val_gap', 'best_step', 'steps',
           'wall_time_s', 'reason', 'workdir')
NAN = float('nan')


# ---------------------------------------------------------------- statistics


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


# ---------------------------------------------------------------- results


def _runs(workdir: str) -> Tuple[Optional[Dict[str, Any]], List[Dict[str, Any]]]:
  """(manifest, [{arm, seed, stage, overrides, workdir}]) in launch order."""
  manifest = runner.read_manifest(workdir)
  if manifest:
    out = []
    stages = [(1, manifest['arms'])]
    if manifest.get('stage2'):
      stages.append((2, manifest['stage2']['arms']))
    for stage, arms in stages:
      for arm, overrides in arms.items():
        for seed in manifest['seeds']:
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


def _finite(x) -> bool:
  return isinstance(x, (int, float)) and x is not None and math.isfinite(x)


def choose_metric(manifest, rows) -> str:
  """Every kind of sweep ranks by the selection metric, best val accuracy: the test
  accuracy is reported beside it, and ranking by it would select on the test split."""
  return 'best_val_accuracy'


def summarize(rows: Sequence[Dict[str, Any]], metric: str,
              baseline: Optional[str]) -> List[Dict[str, Any]]:
  """Per arm (finished runs only), ranked by mean `metric`, best first."""
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
    if baseline and arm != baseline:
      common = sorted(set(seeds) & set(base))
      d, dh, p, n = paired([seeds[s][metric] for s in common], [base[s][metric] for s in common])
      entry.update(diff=d, diff_ci=dh, p=p, pairs=n, p_undefined=n >= 2 and not _finite(p))
    out.append(entry)
  compared = [e for e in out if 'p' in e]
  for e, adjusted in zip(compared, holm([e['p'] for e in compared])):
    e['p_holm'] = adjusted
  out.sort(key=lambda e: (-e['mean'] if _finite(e['mean']) else math.inf, e['arm']))
  return out


# ---------------------------------------------------------------- writing


def _f(x, digits=4, signed=False) -> str:
  if not _finite(x):
    return 'n/a'
  x = 0.0 if abs(x) < 0.5 * 10 ** -digits else x   # no -0.0000
  return f'{x:+.{digits}f}' if signed else f'{x:.{digits}f}'


def _p(p, undefined=False) -> str:
  if undefined:
    return 'undefined (no spread)'
  if not _finite(p):
    return 'n/a'
  return '<0.001' if p < 0.001 else f'{p:.3f}'


GAP_LABEL = 'train_eval − val accuracy (last eval)'


def table(summary: Sequence[Dict[str, Any]], metric: str, baseline: Optional[str]) -> List[str]:
  name = metric.replace('_', ' ')
  head = ['rank', 'arm', 'overrides', 'seeds', f'{name} mean ± std', '95% CI']
  if baseline:
    head += [f'Δ vs {baseline} (paired)', '95% CI of Δ', 'p', 'p (Holm)']
  show_test = metric != 'test_accuracy' and any(_finite(e.get('test_mean')) for e in summary)
  if show_test:
    head += ['test accuracy of best-val ckpt, mean ± std']
  if metric != 'best_val_accuracy':
    head += ['best val']
  head += [GAP_LABEL]
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '|'.join(
      ' ---: ' if h not in ('arm', 'overrides') else ' --- ' for h in head) + '|']
  for i, e in enumerate(summary, 1):
    ci = (f'[{_f(e["mean"] - e["ci"])}, {_f(e["mean"] + e["ci"])}]' if _finite(e['ci'])
          else 'n/a')
    cells = [str(i), f'**{e["arm"]}**' if e['arm'] == baseline else e['arm'],
             f'`{e["overrides"]}`' if e['overrides'] else '(none)',
             f'{e["n"]}/{e["runs"]}', f'{_f(e["mean"])} ± {_f(e["std"])}', ci]
    if baseline:
      if e['arm'] == baseline:
        cells += ['baseline', '', '', '']
      else:
        dci = (f'[{_f(e["diff"] - e["diff_ci"], signed=True)}, '
               f'{_f(e["diff"] + e["diff_ci"], signed=True)}]' if _finite(e.get('diff_ci'))
               else 'n/a')
        undefined = e.get('p_undefined', False)
        cells += [_f(e.get('diff'), signed=True), dci, _p(e.get('p'), undefined),
                  _p(e.get('p_holm'), undefined)]
    if show_test:
      cells += [f'{_f(e["test_mean"])} ± {_f(e["test_std"])}']
    if metric != 'best_val_accuracy':
      cells += [_f(e['best_val_mean'])]
    cells += [_f(e['gap_mean'], signed=True)]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return lines


def _budget(rows) -> str:
  for r in rows:
    rd = RunDir(os.path.join(r['_root'], r['workdir']))
    if rd.has_run():
      c = rd.read_config()
      return (f'{c["model"]["name"]} (depth {c["model"]["depth"]}, width {c["model"]["width"]}) '
              f'on {c["data"]["source"]}{" " + c["data"]["name"] if c["data"]["source"] == "tfds" else ""}, '
              f'{c["train"]["epochs"]} epochs of batch {c["train"]["batch_size"]}, '
              f'{c["optim"]["name"]} lr {c["optim"]["lr"]}, {c["schedule"]["name"]} schedule')
  return 'n/a'


def write(workdir: str, metric: Optional[str] = None) -> Dict[str, Any]:
  """Writes results.csv, report.md and the PNGs; returns {metric, summary, lines}."""
  manifest, rows = results(workdir)
  for r in rows:
    r['_root'] = workdir
  metric = metric or choose_metric(manifest, rows)
  if metric not in ('best_val_accuracy', 'final_val_accuracy', 'test_accuracy'):
    raise UserError(f'--metric={metric}; valid: best_val_accuracy, final_val_accuracy, '
                    'test_accuracy')
  baseline = (manifest or {}).get('baseline')
  summary = summarize(rows, metric, baseline)
  keys = (manifest or {}).get('searched_keys', [])
  _write_csv(os.path.join(workdir, 'results.csv'), rows, keys)
  plots = _plots(workdir, rows, summary, metric, manifest)
  lines = table(summary, metric, baseline)
  md = [f'# Ablation report: {workdir}', '']
  if manifest:
    cmd = f'{manifest["module"]}{":" + manifest["arg"] if manifest.get("arg") else ""}'
    md += [f'Sweep `{cmd}` ({manifest["kind"]}), seeds {manifest["seeds"]}' +
           (f', command-line overrides `{manifest["overrides"]}`' if manifest['overrides'] else '')
           + '.', '']
  done = sum(r['status'] == 'done' for r in rows)
  md += [f'Budget: {_budget(rows)}. Runs: {done} of {len(rows)} done.', '']
  md += explanation(metric, baseline, summary) + lines + ['']
  bad = [r for r in rows if r['status'] not in ('done',)]
  if bad:
    md += ['Not finished:', ''] + [f'- `{r["workdir"]}`: {r["status"]}'
                                   f'{": " + r["reason"] if r["reason"] else ""}' for r in bad]
    md.append('')
  if manifest and manifest.get('stage2'):
    md += [f'Coarse-to-fine: stage 2 ({len(manifest["stage2"]["arms"])} trials, `fine_*`) '
           f'drew from `{json.dumps(manifest["stage2"]["space"])}`.', '']
  md += [f'![{name}]({name})' for name in plots]
  with open(os.path.join(workdir, 'report.md'), 'w') as f:
    f.write('\n'.join(md) + '\n')
  return {'metric': metric, 'summary': summary, 'lines': lines, 'plots': plots, 'rows': rows,
          'warning': test_split_warning(metric)}


def test_split_warning(metric: str) -> str:
  """The warning a test-accuracy ranking carries ('' for any other metric)."""
  if metric != 'test_accuracy':
    return ''
  return ('**Warning: ranked by test accuracy** (--metric=test_accuracy). Ranking arms by '
          'test accuracy is selection on the test split: the top arm\'s test accuracy is '
          'then an optimistic estimate, and the test split no longer measures generalization. '
          'Rank by best val accuracy (the default) to choose, and read test accuracy only '
          'as a report.')


def explanation(metric: str, baseline: Optional[str], summary) -> List[str]:
  """The paragraphs above the table in report.md: what the ranking and columns mean."""
  name = metric.replace('_', ' ')
  why = {'best_val_accuracy': 'the selection metric, the same one that chose each run\'s '
                              'checkpoint',
         'final_val_accuracy': 'val accuracy at the last evaluation',
         'test_accuracy': 'test accuracy of each run\'s best-val checkpoint'}[metric]
  text = (f'Ranked by **{name}** ({why}; mean over seeds). 95% CIs use the t distribution.')
  if metric != 'test_accuracy':
    text += (' The test accuracy of each run\'s best-val checkpoint is reported beside it '
             '(mean ± std over seeds), not ranked on: ranking by it would be selection on '
             'the test split.')
  if baseline:
    m = sum(_finite(e.get('p_holm')) for e in summary)
    text += (f' Δ is the difference in {name} to the baseline, paired by seed, with the '
             'two-sided paired t-test p; `p (Holm)` is that p after Holm\'s step-down '
             f'correction for comparing several arms with one baseline ({m} in the family '
             'here; with one comparison it equals p). An arm whose paired differences are all '
             'equal has no spread, so its t-test is undefined: its p reads '
             '`undefined (no spread)` and it is left out of the Holm family.')
  text += (f' The gap column is {GAP_LABEL}: train_eval_accuracy (a fixed training subset '
           'evaluated like val, in eval mode without augmentation) minus val accuracy, at the '
           'last evaluation; n/a for runs that did not record train_eval_accuracy.')
  warning = test_split_warning(metric)
  return ([warning, ''] if warning else []) + [text, '']


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


def _train_curve(curves) -> Tuple[str, str]:
  """(metrics key, title) of the train-accuracy panel: train_eval_accuracy where every
  plotted evaluation has it, else the running mean (train_accuracy in older runs)."""
  records = [row for c in curves for row in c]
  if records and all(_finite(row.get('train_eval_accuracy')) for row in records):
    return 'train_eval_accuracy', 'train accuracy (fixed train subset, eval mode)'
  if records and all('running_train_accuracy' in row for row in records):
    return 'running_train_accuracy', 'train accuracy (running mean, augmented)'
  return 'train_accuracy', 'train accuracy (running mean, augmented)'


def _plots(workdir, rows, summary, metric, manifest) -> List[str]:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  names = []
  ranked = [e['arm'] for e in summary if e['n']][:10]   # the top ten arms, for legibility
  if ranked:
    plotted = [r['_curve'] for r in rows if r['arm'] in ranked and r['status'] == 'done']
    train_key, train_title = _train_curve(plotted)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for arm in ranked:
      curves = [r['_curve'] for r in rows if r['arm'] == arm and r['status'] == 'done']
      n = min(len(c) for c in curves)
      epochs = [row['epoch'] for row in curves[0][:n]]
      for ax, key in zip(axes, (train_key, 'val_accuracy')):
        y = np.mean([[row.get(key, NAN) for row in c[:n]] for c in curves], axis=0)
        ax.plot(epochs, y, label=arm)
    for ax, title in zip(axes, (train_title, 'val accuracy')):
      ax.set_title(title)
      ax.set_xlabel('epoch')
      ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle('mean over seeds')
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, 'curves.png'), dpi=100)
    plt.close(fig)
    names.append('curves.png')

    fig, ax = plt.subplots(figsize=(7, 0.45 * len(ranked) + 1.5))
    for i, e in enumerate(e for e in summary if e['arm'] in ranked):
      ax.scatter(e['values'], [i] * len(e['values']), color='gray', s=12, zorder=2)
      err = e['ci'] if _finite(e['ci']) else 0
      ax.errorbar(e['mean'], i, xerr=err, fmt='o', color='C0', capsize=4, zorder=3)
    ax.set_yticks(range(len(ranked)))
    ax.set_yticklabels(ranked)
    ax.invert_yaxis()
    ax.set_xlabel(f'{metric.replace("_", " ")}: mean, 95% CI, seeds (gray)')
    ax.grid(axis='x', alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, 'accuracy.png'), dpi=100)
    plt.close(fig)
    names.append('accuracy.png')

  keys = (manifest or {}).get('searched_keys', [])
  if manifest and manifest['kind'] in ('search_space', 'grid') and len(keys) >= 2:
    x_key, y_key = (('optim.lr', 'optim.weight_decay') if {'optim.lr', 'optim.weight_decay'}
                    <= set(keys) else keys[:2])
    pts = [(r[x_key], r[y_key], r['best_val_accuracy'], r['stage']) for r in rows
           if r['status'] == 'done' and _finite(r['best_val_accuracy'])]
    pts = [p for p in pts if isinstance(p[0], (int, float)) and isinstance(p[1], (int, float))]
    if pts:
      fig, ax = plt.subplots(figsize=(6, 4.5))
      log = lambda v: math.log10(v) if v > 0 else NAN
      for stage, marker in ((1, 'o'), (2, '^')):
        s = [p for p in pts if p[3] == stage]
        if s:
          sc = ax.scatter([log(p[0]) for p in s], [log(p[1]) for p in s], c=[p[2] for p in s],
                          marker=marker, cmap='viridis', vmin=min(p[2] for p in pts),
                          vmax=max(p[2] for p in pts), s=50, edgecolors='k',
                          label='coarse' if stage == 1 else 'fine')
      fig.colorbar(sc, label='best val accuracy')
      ax.set_xlabel(f'log10 {x_key}')
      ax.set_ylabel(f'log10 {y_key}')
      if any(p[3] == 2 for p in pts):
        ax.legend()
      fig.tight_layout()
      fig.savefig(os.path.join(workdir, 'search.png'), dpi=100)
      plt.close(fig)
      names.append('search.png')
  return names


def write_and_print(workdir: str, metric: Optional[str] = None, log=print) -> Dict[str, Any]:
  out = write(workdir, metric)
  log('')
  if out['warning']:
    log(out['warning'].replace('**', ''))
  for line in out['lines']:
    log(line)
  log(f'\nwrote {os.path.join(workdir, "results.csv")}, {os.path.join(workdir, "report.md")}'
      + ''.join(f', {os.path.join(workdir, p)}' for p in out['plots']))
  return out
