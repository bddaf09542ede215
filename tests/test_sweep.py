"""Sweeps: pure expansion, validation before launch, resumability, submitit, the report."""
import glob
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import quickstart_sweep
from lib.core import config as config_lib
from lib.core.errors import UserError
from lib.runs.rundir import RunDir
from lib.sweeps import report, runner
from lib.sweeps import sweep as sweep_lib
from lib.training import resolve as resolve_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
quiet = lambda message: None
SPACE = {'optim.lr': {'min': 1e-3, 'max': 1.0, 'scaling': 'log'},
         'optim.weight_decay': {'min': 1e-5, 'max': 1e-2, 'scaling': 'log'},
         'regularize.dropout': {'min': 0.0, 'max': 0.5},
         'model.activation': {'feasible_points': ['relu', 'tanh']}}


def tiny_base(epochs=2):
  c = quickstart_sweep.get_config()
  c.model.width = 64
  c.train.epochs = epochs
  return c


# ---------------------------------------------------------------- expansion


def test_expansion_is_pure_and_deterministic():
  spec = {'search_space': SPACE, 'trials': 12, 'search_seed': 3, 'seeds': 2}
  a, b = sweep_lib.parse(spec), sweep_lib.parse(json.loads(json.dumps(spec)))
  assert a.runs() == b.runs()
  assert len(a.runs()) == 24 and a.seeds == (0, 1)
  assert [r.name for r in a.runs()[:3]] == ['trial_00/seed_0', 'trial_00/seed_1', 'trial_01/seed_0']
  assert sweep_lib.parse({**spec, 'search_seed': 4}).arms != a.arms
  # adding trials keeps the earlier draws
  more = sweep_lib.parse({**spec, 'trials': 20})
  assert all(more.arms[k] == v for k, v in a.arms.items())
  assert sweep_lib.parse(spec, seeds=5).seeds == (0, 1, 2, 3, 4)
  assert spec == {'search_space': SPACE, 'trials': 12, 'search_seed': 3, 'seeds': 2}  # untouched


def test_search_draws_follow_their_scaling():
  points = sweep_lib.draw(SPACE, 400, 0)
  lr = np.array([p['optim.lr'] for p in points])
  drop = np.array([p['regularize.dropout'] for p in points])
  assert lr.min() >= 1e-3 and lr.max() <= 1.0 and 0 <= drop.min() and drop.max() <= 0.5
  # log-uniform: half the draws below the geometric mid-point; uniform: below the mean
  assert 0.4 < np.mean(lr < math.sqrt(1e-3 * 1.0)) < 0.6
  assert 0.4 < np.mean(drop < 0.25) < 0.6
  assert np.mean(lr < 0.5) > 0.85      # log(500)/log(1000) = 0.9; a linear draw gives 0.5
  assert {p['model.activation'] for p in points} == {'relu', 'tanh'}
  assert all(float(f'{v:.3g}') == v for v in lr)   # three significant digits


def test_grid_is_the_cross_product():
  s = sweep_lib.parse({'grid': {'optim.lr': [0.01, 0.1], 'regularize.l2': [0.0, 1e-4, 1e-3]}})
  assert len(s.arms) == 6
  assert s.arms['lr=0.1,l2=0.0001'] == {'optim.lr': 0.1, 'regularize.l2': 1e-4}
  assert s.baseline is None and s.seeds == (0,)


