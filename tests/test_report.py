"""The report's statistics and wording, on synthetic rows: no training."""
import json
import math
import os
import socket
import subprocess
import time

import pytest

from lib.runs import lock
from lib.runs.rundir import RunDir
from lib.sweeps import report

NAN = float('nan')


def row(arm, seed, val, test, status='done', gap=0.1):
  return {'arm': arm, 'seed': seed, 'status': status, 'overrides': '', 'best_val_accuracy': val,
          'final_val_accuracy': val, 'test_accuracy': test, 'train_val_gap': gap}


def test_holm_equals_a_hand_computation():
  # sorted 0.01, 0.03, 0.04, 0.20 times 4, 3, 2, 1 = 0.04, 0.09, 0.08, 0.20; step-down keeps
  # them monotone, so 0.04's adjusted p is 0.09 (not 0.08).
  assert report.holm([0.01, 0.04, 0.03, 0.20]) == pytest.approx([0.04, 0.09, 0.09, 0.20])
  assert report.holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])      # capped at 1
  assert report.holm([0.3]) == pytest.approx([0.3])                  # one test: unchanged
  # A p that is not a number is no member of the family: m = 2 here.
  adjusted = report.holm([0.01, NAN, 0.04])
  assert adjusted[0] == pytest.approx(0.02) and adjusted[2] == pytest.approx(0.04)
  assert math.isnan(adjusted[1])


def test_summary_adjusts_the_arms_compared_with_the_baseline():
  base = [0.50, 0.60, 0.70]
  rows = [row('base', s, v, v) for s, v in enumerate(base)]
  rows += [row('a', s, v + d, v) for s, (v, d) in enumerate(zip(base, (0.02, 0.03, 0.01)))]
  rows += [row('b', s, v + d, v) for s, (v, d) in enumerate(zip(base, (0.01, -0.01, 0.03)))]
  s = {e['arm']: e for e in report.summarize(rows, 'best_val_accuracy', 'base')}
  raw = [s['a']['p'], s['b']['p']]
  assert [s['a']['p_holm'], s['b']['p_holm']] == pytest.approx(report.holm(raw))
  assert s['a']['p_holm'] == pytest.approx(2 * min(raw))
  assert 'p_holm' not in s['base']
  # One comparison: the Holm p is the raw p.
  one = {e['arm']: e for e in report.summarize([r for r in rows if r['arm'] != 'b'],
                                               'best_val_accuracy', 'base')}
  assert one['a']['p_holm'] == one['a']['p']


@pytest.mark.parametrize('kind', ['arms', 'grid', 'search_space'])
def test_every_sweep_ranks_by_best_val_even_where_test_ranks_otherwise(kind):
  # `val_first` wins on val but loses on test: the ranking must follow val.
  rows = [row('val_first', 0, 0.80, 0.60), row('val_first', 1, 0.82, 0.62),
          row('test_first', 0, 0.70, 0.75), row('test_first', 1, 0.72, 0.77)]
  metric = report.choose_metric({'kind': kind}, rows)
  assert metric == 'best_val_accuracy'
  s = report.summarize(rows, metric, 'test_first')
  assert [e['arm'] for e in s] == ['val_first', 'test_first']
  assert s[0]['diff'] == pytest.approx(0.10)                      # Δ on the ranking metric
  assert s[0]['test_mean'] == pytest.approx(0.61)
  lines = report.table(s, metric, 'test_first')
  head = [h.strip() for h in lines[0].strip('|').split('|')]
  assert head[4] == 'best val accuracy mean ± std' and 'p (Holm)' in head
  test_col = head.index('test accuracy of best-val ckpt, mean ± std')
  cells = [c.strip() for c in lines[2].strip('|').split('|')]
  assert cells[1] == 'val_first' and cells[test_col] == '0.6100 ± 0.0141'


