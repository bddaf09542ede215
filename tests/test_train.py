import json
import os

import jax
import numpy as np
import pytest

from conftest import DETERMINISTIC
from experiments import quickstart
from lib.core import sharding
from lib.core.errors import UserError
from lib.data import datasets as data
from lib.runs import evaluate
from lib.runs.rundir import RunDir
from lib.runs.train import Preempted, train_and_evaluate
from lib.training import engine
from lib.training.resolve import resolve

quiet = lambda message: None


def small_config(**train):
  c = quickstart.get_config()
  c.train.epochs = 4
  c.train.update(train)
  return c


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run') / 'w')
  # A checkpoint at every evaluation: the kept ones are then the 2 latest and the best.
  status = train_and_evaluate(small_config(checkpoint_every_s=0), workdir, log=quiet)
  return workdir, status


def test_quickstart_reaches_97_percent_val_accuracy(tmp_path):
  status = train_and_evaluate(quickstart.get_config(), str(tmp_path / 'q'), log=quiet)
  assert status['status'] == 'done'
  assert status['final_val_accuracy'] >= 0.97


def test_run_directory_is_self_describing(finished_run):
  workdir, status = finished_run
  rd = RunDir(workdir)
  assert rd.read_status()['status'] == 'done'
  assert rd.read_config()['model']['width'] == 512
  rows = rd.read_metrics()
  assert [r['step'] for r in rows] == [40, 80, 120, 160]   # once per epoch
  # Exactly these, in this order: 10 classes report no top-5 (tests/test_top5.py).
  for row in rows:
    assert list(row) == ['step', 'epoch', 'running_train_loss', 'running_train_accuracy',
                         'train_eval_loss', 'train_eval_accuracy', 'val_loss', 'val_accuracy',
                         'lr', 'examples_per_sec', 'wall_time']
  assert os.listdir(os.path.join(workdir, 'tb'))
  best = max(rows, key=lambda r: (r['val_accuracy'], r['step']))
  assert status['best_step'] == best['step']
  kept = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())
  assert kept == sorted({best['step'], rows[-2]['step'], rows[-1]['step']})   # 2 latest + best


def losses_on(mesh, config, n_steps=20):
  config = resolve(config)
  eng = engine.Engine(config, data.load(config.data), mesh)
  state, idx = eng.init_state(), eng.epoch_indices(0)
  out = []
  for _ in range(n_steps):
    state, sums = eng.train_step(state, idx, eng.zero_sums())
    out.append(float(sums['loss']))
  return np.array(out)


def test_one_and_four_devices_give_the_same_losses(devices):
  # BatchNorm, crop and flip on: batch statistics and random draws must be global.
  # (An MLP: 4 simulated CPU devices on 2 cores make convolutions very slow.)
  c = quickstart.get_config()
  c.model.norm = 'batch'
  c.augment.crop_padding, c.augment.flip = 1, True
  one = losses_on(sharding.make_mesh(devices[:1]), c)
  four = losses_on(sharding.make_mesh(devices), c)
  assert np.all(np.isfinite(one)) and one[-1] < one[0]
  np.testing.assert_allclose(one, four, atol=1e-5, rtol=0)


@pytest.mark.parametrize('eval_every,stop', [(0, 80), (30, 60)])
def test_killed_and_rerun_gives_identical_metrics(tmp_path, eval_every, stop):
  # (30, 60): evaluations that do not divide the 40-step epoch, killed mid-epoch.
  straight_dir, workdir = str(tmp_path / 'straight'), str(tmp_path / 'w')
  train_and_evaluate(small_config(epochs=3, eval_every=eval_every), straight_dir, log=quiet)
  with pytest.raises(Preempted):
    train_and_evaluate(small_config(epochs=3, eval_every=eval_every), workdir,
                       stop_after_step=stop, log=quiet)
  assert RunDir(workdir).read_status()['status'] == 'running'
  # A row written after the last checkpoint (as if killed in between) is dropped on resume.
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write(json.dumps({'step': stop + 1, 'val_accuracy': 0.0}) + '\n')
  status = train_and_evaluate(small_config(epochs=3, eval_every=eval_every), workdir, log=quiet)
  assert status['status'] == 'done'
  resumed = [{k: r[k] for k in DETERMINISTIC} for r in RunDir(workdir).read_metrics()]
  straight = [{k: r[k] for k in DETERMINISTIC} for r in RunDir(straight_dir).read_metrics()]
  assert resumed == straight and len(straight) == (3 if eval_every == 0 else 4)