def test_refine_narrows_around_the_top_k():
  s = sweep_lib.parse({'search_space': SPACE, 'trials': 10, 'refine': {'top_k': 3, 'trials': 5,
                                                                         'margin': 0.1}})
  scores = {arm: i / 10 for i, arm in enumerate(s.arms)}   # trial_09 best
  space, arms = sweep_lib.refine_arms(s, scores)
  top = [s.arms[a] for a in ('trial_09', 'trial_08', 'trial_07')]
  lrs = [p['optim.lr'] for p in top]
  assert space['optim.lr']['min'] <= min(lrs) and space['optim.lr']['max'] >= max(lrs)
  assert space['optim.lr']['min'] >= 1e-3 and space['optim.lr']['max'] <= 1.0
  width = math.log(space['optim.lr']['max'] / space['optim.lr']['min'])
  assert width <= math.log(max(lrs) / min(lrs)) + 0.2 * math.log(1000) + 1e-9
  assert set(space['model.activation']['feasible_points']) == {p['model.activation'] for p in top}
  assert list(arms) == [f'fine_0{i}' for i in range(5)]
  for p in arms.values():
    assert space['optim.lr']['min'] <= p['optim.lr'] * 1.001 and \
        p['optim.lr'] <= space['optim.lr']['max'] * 1.001
  assert sweep_lib.refine_arms(s, scores) == (space, arms)   # pure


@pytest.mark.parametrize('spec, message', [
    ([], 'must return a dict'),
    ({'arms': {}}, 'non-empty'),
    ({'arms': {'a': {}}, 'grid': {'optim.lr': [1]}}, 'exactly one of'),
    ({'arms': {'a b': {}}}, 'names a directory'),
    ({'arms': {'a': {}}, 'baseline': 'b'}, "baseline 'b' is not an arm"),
    ({'arms': {'a': {}}, 'seeds': 0}, 'seeds=0'),
    ({'arms': {'a': {}}, 'seed': 2}, "unknown key 'seed'"),
    ({'search_space': {'optim.lr': {'min': 0, 'max': 1, 'scaling': 'log'}}, 'trials': 2},
     'min > 0'),
    ({'search_space': {'optim.lr': {'min': 1, 'max': 2, 'scaling': 'exp'}}, 'trials': 2},
     'scaling'),
    ({'search_space': {'optim.lr': {'min': 1, 'max': 2}}}, 'trials > 0'),
])
def test_bad_sweeps_fail_with_one_clear_message(spec, message):
  with pytest.raises(UserError, match=message):
    sweep_lib.parse(spec)


