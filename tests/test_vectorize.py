"""Vectorized arms: grouping, per-arm equality with separate runs (arms x data on 4
devices, vmap and unroll), resume, memory packing, and vectorized sweeps."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import quickstart
from lib.core import cache, sharding
from lib.core import config as config_lib
from lib.core.errors import UserError
from lib.data import datasets as data
from lib.runs import evaluate, group_train, train
from lib.runs.rundir import RunDir
from lib.sweeps import report, runner
from lib.sweeps import sweep as sweep_lib
from lib.training import arms
from lib.training import resolve as resolve_lib
from lib.training import vector_engine as ve
from conftest import assert_same_metrics, quickstart_mlp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
quiet = lambda message: None


def mlp(epochs=2, **overrides):
  return quickstart_mlp(epochs, **overrides)


def tiny_resnet(**overrides):
  c = quickstart.get_config()
  c.model.name, c.model.depth, c.model.width, c.model.norm = 'resnet_cifar', 8, 4, 'batch'
  c.train.epochs, c.train.batch_size, c.train.eval_every, c.train.log_every = 1, 64, 10, 1000
  c.update_from_flattened_dict(overrides)
  return c


def as_dict(c):
  return config_lib.to_json_dict(resolve_lib.resolve(c))


def checkpoint_steps(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())


# ---------------------------------------------------------------- grouping (pure)


def test_runs_group_by_shared_program_and_say_why_not():
  configs = [as_dict(mlp()),
             as_dict(mlp(**{'optim.lr': 0.2, 'seed': 3, 'optim.weight_decay': 1e-4})),
             as_dict(mlp(**{'regularize.dropout': 0.5, 'regularize.dropout_at': 'hidden'})),
             as_dict(mlp(**{'regularize.dropout': 0.3, 'regularize.dropout_at': 'all'})),
             as_dict(mlp(**{'model.width': 32})),
             as_dict(mlp(**{'model.init': 'normal', 'model.init_scale': 0.05,
                            'augment.cutout_size': 2, 'augment.cutout_patches': 3})),
             as_dict(mlp(**{'augment.cutout_size': 3, 'augment.cutout_patches': 1}))]
  groups, notes = arms.group(configs)
  # dropout_at / cutout_patches matter only where their factor is on: the runs with
  # it off join the first group; 'all' and 3 patches cannot share with 'hidden' and 1.
  assert groups == [[0, 1, 2, 5], [3, 6], [4]]
  assert 'regularize.dropout_at=all vs hidden' in notes[0]
  assert 'augment.cutout_patches=1 vs 3' in notes[0]
  assert notes[1] == 'differs from the first group in model.width=32 vs 64'


def test_program_turns_on_what_any_arm_uses_and_off_arms_get_identities():
  off = resolve_lib.resolve(mlp(**{'optim.lr': 0.3}))
  on = resolve_lib.resolve(mlp(**{'regularize.dropout': 0.5, 'augment.resized_crop_scale': 0.6,
                                 'augment.mixup_alpha': 0.2, 'seed': 4}))
  program = arms.program_config([off, on])
  assert program.regularize.dropout == 0.5 and program.augment.resized_crop_scale == 0.6
  assert program.augment.mixup_alpha == 0.2 and program.seed == 0
  hp_off, hp_on = arms.arm_hparams(off, program), arms.arm_hparams(on, program)
  assert hp_off['dropout'] == 0 and hp_off['mixup_alpha'] == 0 and hp_off['lr'] == np.float32(0.3)
  assert hp_off['resized_crop_scale'] == 1.0   # the whole image, not a crop of area U[0, 1]
  assert hp_on['resized_crop_scale'] == np.float32(0.6) and hp_on['dropout'] == 0.5
  assert arms.chunk_sizes(10, 8) == [5, 5] and arms.chunk_sizes(9, 0) == [9]
  assert arms.chunk_sizes(7, 3) == [3, 2, 2]


def test_runs_that_cannot_share_are_refused_by_train_group(tmp_path):
  with pytest.raises(UserError, match='model.width=32 vs 64'):
    group_train.train_group([mlp(), mlp(**{'model.width': 32})],
                            [str(tmp_path / 'a'), str(tmp_path / 'b')], log=quiet)
  assert not os.listdir(tmp_path)


# ---------------------------------------------------------------- equality with separate runs

MLP_ARMS = [{}, {'regularize.dropout': 0.3, 'optim.lr': 0.1},
            {'augment.mixup_alpha': 0.4, 'regularize.label_smoothing': 0.1},
            {'seed': 1, 'model.init': 'normal', 'model.init_scale': 0.05,
             'regularize.dropconnect': 0.2}]


@pytest.fixture(scope='module')
def separate_mlp_runs(tmp_path_factory):
  root = tmp_path_factory.mktemp('separate')
  dirs = []
  for i, overrides in enumerate(MLP_ARMS):
    dirs.append(str(root / f'arm{i}'))
    train.train_and_evaluate(mlp(**overrides), dirs[-1], log=quiet)
  return dirs


def test_group_equals_separate_runs_arms_by_data_on_four_devices(separate_mlp_runs, tmp_path,
                                                                 devices):
  dirs = [str(tmp_path / f'arm{i}') for i in range(len(MLP_ARMS))]
  lines = []
  statuses = group_train.train_group([mlp(**o) for o in MLP_ARMS], dirs, log=lines.append,
                                     devices=devices)
  assert 'as one program (vmap; mesh 4 arms x 1 data)' in lines[0]
  for status, mine, theirs in zip(statuses, dirs, separate_mlp_runs):
    assert status['status'] == 'done'
    assert_same_metrics(mine, theirs)
    assert RunDir(mine).read_config() == RunDir(theirs).read_config()
    assert checkpoint_steps(mine) == checkpoint_steps(theirs)   # latest + best, as alone
    assert status['best_step'] == RunDir(theirs).read_status()['best_step']
    # launch.eval needs no change: the best checkpoint reproduces the logged accuracy
    result = evaluate.evaluate_checkpoint(mine, 'best')
    assert result['step'] == status['best_step']
    assert result['accuracy'] == pytest.approx(status['best_val_accuracy'], abs=1 / 144 + 1e-9)
  # 2 arms on 4 devices: each arm's batch split over 2 data devices
  two = [str(tmp_path / f'two{i}') for i in range(2)]
  group_train.train_group([mlp(**o) for o in MLP_ARMS[:2]], two, log=lines.append,
                          devices=devices)
  assert 'mesh 2 arms x 2 data' in lines[-4] or any('mesh 2 arms x 2 data' in l for l in lines)
  for mine, theirs in zip(two, separate_mlp_runs):
    assert_same_metrics(mine, theirs)


RESNET_ARMS = [{'augment.resized_crop_scale': 0.5},
               {'regularize.survival_last': 0.5, 'augment.cutout_size': 3,
                'regularize.dropout': 0.2, 'regularize.dropout_at': 'conv', 'seed': 2}]


@pytest.fixture(scope='module')
def separate_resnet_runs(tmp_path_factory, devices):
  """Each of RESNET_ARMS trained alone on one device (shared by both modes below)."""
  root = tmp_path_factory.mktemp('separate_resnet')
  dirs = []
  for i, overrides in enumerate(RESNET_ARMS):
    dirs.append(str(root / f'alone{i}'))
    train.train_and_evaluate(tiny_resnet(**overrides), dirs[-1], log=quiet,
                             mesh=sharding.make_mesh(devices[:1]))
  return dirs


@pytest.mark.parametrize('mode', ['unroll', 'vmap'])
def test_stochastic_depth_cutout_and_resized_crop_arms_equal_separate_runs(
    separate_resnet_runs, tmp_path, devices, mode):
  one = devices[:1]   # convolutions on simulated CPU devices are slow
  group = [str(tmp_path / f'g{i}') for i in range(2)]
  lines = []
  group_train.train_group([tiny_resnet(**o) for o in RESNET_ARMS], group, log=lines.append,
                          devices=one, mode=mode)
  assert f'as one program ({mode};' in lines[0]
  for mine, alone in zip(group, separate_resnet_runs):
    assert_same_metrics(mine, alone)


# ---------------------------------------------------------------- resume


def test_killed_group_resumes_to_the_uninterrupted_results(separate_mlp_runs, tmp_path):
  configs = [mlp(**o) for o in MLP_ARMS[:3]]
  dirs = [str(tmp_path / f'arm{i}') for i in range(3)]
  with pytest.raises(train.Preempted):
    group_train.train_group(configs, dirs, log=quiet, stop_after_step=40,
                            resume_every_s=1e9)   # a resume point only where it stops
  assert {RunDir(d).read_status()['status'] for d in dirs} == {'running'}
  assert all(checkpoint_steps(d)[-1] == 40 for d in dirs)
  lines = []
  statuses = group_train.train_group(configs, dirs, log=lines.append)
  assert 'resuming from steps [40]' in lines[0]
  for status, mine, theirs in zip(statuses, dirs, separate_mlp_runs):
    assert status['status'] == 'done'
    assert_same_metrics(mine, theirs)
    assert checkpoint_steps(mine) == checkpoint_steps(theirs)


def test_arms_at_different_steps_catch_up_then_train_together(separate_mlp_runs, tmp_path):
  # Arm 0 was trained alone and killed at step 40; arm 1 never started.
  dirs = [str(tmp_path / 'arm0'), str(tmp_path / 'arm1')]
  with pytest.raises(train.Preempted):
    train.train_and_evaluate(mlp(**MLP_ARMS[0]), dirs[0], log=quiet, stop_after_step=40)
  lines = []
  statuses = group_train.train_group([mlp(**o) for o in MLP_ARMS[:2]], dirs, log=lines.append)
  assert 'resuming from steps [0, 40]' in lines[0]
  for status, mine, theirs in zip(statuses, dirs, separate_mlp_runs):
    assert status['status'] == 'done'
    assert_same_metrics(mine, theirs)


def test_an_arm_that_starts_later_than_the_others_end_still_trains(tmp_path):
  # Arm 0 diverges in its first epoch; arm 1 resumes at step 80: nothing trains in between.
  dirs = [str(tmp_path / 'boom'), str(tmp_path / 'late')]
  late = mlp(epochs=3)
  with pytest.raises(train.Preempted):
    train.train_and_evaluate(late, dirs[1], log=quiet, stop_after_step=80)
  statuses = group_train.train_group([mlp(epochs=3, **{'optim.lr': 1e6}), late], dirs,
                                     log=quiet)
  assert [s['status'] for s in statuses] == ['diverged', 'done']
  train.train_and_evaluate(late, str(tmp_path / 'alone'), log=quiet)
  assert_same_metrics(dirs[1], str(tmp_path / 'alone'))


def test_early_stop_and_divergence_end_single_arms_only(tmp_path):
  every = {'train.eval_every': 10}   # 16 evaluations: one of them is no new best
  configs = [mlp(epochs=4, **every), mlp(epochs=4, **every, **{'train.early_stop_patience': 1}),
             mlp(epochs=4, **every, **{'optim.lr': 1e6})]
  dirs = [str(tmp_path / f'g{i}') for i in range(3)]
  statuses = group_train.train_group(configs, dirs, log=quiet)
  for config, status, d in zip(configs, statuses, dirs):
    alone = train.train_and_evaluate(config, d + '_alone', log=quiet)
    assert status['status'] == alone['status'] and status['step'] == alone['step']
    assert status.get('stopped_early') == alone.get('stopped_early')
    if status['status'] == 'done':
      assert checkpoint_steps(d) == checkpoint_steps(d + '_alone')
  assert [s['status'] for s in statuses] == ['done', 'done', 'diverged']
  assert statuses[0]['step'] == 160 and statuses[1]['stopped_early']


# ---------------------------------------------------------------- memory


def test_programs_shrink_to_fit_the_memory_budget(tmp_path, devices):
  configs = [resolve_lib.resolve(mlp(**{'seed': s})) for s in range(4)]
  dataset = data.load(configs[0].data)
  need4 = ve.VectorEngine(configs, dataset, devices[:1]).bytes_per_device()
  need1 = ve.VectorEngine(configs[:1], dataset, devices[:1]).bytes_per_device()
  assert need4 > 2 * need1 > 0   # memory grows with the arms
  programs, eng = group_train.plan_programs(configs, dataset, devices[:1], 'auto',
                                            memory_budget=need4 * 0.6, log=quiet)
  assert programs == [[0, 1], [2, 3]] and eng.n == 2
  assert group_train.plan_programs(configs, dataset, devices[:1], 'auto', max_arms=3,
                                   log=quiet)[0] == [[0, 1], [2, 3]]
  lines = []
  cache.process_cache().clear()
  statuses = group_train.train_group(configs, [str(tmp_path / f'a{i}') for i in range(4)],
                                     log=lines.append, devices=devices[:1],
                                     memory_budget=int(need4 * 0.6))
  assert [s['status'] for s in statuses] == ['done'] * 4
  assert any('at most 2 arms per program' in l for l in lines)
  assert any(l.startswith('program 2/2: 2 arms') for l in lines)
  # the 4-arm probe and one 2-arm step: the second program reuses the first's compilation
  assert sum(k.startswith('[["step"') for k in cache.process_cache().program_keys()) == 2


# ---------------------------------------------------------------- sweeps


def test_vectorized_sweep_splits_incompatible_arms_and_resumes_after_a_kill(tmp_path):
  spec = {'arms': {'base': {}, 'drop': {'regularize.dropout': 0.5},
                   'wide': {'model.width': 32}}, 'seeds': 2}
  s = sweep_lib.parse(spec)

  def sweep_dir(name):
    w = str(tmp_path / name)
    tasks = runner.plan(mlp(), s.runs(), w)
    runner.write_manifest(w, sweep_lib.manifest('experiments/test.py', None, {}, s))
    return w, tasks

  full, full_tasks = sweep_dir('full')
  runner.execute(full_tasks, full, 'local', log=quiet)        # one run after another
  cut, tasks = sweep_dir('cut')
  lines = []
  with pytest.raises(runner.Killed):
    runner.execute(tasks, cut, 'local', log=lines.append, vectorize=True,
                   kill_at={'run': 0, 'step': 40})
  assert lines[0] == 'vectorized: 6 runs in 2 program group(s)'
  assert lines[1] == '  group 1: 4 run(s) of arms base, drop'
  assert lines[2] == ('  group 2: 2 run(s) of arms wide: differs from the first group in '
                      'model.width=32 vs 64')
  results = runner.execute(tasks, cut, 'local', log=quiet, vectorize=True)
  assert sorted((r['arm'], r['seed'], r['status']) for r in results) == sorted(
      (t['arm'], t['seed'], 'done') for t in tasks)
  a, b = report.write(full), report.write(cut)
  for ra, rb in zip(a['rows'], b['rows']):
    assert (ra['arm'], ra['seed'], ra['best_step']) == (rb['arm'], rb['seed'], rb['best_step'])
    for key in ('best_val_accuracy', 'final_val_accuracy', 'test_accuracy'):
      assert ra[key] == pytest.approx(rb[key], abs=1e-6), key
  assert runner.execute(tasks, cut, 'local', log=quiet, vectorize=True) == []


def test_a_failing_job_keeps_the_arms_that_ended(tmp_path, monkeypatch):
  s = sweep_lib.parse({'arms': {'ok': {}, 'boom': {'optim.lr': 1e6}}})
  w = str(tmp_path / 'w')
  tasks = runner.plan(mlp(epochs=1), s.runs(), w)
  runner.write_manifest(w, sweep_lib.manifest('experiments/test.py', None, {}, s))

  def broken(*args, **kwargs):
    raise RuntimeError('evaluation broke')
  monkeypatch.setattr(evaluate, 'evaluate_checkpoint', broken)
  results = runner.execute(tasks, w, 'local', log=quiet, vectorize=True)
  assert [(r['arm'], r['status']) for r in results] == [('ok', 'failed'), ('boom', 'diverged')]
  assert 'evaluation broke' in RunDir(tasks[0]['workdir']).read_status()['reason']
  assert RunDir(tasks[1]['workdir']).read_status()['status'] == 'diverged'
  monkeypatch.undo()
  assert [t['arm'] for t in runner.pending(tasks)] == ['ok']   # a rerun retries its test
  results = runner.execute(tasks, w, 'local', log=quiet, vectorize=True)
  assert [(r['arm'], r['status']) for r in results] == [('ok', 'done')]
  assert 'accuracy' in RunDir(tasks[0]['workdir']).read_status()['test']


def test_sweep_command_dry_run_shows_the_programs(tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'launch.sweep', '--config=experiments/quickstart_sweep.py',
       f'--workdir={tmp_path / "w"}', '--vectorize', '--dry_run', '--seeds=2'],
      cwd=ROOT, env={**os.environ, 'PYTHONPATH': ROOT}, capture_output=True, text=True,
      timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert 'vectorized: 6 runs in 1 program group(s)' in out.stdout
  assert not os.path.exists(tmp_path / 'w')
