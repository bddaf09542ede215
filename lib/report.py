"""The ablation report of a sweep directory W.

  W/results.csv   one row per run: arm, seed, overrides, best / final val accuracy, test
                  accuracy of the best checkpoint, train-val gap, steps, wall time, status
  W/report.md     per arm: mean +- std and 95% CI over seeds; the difference to the
                  baseline arm, paired over seeds (t-test); ranked; failures listed
  W/curves.png    train and val accuracy per arm (mean over seeds) against epochs
  W/accuracy.png  each arm's mean with its 95% CI, and every seed
  W/search.png    searches: (log lr, log wd) or the first two searched keys, coloured by
                  val accuracy

Statistics: std has ddof=1; the 95% CI is mean +- t(0.975, n-1) * std / sqrt(n); the paired
difference uses the seeds both arms finished, and its two-sided p-value comes from the
t distribution with n-1 degrees of freedom. With one seed there is no CI (n/a).
"""
import csv
import json
import math
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from lib.errors import UserError
from lib.rundir import RunDir
from lib import runner

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
  if sd == 0:
    p = 1.0 if mean == 0 else 0.0
  else:
    p = float(2 * stats.t.sf(abs(mean / (sd / math.sqrt(n))), n - 1))
  return mean, half, p, n


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
    row = {
        'arm': run['arm'], 'seed': run['seed'], 'stage': run['stage'],
        'status': status.get('status', 'pending' if not rd.has_run() else 'running'),
        'overrides': '; '.join(f'{k}={v}' for k, v in run['overrides'].items()),
        'best_val_accuracy': status.get('best_val_accuracy', NAN),
        'final_val_accuracy': status.get('final_val_accuracy', NAN),
        'test_accuracy': status.get('test', {}).get('accuracy', NAN),
        'train_val_gap': (last['train_accuracy'] - last['val_accuracy']) if last else NAN,
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
  """Ablations rank by test accuracy of each run's best-val checkpoint (when every
  finished run has one); searches and grids by best val accuracy (selection metric)."""
  done = [r for r in rows if r['status'] == 'done']
  kind = (manifest or {}).get('kind', 'arms')
  if kind == 'arms' and done and all(_finite(r['test_accuracy']) for r in done):
    return 'test_accuracy'
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
    entry = {'arm': arm, 'n': len(values), 'runs': sum(count.values()), 'counts': count,
             'mean': mean, 'std': std, 'ci': half, 'values': values,
             'overrides': next((r['overrides'] for r in rows if r['arm'] == arm), ''),
             'best_val_mean': mean_ci([seeds[s]['best_val_accuracy'] for s in seeds])[0],
             'gap_mean': mean_ci([seeds[s]['train_val_gap'] for s in seeds
                                  if _finite(seeds[s]['train_val_gap'])])[0]}
    if baseline and arm != baseline:
      common = sorted(set(seeds) & set(base))
      d, dh, p, n = paired([seeds[s][metric] for s in common], [base[s][metric] for s in common])
      entry.update(diff=d, diff_ci=dh, p=p, pairs=n)
    out.append(entry)
  out.sort(key=lambda e: (-e['mean'] if _finite(e['mean']) else math.inf, e['arm']))
  return out


# ---------------------------------------------------------------- writing


def _f(x, digits=4, signed=False) -> str:
  if not _finite(x):
    return 'n/a'
  x = 0.0 if abs(x) < 0.5 * 10 ** -digits else x   # no -0.0000
  return f'{x:+.{digits}f}' if signed else f'{x:.{digits}f}'


def _p(p) -> str:
  if not _finite(p):
    return 'n/a'
  return '<0.001' if p < 0.001 else f'{p:.3f}'


def table(summary: Sequence[Dict[str, Any]], metric: str, baseline: Optional[str]) -> List[str]:
  name = metric.replace('_', ' ')
  head = ['rank', 'arm', 'overrides', 'seeds', f'{name} mean ± std', '95% CI']
  if baseline:
    head += [f'Δ vs {baseline} (paired)', '95% CI of Δ', 'p']
  head += ['best val', 'train−val gap']
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
        cells += ['baseline', '', '']
      else:
        dci = (f'[{_f(e["diff"] - e["diff_ci"], signed=True)}, '
               f'{_f(e["diff"] + e["diff_ci"], signed=True)}]' if _finite(e.get('diff_ci'))
               else 'n/a')
        cells += [_f(e.get('diff'), signed=True), dci, _p(e.get('p'))]
    cells += [_f(e['best_val_mean']), _f(e['gap_mean'], signed=True)]
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
  md += [f'Budget: {_budget(rows)}. Runs: {done} of {len(rows)} done.', '',
         f'Ranked by **{metric.replace("_", " ")}** (mean over seeds' +
         ('; test accuracy of each run\'s best-val checkpoint' if metric == 'test_accuracy'
          else '') + '). 95% CIs use the t distribution; Δ is paired by seed against the '
         'baseline; the train−val gap is at the last evaluation (train accuracy is the running '
         'mean over that epoch, with augmentation and regularization on).', '']
  md += lines + ['']
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
  return {'metric': metric, 'summary': summary, 'lines': lines, 'plots': plots, 'rows': rows}


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


def _plots(workdir, rows, summary, metric, manifest) -> List[str]:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  names = []
  ranked = [e['arm'] for e in summary if e['n']][:10]   # the top ten arms, for legibility
  if ranked:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for arm in ranked:
      curves = [r['_curve'] for r in rows if r['arm'] == arm and r['status'] == 'done']
      n = min(len(c) for c in curves)
      epochs = [row['epoch'] for row in curves[0][:n]]
      for ax, key in zip(axes, ('train_accuracy', 'val_accuracy')):
        y = np.mean([[row[key] for row in c[:n]] for c in curves], axis=0)
        ax.plot(epochs, y, label=arm)
    for ax, title in zip(axes, ('train accuracy (running mean)', 'val accuracy')):
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
  for line in out['lines']:
    log(line)
  log(f'\nwrote {os.path.join(workdir, "results.csv")}, {os.path.join(workdir, "report.md")}'
      + ''.join(f', {os.path.join(workdir, p)}' for p in out['plots']))
  return out