@pytest.mark.parametrize('overrides, message', [
    ({'regularize.dropuot': 0.5}, 'arm bad: unknown config key regularize.dropuot; did you mean '
                                  'regularize.dropout'),
    ({'optim.lr': 'fast'}, "arm bad: optim.lr='fast' does not fit that key"),
    ({'regularize.dropout': 1.0}, 'arm bad: .*regularize.dropout'),
    ({'model.name': 'resnet1000'}, "arm bad: unknown model model.name='resnet1000'"),
])
def test_run_configs_fail_naming_arm_and_key(tmp_path, overrides, message):
  s = sweep_lib.parse({'arms': {'good': {'optim.lr': 0.01}, 'bad': overrides}})
  with pytest.raises(UserError, match=message):
    runner.plan(tiny_base(), s.runs(), str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w')   # nothing launched, nothing written


def test_arm_overrides_apply_after_the_base_and_seed_last():
  base = tiny_base()
  base.optim.lr = 0.3                        # as a command-line override would
  s = sweep_lib.parse({'arms': {'a': {'regularize.dropout': 0.2}, 'b': {'optim.lr': 0.01}},
                       'seeds': [4]})
  a, b = (sweep_lib.make_config(base, r) for r in s.runs())
  assert (a.optim.lr, a.regularize.dropout, a.seed) == (0.3, 0.2, 4)
  assert (b.optim.lr, b.regularize.dropout, b.seed) == (0.01, 0.0, 4)
  assert base.seed == 0 and base.regularize.dropout == 0.0    # base untouched


def test_a_resolved_config_is_resolved_once_and_stays_so_until_changed():
  c = resolve_lib.resolve(tiny_base())
  assert config_lib.is_resolved(c) and resolve_lib.resolve(c) is c
  d = config_lib.to_json_dict(c)
  # computed once, handed out as copies (a caller's change cannot reach config.json)
  assert config_lib.to_json_dict(c) == d and config_lib.to_json_dict(c) is not d
  assert d['model']['depth'] > 0
  rebuilt = config_lib.from_resolved_json_dict(d)   # a task's config, across a worker
  assert config_lib.is_resolved(rebuilt) and rebuilt.to_dict() == c.to_dict()
  assert not config_lib.is_resolved(config_lib.from_json_dict(d))   # config.json: not trusted
  c.train.epochs = 3   # a value set afterwards is resolved (checked) again
  assert not config_lib.is_resolved(c) and resolve_lib.resolve(c) is not c
  assert not config_lib.is_resolved(tiny_base())


def test_a_sweep_resolves_each_run_once(tmp_path, monkeypatch):
  resolved = []
  real = resolve_lib.resolve

  def counting(config):
    if not config_lib.is_resolved(config):
      resolved.append(config.seed)
    return real(config)
  monkeypatch.setattr(resolve_lib, 'resolve', counting)
  tasks, _ = tasks_for(str(tmp_path / 'w'), base=tiny_base(epochs=1),
                       spec={'arms': {'a': {}}, 'seeds': 2})
  assert resolved == [0, 1]   # by plan, before anything is launched
  results = runner.execute(tasks, str(tmp_path / 'w'), 'local', log=quiet)
  assert [r['status'] for r in results] == ['done', 'done']
  assert resolved == [0, 1]   # neither the runner nor the run resolved them again


# ---------------------------------------------------------------- statistics


def test_statistics_equal_a_hand_computation():
  # mean 0.6, std 0.1 (ddof 1), t(0.975, 2) = 4.302652729911275
  mean, std, half = report.mean_ci([0.5, 0.6, 0.7])
  assert mean == pytest.approx(0.6) and std == pytest.approx(0.1)
  assert half == pytest.approx(4.302652729911275 * 0.1 / math.sqrt(3), rel=1e-9)
  # paired: differences 0.02, 0.03, 0.01 -> mean 0.02, sd 0.01, t = 2 sqrt(3); for 2 degrees
  # of freedom the t CDF is 1/2 + t / (2 sqrt(2 + t^2)), so p = 1 - t / sqrt(2 + t^2).
  d, dh, p, n = report.paired([0.52, 0.63, 0.71], [0.5, 0.6, 0.7])
  t = 2 * math.sqrt(3)
  assert (n, d) == (3, pytest.approx(0.02))
  assert dh == pytest.approx(4.302652729911275 * 0.01 / math.sqrt(3), rel=1e-6)
  assert p == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-6)
  assert math.isnan(report.mean_ci([0.5])[2]) and math.isnan(report.paired([1.], [0.])[2])
  # Differences without spread: no t-test, so no p (never 0).
  assert math.isnan(report.paired([0.51, 0.61], [0.5, 0.6])[2])


def test_summary_ranks_arms_and_pairs_by_seed():
  def row(arm, seed, acc, status='done'):
    return {'arm': arm, 'seed': seed, 'status': status, 'overrides': '', 'test_accuracy': acc,
            'best_val_accuracy': acc, 'train_val_gap': 0.1}
  rows = [row('base', 0, 0.50), row('base', 1, 0.60), row('base', 2, 0.70),
          row('up', 0, 0.52), row('up', 1, 0.63), row('up', 2, 0.71),
          row('down', 0, 0.40), row('down', 1, 0.45), row('down', 2, float('nan'), 'diverged')]
  metric = report.choose_metric({'kind': 'arms'}, rows)
  assert metric == 'best_val_accuracy'
  s = report.summarize(rows, metric, 'base')
  assert [e['arm'] for e in s] == ['up', 'base', 'down']
  up, base, down = s
  assert up['diff'] == pytest.approx(0.02) and up['pairs'] == 3
  assert down['n'] == 1 + 1 and down['runs'] == 3 and down['pairs'] == 2
  assert down['diff'] == pytest.approx(((0.40 - 0.50) + (0.45 - 0.60)) / 2)
  assert 'diff' not in base
  assert up['test_mean'] == pytest.approx(0.62)
  lines = report.table(s, metric, 'base')
  assert '| 1 | up |' in lines[2] and '+0.0200' in lines[2] and '| 2 | **base** |' in lines[3]
  assert '0.6200 ± 0.0954' in lines[2]   # test accuracy, reported beside the ranking


