"""The ablation report of a sweep directory W.

  W/results.csv   one row per run (collect.py)
  W/report.md     per arm: mean +- std and 95% CI over seeds of the ranking metric (best
                  val accuracy unless asked otherwise), the test accuracy of the best-val
                  checkpoints beside it; the difference to the baseline arm, paired over
                  seeds (t-test, raw and Holm-adjusted p; stats.py); ranked; failures listed
  W/*.png         the learning curves, each arm's accuracy, a search's points (plots.py)
  W/ensembles.csv per arm with two or more finished seeds, the accuracy of the ensemble of
                  its seeds beside their mean (ensembles.py; also a table in report.md)

Ranking is by a validation metric by default, for every kind of sweep: ranking by test
accuracy would be selection on the test split, so the test accuracy of each run's best-val
checkpoint is reported, never ranked on, unless the caller asks (and the report warns).

This module writes the report: the ranked table and the text above it, report.md, and
the files of collect.py and plots.py; their names are kept importable from here.
"""
import json
import os
from typing import Any, Dict, List, Optional, Sequence

from lib.core.errors import UserError
from lib.runs.rundir import RunDir
from lib.sweeps import adaptive
from lib.sweeps import ensembles as ensembles_lib
from lib.sweeps.collect import COLUMNS, _csv, _runs, _write_csv, read_csv, results  # noqa: F401
from lib.sweeps.plots import _plots, _train_curve  # noqa: F401
from lib.sweeps.stats import (NAN, _finite, holm, mean_ci, paired, per_seed_values,  # noqa: F401
                              summarize, t_quantile)

def choose_metric(manifest, rows) -> str:
  """Every kind of sweep ranks by the selection metric, best val accuracy: the test
  accuracy is reported beside it, and ranking by it would select on the test split."""
  return 'best_val_accuracy'


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


def write(workdir: str, metric: Optional[str] = None, ensembles: bool = True) -> Dict[str, Any]:
  """Writes results.csv, report.md and the PNGs (and ensembles.csv with `ensembles`,
  the ensemble of each arm's seeds); returns {metric, summary, lines, ensembles}."""
  manifest, rows = results(workdir)
  for r in rows:
    r['_root'] = workdir
  metric = metric or choose_metric(manifest, rows)
  if metric not in ('best_val_accuracy', 'final_val_accuracy', 'test_accuracy'):
    raise UserError(f'--metric={metric}; valid: best_val_accuracy, final_val_accuracy, '
                    'test_accuracy')
  baseline = (manifest or {}).get('baseline')
  target = (manifest or {}).get('adaptive')
  first = len(manifest['seeds']) if target else None
  summary = summarize(rows, metric, baseline, first)
  keys = (manifest or {}).get('searched_keys', [])
  _write_csv(os.path.join(workdir, 'results.csv'), rows, keys)
  plots = _plots(workdir, rows, summary, metric, manifest)
  seed_lines = []
  if target:
    state = adaptive.matching_state(workdir, manifest)
    seed_lines = adaptive_table(summary, baseline, target, first, state)
    plots.append(adaptive_plot(workdir, rows, metric, baseline, target, first))
  lines = table(summary, metric, baseline)
  ens = _ensembles(workdir, rows) if ensembles else []
  md = [f'# Ablation report: {workdir}', '']
  if manifest:
    cmd = f'{manifest["module"]}{":" + manifest["arg"] if manifest.get("arg") else ""}'
    seeds = (f'seeds by precision (round 1: seeds {manifest["seeds"]})' if target
             else f'seeds {manifest["seeds"]}')
    md += [f'Sweep `{cmd}` ({manifest["kind"]}), {seeds}' +
           (f', command-line overrides `{manifest["overrides"]}`' if manifest['overrides'] else '')
           + '.', '']
  done = sum(r['status'] == 'done' for r in rows)
  md += [f'Budget: {_budget(rows)}. Runs: {done} of {len(rows)} done.', '']
  md += explanation(metric, baseline, summary, first) + lines + ['']
  md += seed_lines
  md += ensembles_lib.markdown(ens)
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
          'warning': test_split_warning(metric), 'ensembles': ens, 'seed_lines': seed_lines}