def test_killed_before_the_first_checkpoint_restarts_cleanly(tmp_path):
  workdir = str(tmp_path / 'w')
  train_and_evaluate(small_config(epochs=1), workdir, log=quiet)
  rd = RunDir(workdir)
  # Simulate a kill after the first row was written but before its checkpoint.
  import shutil
  shutil.rmtree(rd.checkpoint_dir)
  rd.set_status('running')
  train_and_evaluate(small_config(epochs=1), workdir, log=quiet)
  assert [r['step'] for r in rd.read_metrics()] == [40]


def test_l2_penalty_reaches_the_compiled_step():
  # One SGD step from the same init: the L2 run moves kernels by an extra -lr*l2*w.
  params = {}
  for l2 in (0.0, 0.5):
    c = quickstart.get_config()
    c.optim.name, c.schedule.name, c.optim.lr, c.regularize.l2 = 'sgd', 'constant', 0.1, l2
    c = resolve(c)
    eng = engine.Engine(c, data.load(c.data), sharding.make_mesh(jax.devices()[:1]))
    state = eng.init_state()
    w0 = jax.device_get(state.params)
    state, _ = eng.train_step(state, eng.epoch_indices(0), eng.zero_sums())
    params[l2] = jax.device_get(state.params)
  for layer in params[0.0]:
    np.testing.assert_allclose(params[0.5][layer]['kernel'] - params[0.0][layer]['kernel'],
                               -0.1 * 0.5 * w0[layer]['kernel'], atol=1e-6)
    np.testing.assert_array_equal(params[0.5][layer]['bias'], params[0.0][layer]['bias'])


def test_eval_of_best_checkpoint_reproduces_logged_accuracy(finished_run, devices):
  workdir, status = finished_run
  for mesh_devices in (devices[:1], devices):
    result = evaluate.evaluate_checkpoint(workdir, 'best', mesh=sharding.make_mesh(mesh_devices))
    assert result['step'] == status['best_step']
    assert result['accuracy'] == status['best_val_accuracy']
  test = evaluate.evaluate_checkpoint(workdir, 'latest', split='test', tta='flip')
  assert test['num_examples'] == 360 and 0.5 < test['accuracy'] <= 1.0
  assert list(test) == ['accuracy', 'loss', 'num_examples', 'step']   # no top-5 for 10 classes


def test_divergence_stops_with_status_and_keeps_last_good_checkpoint(tmp_path):
  c = small_config()
  c.schedule.name, c.schedule.milestone_fractions, c.schedule.factor = 'step', (0.5,), 1e12
  workdir = str(tmp_path / 'd')
  status = train_and_evaluate(c, workdir, log=quiet)
  assert status['status'] == 'diverged' and status['step'] >= 80
  record = RunDir(workdir).read_status()
  assert record['status'] == 'diverged' and f'step {status["step"]}' in record['reason']
  kept = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())
  assert kept and max(kept) <= 80
  assert all(np.isfinite(r['running_train_loss']) for r in RunDir(workdir).read_metrics())
  # Rerunning would only diverge again: refused, pointing at --fresh.
  with pytest.raises(UserError, match='--fresh'):
    train_and_evaluate(c, workdir, log=quiet)


def test_bad_config_values_fail_before_writing(tmp_path):
  c = small_config()
  c.data.val_fraction = 0.0
  with pytest.raises(UserError, match='val_fraction'):
    train_and_evaluate(c, str(tmp_path / 'a'), log=quiet)
  c = small_config()
  c.unlock()
  c.optim.lrr = 0.1   # a typo inside an experiment file
  with pytest.raises(UserError, match='unknown config key optim.lrr; did you mean optim.lr'):
    train_and_evaluate(c, str(tmp_path / 'b'), log=quiet)
  assert not os.listdir(tmp_path)


def test_another_config_is_refused_and_fresh_archives(tmp_path):
  workdir = str(tmp_path / 'w')
  train_and_evaluate(small_config(epochs=1), workdir, log=quiet)
  other = small_config(epochs=1)
  other.optim.lr = 0.2
  with pytest.raises(UserError, match=r'optim.lr: 0.05 -> 0.2'):
    train_and_evaluate(other, workdir, log=quiet)
  train_and_evaluate(other, workdir, fresh=True, log=quiet)
  archived = os.listdir(os.path.join(workdir, 'archive'))
  assert len(archived) == 1
  old = RunDir(os.path.join(workdir, 'archive', archived[0]))
  assert old.read_config()['optim']['lr'] == 0.05 and old.read_metrics()
  assert RunDir(workdir).read_config()['optim']['lr'] == 0.2