# ---------------------------------------------------------------- running


def tasks_for(workdir, base=None, spec=None):
  s = sweep_lib.parse(spec or {'arms': {'p0': {}, 'p5': {'regularize.dropout': 0.5}},
                               'seeds': 2})
  return runner.plan(base or tiny_base(), s.runs(), workdir), s


def write_sweep(workdir, s):
  runner.write_manifest(workdir, sweep_lib.manifest('experiments/test.py', None, {}, s))


DETERMINISTIC = ('step', 'running_train_loss', 'running_train_accuracy', 'train_eval_accuracy',
                 'val_loss', 'val_accuracy')


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  full = str(tmp_path_factory.mktemp('sweep') / 'full')
  tasks, s = tasks_for(full)
  write_sweep(full, s)
  runner.execute(tasks, full, 'local', log=quiet)
  return full, s


def assert_same_results(full, other):
  a, b = report.write(full), report.write(other)
  for ra, rb in zip(a['rows'], b['rows']):
    assert ra['status'] == rb['status'] == 'done'
    for key in ('best_val_accuracy', 'final_val_accuracy', 'test_accuracy', 'best_step'):
      assert ra[key] == pytest.approx(rb[key], abs=1e-6), key
    for x, y in zip(ra['_curve'], rb['_curve']):
      for key in DETERMINISTIC:
        assert x[key] == pytest.approx(y[key], abs=1e-5), key
  assert a['lines'] == b['lines']


def test_parallel_worker_processes_give_the_same_results(uninterrupted, tmp_path):
  full, s = uninterrupted
  w = str(tmp_path / 'par')
  tasks, _ = tasks_for(w)
  write_sweep(w, s)
  lines = []
  results = runner.execute(tasks, w, 'local', parallel=2, log=lines.append)
  assert sorted(r['status'] for r in results) == ['done'] * 4
  assert lines[0] == '4 runs on 2 worker processes; each run logs to <run>/log.txt'
  assert all(os.path.getsize(os.path.join(t['workdir'], 'log.txt')) for t in tasks)
  assert_same_results(full, w)


def test_killed_sweep_resumes_to_the_uninterrupted_results(uninterrupted, tmp_path):
  full, s = uninterrupted
  cut = str(tmp_path / 'cut')

  tasks_cut, _ = tasks_for(cut)
  write_sweep(cut, s)
  with pytest.raises(runner.Killed):    # killed in the middle of the third run
    runner.execute(tasks_cut, cut, 'local', log=quiet, kill_at={'run': 2, 'step': 40})
  finished = {t['workdir']: os.path.getmtime(os.path.join(t['workdir'], 'status.json'))
              for t in tasks_cut[:2]}
  assert RunDir(tasks_cut[2]['workdir']).read_status()['status'] == 'running'
  assert not os.path.exists(tasks_cut[3]['workdir'])
  lines = []
  results = runner.execute(tasks_cut, cut, 'local', log=lines.append)
  assert [(r['arm'], r['seed']) for r in results] == [('p5', 0), ('p5', 1)]   # only the rest
  assert lines[0].startswith('2 of 4 runs already finished')
  for path, mtime in finished.items():
    assert os.path.getmtime(os.path.join(path, 'status.json')) == mtime
  assert runner.execute(tasks_cut, cut, 'local', log=quiet) == []    # a third time: nothing
  assert_same_results(full, cut)