def test_differences_without_spread_have_no_p_and_leave_the_holm_family():
  base = [0.50, 0.60, 0.70]
  rows = [row('base', s, v, v) for s, v in enumerate(base)]
  rows += [row('flat', s, v + 0.01, v) for s, v in enumerate(base)]   # +0.01 on every seed
  rows += [row('a', s, v + d, v) for s, (v, d) in enumerate(zip(base, (0.02, 0.03, 0.01)))]
  rows += [row('b', s, v + d, v) for s, (v, d) in enumerate(zip(base, (0.01, -0.01, 0.03)))]
  s = report.summarize(rows, 'best_val_accuracy', 'base')
  by = {e['arm']: e for e in s}
  assert by['flat']['p_undefined'] and math.isnan(by['flat']['p'])
  assert math.isnan(by['flat']['p_holm'])
  # The family is a and b alone: m = 2.
  assert [by['a']['p_holm'], by['b']['p_holm']] == pytest.approx(
      report.holm([by['a']['p'], by['b']['p']]))
  line = next(l for l in report.table(s, 'best_val_accuracy', 'base') if '| flat |' in l)
  assert line.count('undefined (no spread)') == 2 and '| 0.000 |' not in line
  text = ' '.join(report.explanation('best_val_accuracy', 'base', s))
  assert '2 in the family' in text and 'left out of the Holm family' in text
  # Equal up to rounding is equal: these differences spread by 2e-17, which a t-test
  # would turn into p ~ 0.
  assert math.isnan(report.paired([0.31, 0.62, 0.73], [0.21, 0.52, 0.63])[2])
  # One seed is not "no spread": just no test (n/a).
  single = report.summarize([r for r in rows if r['seed'] == 0], 'best_val_accuracy', 'base')
  flat = next(e for e in single if e['arm'] == 'flat')
  assert not flat['p_undefined'] and math.isnan(flat['p'])


def test_ranking_by_test_accuracy_warns_of_selection_on_the_test_split():
  rows = [row('a', 0, 0.80, 0.60), row('b', 0, 0.70, 0.75)]
  s = report.summarize(rows, 'test_accuracy', 'a')
  assert [e['arm'] for e in s] == ['b', 'a']
  text = report.explanation('test_accuracy', 'a', s)
  assert text[0].startswith('**Warning: ranked by test accuracy**')
  assert 'selection on the test split' in text[0]
  head = report.table(s, 'test_accuracy', 'a')[0]
  assert 'test accuracy mean ± std' in head and 'best val' in head
  for metric in ('best_val_accuracy', 'final_val_accuracy'):
    assert report.test_split_warning(metric) == ''
    assert 'Warning' not in ' '.join(report.explanation(metric, 'a', s))


def _run(path, metrics):
  rd = RunDir(path)
  os.makedirs(path)
  rd.write_config({'seed': 0})
  rd.set_status('done', best_val_accuracy=0.6, test={'accuracy': 0.55})
  for m in metrics:
    rd.append_metrics(m)


def test_gap_is_train_eval_minus_val_at_the_last_evaluation(tmp_path):
  w = str(tmp_path / 'w')
  _run(os.path.join(w, 'new', 'seed_0'),
       [{'step': 1, 'epoch': 1, 'running_train_accuracy': 0.5, 'train_eval_accuracy': 0.7,
         'val_accuracy': 0.55, 'wall_time': 1.0},
        {'step': 2, 'epoch': 2, 'running_train_accuracy': 0.6, 'train_eval_accuracy': 0.9,
         'val_accuracy': 0.6, 'wall_time': 2.0}])
  _run(os.path.join(w, 'old', 'seed_0'),   # written before train_eval_accuracy existed
       [{'step': 2, 'epoch': 2, 'train_accuracy': 0.6, 'val_accuracy': 0.6, 'wall_time': 2.0}])
  _, rows = report.results(w)
  by = {r['arm']: r for r in rows}
  assert by['new']['train_val_gap'] == pytest.approx(0.3)
  assert math.isnan(by['old']['train_val_gap'])
  s = report.summarize(rows, 'best_val_accuracy', None)
  lines = report.table(s, 'best_val_accuracy', None)
  assert 'train_eval − val accuracy (last eval)' in lines[0]
  assert lines[[l.split('|')[2].strip() for l in lines].index('old')].endswith('| n/a |')
  # The train panel of curves.png: train_eval where every curve has it, else running.
  key, title = report._train_curve([by['new']['_curve']])
  assert key == 'train_eval_accuracy' and 'eval mode' in title
  key, title = report._train_curve([by['new']['_curve'], by['old']['_curve']])
  assert key in ('running_train_accuracy', 'train_accuracy') and 'running' in title


def test_a_run_left_running_by_a_killed_process_reads_interrupted(tmp_path):
  run = tmp_path / 'a' / 'seed_0'
  rd = RunDir(str(run))
  rd.write_config({'seed': 0})
  rd.set_status('running', step=40)
  assert report.results(str(tmp_path))[1][0]['status'] == 'interrupted'   # nobody holds it
  holder = subprocess.Popen(['sleep', '30'])
  try:
    with open(run / lock.LOCK_FILE, 'w') as f:
      json.dump({'state': 'running', 'host': socket.gethostname(), 'pid': holder.pid,
                  'heartbeat': time.time(), 'nonce': 'n'}, f)
    assert report.results(str(tmp_path))[1][0]['status'] == 'running'
  finally:
    holder.kill()
    holder.wait()
