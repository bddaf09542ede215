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
from lib.sweeps import ensembles as ensembles_lib
from lib.sweeps.collect import COLUMNS, _csv, _runs, _write_csv, read_csv, results  # noqa: F401
from lib.sweeps.plots import _plots, _train_curve  # noqa: F401
from lib.sweeps.stats import (NAN, _finite, holm, mean_ci, paired, summarize,  # noqa: F401
                              t_quantile)

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
  summary = summarize(rows, metric, baseline)
  keys = (manifest or {}).get('searched_keys', [])
  _write_csv(os.path.join(workdir, 'results.csv'), rows, keys)
  plots = _plots(workdir, rows, summary, metric, manifest)
  lines = table(summary, metric, baseline)
  ens = _ensembles(workdir, rows) if ensembles else []
  md = [f'# Ablation report: {workdir}', '']
  if manifest:
    cmd = f'{manifest["module"]}{":" + manifest["arg"] if manifest.get("arg") else ""}'
    md += [f'Sweep `{cmd}` ({manifest["kind"]}), seeds {manifest["seeds"]}' +
           (f', command-line overrides `{manifest["overrides"]}`' if manifest['overrides'] else '')
           + '.', '']
  done = sum(r['status'] == 'done' for r in rows)
  md += [f'Budget: {_budget(rows)}. Runs: {done} of {len(rows)} done.', '']
  md += explanation(metric, baseline, summary) + lines + ['']
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
          'warning': test_split_warning(metric), 'ensembles': ens}


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


def write_and_print(workdir: str, metric: Optional[str] = None, log=print,
                    ensembles: bool = True) -> Dict[str, Any]:
  out = write(workdir, metric, ensembles)
  log('')
  if out['warning']:
    log(out['warning'].replace('**', ''))
  for line in out['lines']:
    log(line)
  if out['ensembles']:
    log('\nEnsembles of each arm\'s seeds:')
    for line in ensembles_lib.table(out['ensembles']):
      log(line)
  files = ['results.csv', 'report.md'] + ([ensembles_lib.CSV_FILE] if out['ensembles'] else [])
  log(f'\nwrote {", ".join(os.path.join(workdir, p) for p in files + out["plots"])}')
  return out