def test_failed_and_diverged_runs_are_recorded_and_the_sweep_goes_on(tmp_path):
  w = str(tmp_path / 'w')
  tasks, s = tasks_for(w, spec={'arms': {'ok': {}, 'boom': {'optim.lr': 1e6}},
                                'baseline': 'ok'})
  tasks.append({**tasks[0], 'arm': 'broken', 'workdir': os.path.join(w, 'broken', 'seed_0'),
                'config': {**tasks[0]['config'], 'data': {**tasks[0]['config']['data'],
                                                          'source': 'npz',
                                                          'path': str(tmp_path / 'none.npz')}}})
  write_sweep(w, s)
  results = runner.execute(tasks, w, 'local', log=quiet)
  assert [r['status'] for r in results] == ['done', 'diverged', 'failed']
  assert 'none.npz' in RunDir(tasks[2]['workdir']).read_status()['reason']
  out = report.write(w)
  md = open(os.path.join(w, 'report.md')).read()
  assert '`boom/seed_0`: diverged' in md
  assert [t['arm'] for t in runner.pending(tasks)] == ['broken']
  assert out['summary'][0]['arm'] == 'ok'


def test_submitit_local_executor_runs_arms(tmp_path, monkeypatch):
  """The SLURM code path (a submitit job array) through submitit's local executor."""
  monkeypatch.setenv('PYTHONPATH', ROOT)
  w = str(tmp_path / 'w')
  tasks, s = tasks_for(w, base=tiny_base(epochs=1),
                       spec={'arms': {'a': {}, 'b': {'regularize.l2': 0.0}}})
  write_sweep(w, s)
  params = runner.submitit_params('local', timeout_min=10)
  results = runner.execute(tasks, w, 'submitit_local', submitit_args=params, log=quiet)
  assert sorted((r['arm'], r['status']) for r in results) == [('a', 'done'), ('b', 'done')]
  for t in tasks:
    status = RunDir(t['workdir']).read_status()
    assert status['status'] == 'done' and 'accuracy' in status['test']
  assert glob.glob(os.path.join(w, 'slurm', '*', '*_log.out'))
  assert runner.execute(tasks, w, 'submitit_local', submitit_args=params, log=quiet) == []


def test_search_with_refine_stage_and_hparams_in_tensorboard(tmp_path):
  w = str(tmp_path / 'w')
  spec = {'search_space': {'optim.lr': {'min': 0.01, 'max': 0.3, 'scaling': 'log'},
                           'optim.weight_decay': {'min': 1e-5, 'max': 1e-2, 'scaling': 'log'}},
          'trials': 3, 'refine': {'top_k': 1, 'trials': 2}}
  tasks, s = tasks_for(w, base=tiny_base(epochs=1), spec=spec)
  write_sweep(w, s)
  runner.execute(tasks, w, 'local', log=quiet)
  space, arms = sweep_lib.refine_arms(s, runner.stage_scores(tasks))
  best = max(s.arms, key=lambda a: runner.stage_scores(tasks)[a])
  assert space['optim.lr']['min'] <= s.arms[best]['optim.lr'] <= space['optim.lr']['max']
  tasks2 = runner.plan(tiny_base(epochs=1), s.runs(arms, stage=2), w)
  runner.write_manifest(w, {**sweep_lib.manifest('experiments/test.py', None, {}, s),
                            'stage2': {'space': space, 'arms': arms}})
  runner.execute(tasks2, w, 'local', log=quiet)
  out = report.write(w)
  assert out['metric'] == 'best_val_accuracy'
  assert sorted(out['plots']) == ['accuracy.png', 'curves.png', 'search.png']
  rows = report.read_csv(os.path.join(w, 'results.csv'))
  assert [r['stage'] for r in rows] == ['1', '1', '1', '2', '2']
  assert float(rows[3]['optim.lr']) == arms['fine_00']['optim.lr']
  events = b''.join(open(f, 'rb').read() for f in glob.glob(os.path.join(
      tasks[0]['workdir'], 'tb', 'events*')))
  assert b'_hparams_/session_start_info' in events and b'optim.weight_decay' in events


# ---------------------------------------------------------------- the command line


def launch(*args, cwd=ROOT):
  env = {**os.environ, 'PYTHONPATH': ROOT}
  return subprocess.run([sys.executable, '-m', *args], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=600)