def adaptive_table(summary, baseline, target, first, state) -> List[str]:
  """The seeds section of an adaptive sweep's report: per arm, how many seeds it took,
  its interval's half-width and why it stopped (from W/adaptive.json's last round)."""
  last = (state or {}).get('rounds', [{}])[-1].get('arms', {}) if state else {}
  finished = bool(state and state.get('done'))
  what = 'Δ' if baseline else 'the mean'
  out = [f'Seeds by precision: target ±{target["ci_halfwidth"]:g} for the 95% CI of {what}, '
         f'{target["min"]} to {target["max"]} seeds per arm' +
         (f', at most {target["max_runs"]} runs' if target.get('max_runs') else '') +
         (f', at most {target["max_hours"]:g} training hours' if target.get('max_hours') else '')
         + f'; {len((state or {}).get("rounds", []))} round(s)' +
         ('' if finished else ' so far (not finished: rerun the command to go on)') + '. '
         f'The CIs of {what} (and the p-values) are Stein\'s two-stage intervals: the spread '
         f'of the first {first} seeds, t with their degrees of freedom, over the square root '
         'of the seeds run. The rule chose the seeds from that spread only, so the interval covers the '
         'true value 95% of the time however many seeds it chose (lib/sweeps/adaptive.py).',
         '', '| arm | seeds | pairs | 95% CI half-width | stopped |',
         '| --- | ---: | ---: | ---: | --- |']
  for e in summary:
    if e['arm'] == baseline:
      out.append(f'| **{e["arm"]}** | {e["runs"]} | | | baseline (every seed an arm runs) |')
      continue
    half = e.get('diff_ci') if baseline else e.get('ci')
    why = (last.get(e['arm']) or {}).get('stopped') or ('running' if not finished else '')
    pairs = e.get('pairs', e['n']) if baseline else e['n']
    out.append(f'| {e["arm"]} | {e["runs"]} | {pairs} | {_f(half)} | {why} |')
  return out + ['']


def adaptive_plot(workdir, rows, metric, baseline, target, first) -> str:
  """W/seeds.png: each arm's 95% CI half-width against the seeds it had, Stein's
  (what the rule used) and the plain t interval's over those seeds, and the target."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  values = per_seed_values(rows, metric)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for i, arm in enumerate(a for a in values if a != baseline):
    ks, stein, plain = [], [], []
    for k in range(first, len(values[arm]) + 1):
      iv = adaptive.interval(values, baseline, arm, first, k)
      if iv:
        ks.append(k)
        stein.append(iv['halfwidth'])
        plain.append(mean_ci(adaptive.measured(values, baseline, arm, k))[2])
    if ks:
      ax.plot(ks, stein, '-o', color=f'C{i % 10}', ms=3, label=arm)
      ax.plot(ks, plain, ':', color=f'C{i % 10}')
  ax.axhline(target['ci_halfwidth'], color='k', ls='--', lw=1, label='target')
  ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  ax.set_xlabel('seeds')
  ax.set_ylabel(f'95% CI half-width of {"Δ" if baseline else "the mean"}')
  ax.set_title('solid: Stein (round-1 spread, what the rule used); dotted: plain t', fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'seeds.png'), dpi=100)
  plt.close(fig)
  return 'seeds.png'


def _ensembles(workdir: str, rows) -> List[Dict[str, Any]]:
  """The ensembles of each arm's seeds (ensembles.py), written to ensembles.csv; none in
  a job of several processes (process 0 alone writes the report: evaluate them
  afterwards with launch.report W)."""
  from lib.core import sharding
  if sharding.joined():
    return []
  ens = ensembles_lib.arm_ensembles(workdir, rows)
  if ens:
    ensembles_lib.write_csv(workdir, ens)
  return ens


def test_split_warning(metric: str) -> str:
  """The warning a test-accuracy ranking carries ('' for any other metric)."""
  if metric != 'test_accuracy':
    return ''
  return ('**Warning: ranked by test accuracy** (--metric=test_accuracy). Ranking arms by '
          'test accuracy is selection on the test split: the top arm\'s test accuracy is '
          'then an optimistic estimate, and the test split no longer measures generalization. '
          'Rank by best val accuracy (the default) to choose, and read test accuracy only '
          'as a report.')


def explanation(metric: str, baseline: Optional[str], summary,
                first_round: Optional[int] = None) -> List[str]:
  """The paragraphs above the table in report.md: what the ranking and columns mean
  (`first_round`: a sweep whose seeds were chosen by precision, its Δ intervals Stein's)."""
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
  if baseline and first_round:
    m = sum(_finite(e.get('p_holm')) for e in summary)
    text += (f' Δ is the mean difference in {name} to the baseline over the seeds both ran '
             '(the baseline\'s own mean is over all its seeds, so Δ need not equal the '
             'difference of the means). Its 95% CI and p are Stein\'s two-stage interval and '
             f'test, from the spread of the first {first_round} seeds\' differences (seeds by '
             'precision, below); `p (Holm)` corrects p for comparing several arms with one '
             f'baseline ({m} in the family here). Where those first differences are all equal, '
             'p reads `undefined (no spread)`. The arm\'s own 95% CI column is the plain t '
             'interval over the seeds it ran, which the rule did not target.')
  elif baseline:
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


def write_and_print(workdir: str, metric: Optional[str] = None, log=print,
                    ensembles: bool = True) -> Dict[str, Any]:
  out = write(workdir, metric, ensembles)
  log('')
  if out['warning']:
    log(out['warning'].replace('**', ''))
  for line in out['lines']:
    log(line)
  if out['seed_lines']:
    log('')
  for line in out['seed_lines']:
    log(line)
  if out['ensembles']:
    log('\nEnsembles of each arm\'s seeds:')
    for line in ensembles_lib.table(out['ensembles']):
      log(line)
  files = ['results.csv', 'report.md'] + ([ensembles_lib.CSV_FILE] if out['ensembles'] else [])
  log(f'\nwrote {", ".join(os.path.join(workdir, p) for p in files + out["plots"])}')
  return out