def test_sweep_command_runs_the_quickstart_ablation_and_reports(tmp_path):
  w = str(tmp_path / 'qs')
  out = launch('launch.sweep', '--config=experiments/quickstart_sweep.py', f'--workdir={w}',
               '--seeds=2', '--config.train.epochs=2', '--config.model.width=64')
  assert out.returncode == 0, out.stderr[-2000:]
  assert '| rank | arm |' in out.stdout and 'Δ vs no_dropout' in out.stdout
  assert '| best val accuracy mean ± std |' in out.stdout and '| p (Holm) |' in out.stdout
  assert 'test accuracy of best-val ckpt' in out.stdout
  rows = report.read_csv(os.path.join(w, 'results.csv'))
  assert len(rows) == 6 and {r['status'] for r in rows} == {'done'}
  assert json.load(open(os.path.join(w, 'no_dropout', 'seed_1', 'config.json')))['train'][
      'epochs'] == 2
  assert json.load(open(os.path.join(w, 'sweep.json')))['overrides'] == {
      'train.epochs': 2, 'model.width': 64}
  for name in ('report.md', 'curves.png', 'accuracy.png'):
    assert os.path.getsize(os.path.join(w, name)) > 0
  again = launch('launch.sweep', '--config=experiments/quickstart_sweep.py', f'--workdir={w}',
                 '--seeds=2', '--config.train.epochs=2', '--config.model.width=64')
  assert again.returncode == 0 and '6 of 6 runs already finished' in again.stdout


def test_invalid_sweep_fails_before_launching(tmp_path):
  module = tmp_path / 'exp.py'
  module.write_text('from experiments import quickstart\n'
                    'get_config = quickstart.get_config\n'
                    'def get_sweep(arg=None):\n'
                    '  return {"arms": {"base": {}, "typo": {"optim.lrr": 0.1}}}\n')
  w = tmp_path / 'w'
  out = launch('launch.sweep', f'--config={module}', f'--workdir={w}')
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1] == (
      'error: arm typo: unknown config key optim.lrr; did you mean optim.lr?')
  assert not w.exists()
  out = launch('launch.sweep', '--config=experiments/quickstart.py', f'--workdir={w}')
  assert out.returncode == 1 and 'has no get_sweep(arg)' in out.stderr
  assert not w.exists()


MODULES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, 'experiments',
                                                                           '*.py'))
                 if 'def get_sweep' in open(p).read())
VARIANTS = {'init': ['resnet', 'resnet,local', 'plain', 'plain,local'],
            'mixup': [None, 'local', 'fast', 'local,fast'],
            'cutout': [None, 'local', 'fast', 'local,fast']}


@pytest.mark.parametrize('name', MODULES)
def test_every_experiment_module_expands_to_valid_runs(name, tmp_path):
  import importlib
  module = importlib.import_module(f'experiments.{name}')
  assert f'python -m launch.sweep --config=experiments/{name}.py' in module.__doc__
  args = VARIANTS.get(name, [None, 'local']) if name != 'quickstart_sweep' else [None]
  for arg in args:
    s = sweep_lib.parse(module.get_sweep(arg))
    tasks = runner.plan(module.get_config(arg), s.runs(), str(tmp_path / 'w'))
    assert len(tasks) == len(s.arms) * len(s.seeds) >= 3
    assert s.kind == 'search_space' or s.baseline in s.arms
    configs = [t['config'] for t in tasks]
    if arg and 'local' in arg:
      assert {c['data']['source'] for c in configs} == {'cifar_dir'}
    if arg and 'fast' in arg:   # the fast baseline under the module's arms, 5 or 10 seeds
      assert {c['model']['name'] for c in configs} == {'airbench'}
      assert len(s.seeds) == (5 if 'local' in arg else 10)
    # arms differ from each other in what they set (no two identical runs)
    keyed = {json.dumps({**c, 'seed': 0}, sort_keys=True) for c in configs}
    assert len(keyed) == len(s.arms)
  if name != 'quickstart_sweep':
    with pytest.raises(ValueError, match='unknown variant'):
      module.get_config('locl')
