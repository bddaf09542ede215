"""Bagging (data.bootstrap) and ensembles of runs (launch.eval --ensemble, the sweep
report's ensemble of each arm's seeds), on tiny MLP runs on digits."""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lib.core import sharding
from lib.core.errors import UserError
from lib.data import datasets as data
from lib.data import stream
from lib.data.order import bootstrap_sample, epoch_permutation
from lib.model import models
from lib.runs import ensemble, evaluate, group_train
from lib.runs.rundir import RunDir
from lib.runs.train import Preempted, train_and_evaluate
from lib.sweeps import ensembles as ensembles_lib
from lib.sweeps import report
from lib.training import arms, engine
from lib.training.resolve import resolve
from conftest import assert_same_metrics, quickstart_mlp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
quiet = lambda message: None
BOOT = {'data.bootstrap': True}


def mlp(seed=0, **overrides):
  return quickstart_mlp(2, seed=seed, **overrides)


# ---------------------------------------------------------------- the order (pure)


def test_a_bootstrap_holds_about_63_percent_of_the_examples_reproducibly_and_per_seed():
  n = 4000
  fractions = [len(np.unique(bootstrap_sample(s, n))) / n for s in range(5)]
  assert all(abs(f - (1 - np.exp(-1))) < 0.02 for f in fractions), fractions   # sd ~0.008
  assert np.array_equal(bootstrap_sample(3, n), bootstrap_sample(3, n))
  assert not np.array_equal(bootstrap_sample(3, n), bootstrap_sample(4, n))
  # Each epoch: the seed's resample (the same multiset every epoch), in a fresh order.
  e0, e1 = (epoch_permutation(3, e, n, 40, 100, bootstrap=True) for e in (0, 1))
  assert e0.shape == (40, 100)
  assert np.array_equal(np.sort(e0.ravel()), np.sort(bootstrap_sample(3, n)))
  assert np.array_equal(np.sort(e1.ravel()), np.sort(bootstrap_sample(3, n)))
  assert not np.array_equal(e0, e1)
  assert np.array_equal(e0, epoch_permutation(3, 0, n, 40, 100, bootstrap=True))
  # Off: the order of every run so far, bit for bit.
  old = np.random.default_rng([3, 1]).permutation(n)[:4000].reshape(40, 100)
  assert np.array_equal(epoch_permutation(3, 1, n, 40, 100), old)
  assert np.array_equal(epoch_permutation(3, 1, n, 40, 100, bootstrap=False), old)


def test_every_pipeline_reads_the_bootstrap_and_val_and_test_are_untouched(devices):
  plain, boot = resolve(mlp(seed=5)), resolve(mlp(seed=5, **BOOT))
  d_plain, d_boot = data.load(plain.data), data.load(boot.data)
  for split in ('train', 'val', 'test'):   # bagging changes which examples are read, not the data
    for a, b in zip(d_plain.split(split), d_boot.split(split)):
      assert np.array_equal(a, b)
  n, mesh = d_boot.num_examples('train'), sharding.make_mesh(devices[:1])
  resident = engine.Engine(boot, d_boot, mesh)
  idx = np.asarray(resident.epoch_indices(1))
  spe, batch = resident.steps_per_epoch, boot.train.batch_size
  assert np.array_equal(idx, epoch_permutation(5, 1, n, spe, batch, bootstrap=True))
  assert set(idx.ravel()) <= set(bootstrap_sample(5, n))
  assert not np.array_equal(idx, np.asarray(engine.Engine(plain, d_plain, mesh).epoch_indices(1)))
  # The streaming pipeline reads the same batches.
  reader = stream.BatchReader(d_boot.source_of('train'), stream.HostTransform(0, d_boot.image_shape),
                              5, batch, spe, (0, batch), bootstrap=True)
  assert np.array_equal(reader.permutation(1), idx)
  boot_stream = resolve(mlp(seed=5, **BOOT, **{'data.pipeline': 'stream', 'data.workers': 0}))
  streamed = engine.Engine(boot_stream, d_boot, mesh)
  try:
    images, labels = streamed.step_inputs(spe + 3)   # epoch 1, step 3
    train_images, train_labels = d_boot.split('train')
    assert np.array_equal(np.asarray(labels), train_labels[idx[3]])
    assert np.array_equal(np.asarray(images), train_images[idx[3]])
  finally:
    streamed.close()


# ---------------------------------------------------------------- trained runs


@pytest.fixture(scope='module')
def sweep_dir(tmp_path_factory):
  """W/single/seed_0 and W/boot/seed_{0,1}: 2 epochs each, laid out as a sweep's runs."""
  w = str(tmp_path_factory.mktemp('bagging') / 'w')
  train_and_evaluate(mlp(0), os.path.join(w, 'single', 'seed_0'), log=quiet)
  for s in (0, 1):
    train_and_evaluate(mlp(s, **BOOT), os.path.join(w, 'boot', f'seed_{s}'), log=quiet)
  return w


def test_a_bootstrapped_run_resumes_exactly_and_differs_from_the_plain_run(sweep_dir, tmp_path):
  straight = os.path.join(sweep_dir, 'boot', 'seed_0')
  cut = str(tmp_path / 'cut')
  with pytest.raises(Preempted):   # stopped after the first epoch's checkpoint
    train_and_evaluate(mlp(0, **BOOT), cut, stop_after_step=40, log=quiet)
  assert train_and_evaluate(mlp(0, **BOOT), cut, log=quiet)['status'] == 'done'
  assert_same_metrics(cut, straight, atol=0)
  plain = RunDir(os.path.join(sweep_dir, 'single', 'seed_0')).read_metrics()
  assert plain[-1]['running_train_loss'] != RunDir(straight).read_metrics()[-1]['running_train_loss']


def test_arms_differing_only_in_bootstrap_train_as_one_program_each_as_alone(sweep_dir, tmp_path):
  configs = [mlp(0), mlp(0, **BOOT)]
  groups, _ = arms.group([resolve(c).to_dict() for c in configs])
  assert groups == [[0, 1]]
  dirs = [str(tmp_path / 'plain'), str(tmp_path / 'boot')]
  lines = []
  statuses = group_train.train_group(configs, dirs, log=lines.append)
  assert 'as one program' in lines[0]
  assert [s['status'] for s in statuses] == ['done', 'done']
  assert_same_metrics(dirs[0], os.path.join(sweep_dir, 'single', 'seed_0'))
  assert_same_metrics(dirs[1], os.path.join(sweep_dir, 'boot', 'seed_0'))


# ---------------------------------------------------------------- ensembles


def test_ensemble_probabilities_are_the_mean_of_the_members():
  config = resolve(mlp())
  model = models.build(config.model, 10, config.regularize)
  x = jnp.asarray(np.random.default_rng(0).integers(0, 256, (12, 8, 8, 1)), jnp.uint8)
  y = jnp.asarray(np.arange(12) % 10, jnp.int32)
  variables = [model.init(jax.random.PRNGKey(k), jnp.zeros((1, 8, 8, 1)), train=False)
               for k in (1, 2, 3)]
  means, stds = [0.1, 0.3, 0.5], [0.2, 0.25, 0.3]
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  probs = [jax.nn.softmax(apply(v, (x / 255.0 - m) / s)) for v, m, s in zip(variables, means, stds)]
  mean = sum(probs) / 3
  assert not np.allclose(probs[0], probs[1])
  lp = [jnp.log(p) for p in probs]
  np.testing.assert_allclose(jnp.exp(ensemble.ensemble_log_probs(lp)), mean, rtol=1e-5)
  program = ensemble.ensemble_program([model] * 3, means, stds, ['none'] * 3, top5=False)
  mask = jnp.asarray(np.arange(12) < 10)   # two padding examples
  out = jax.jit(program)(variables, x, y, jnp.arange(12), mask)
  m = np.asarray(mask, np.float32)
  expected_loss = -np.sum(np.log(np.asarray(mean)[np.arange(12), np.asarray(y)]) * m)
  assert float(out['ensemble']['loss']) == pytest.approx(expected_loss, rel=1e-5)
  assert float(out['ensemble']['correct']) == np.sum((np.argmax(mean, -1) == y) * m)
  for member, p in zip(out['members'], probs):
    assert float(member['loss']) == pytest.approx(
        -np.sum(np.log(np.asarray(p)[np.arange(12), np.asarray(y)]) * m), rel=1e-5)


def _same(a, b, loss_tol):
  assert a['accuracy'] == b['accuracy'] and a['num_examples'] == b['num_examples']
  assert a['loss'] == pytest.approx(b['loss'], abs=loss_tol)


def test_an_ensemble_of_one_or_of_copies_of_a_run_is_the_run(sweep_dir):
  run = os.path.join(sweep_dir, 'boot', 'seed_1')
  own = {s: evaluate.evaluate_checkpoint(run, 'best', s) for s in ('val', 'test')}
  for members in ([run], [run, run]):
    result = ensemble.evaluate_ensemble(members)
    assert [m['step'] for m in result['members']] == [own['val']['step']] * len(members)
    for split in ('val', 'test'):
      for m in result['members']:
        _same(m[split], own[split], 1e-6)   # the member: launch.eval's own numbers
      _same(result['ensemble'][split], own[split], 1e-5)


def test_an_arm_directory_is_its_seeds_and_bad_members_fail_in_one_line(sweep_dir, tmp_path):
  arm = os.path.join(sweep_dir, 'boot')
  assert ensemble.member_dirs([arm]) == [os.path.join(arm, 'seed_0'), os.path.join(arm, 'seed_1')]
  for bad, words in ((str(tmp_path / 'none'), 'no directory'),
                     (str(tmp_path), 'neither a run directory')):
    with pytest.raises(UserError, match=words) as e:
      ensemble.evaluate_ensemble([bad])
    assert '\n' not in str(e.value)
  other = str(tmp_path / 'other')   # the same run, but trained on another val split
  shutil.copytree(os.path.join(arm, 'seed_0'), other)
  config = RunDir(other).read_config()
  config['data']['split_seed'] = 1
  RunDir(other).write_config(config)
  with pytest.raises(UserError, match=r'other data .*data.split_seed differ'):
    ensemble.evaluate_ensemble([arm, other])
  shutil.rmtree(os.path.join(other, 'checkpoints'))
  with pytest.raises(UserError, match='no checkpoints in'):
    ensemble.evaluate_ensemble([other])


def test_launch_eval_ensemble_prints_members_and_ensemble(sweep_dir):
  arm, single = os.path.join(sweep_dir, 'boot'), os.path.join(sweep_dir, 'single', 'seed_0')
  env = {**os.environ, 'PYTHONPATH': ROOT}
  out = subprocess.run([sys.executable, '-m', 'launch.eval', f'--ensemble={arm},{single}'],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.strip().splitlines()
  result = json.loads(lines[-1])
  assert [m['workdir'] for m in result['members']] == [os.path.join(arm, 'seed_0'),
                                                       os.path.join(arm, 'seed_1'), single]
  assert '| **ensemble of 3** |' in out.stdout and '| val accuracy | val loss |' in lines[0]
  expected = ensemble.evaluate_ensemble([arm, single])
  for split in ('val', 'test'):
    assert result['ensemble'][split] == pytest.approx(expected['ensemble'][split])
    assert result['members'][2][split]['accuracy'] == evaluate.evaluate_checkpoint(
        single, 'best', split)['accuracy']


def test_the_report_gives_each_arm_with_two_seeds_its_ensemble(sweep_dir, monkeypatch):
  out = report.write(sweep_dir)
  assert [r['arm'] for r in out['ensembles']] == ['boot']   # single has one seed
  row = out['ensembles'][0]
  expected = ensemble.evaluate_ensemble([os.path.join(sweep_dir, 'boot')])
  assert row['ensemble_test_accuracy'] == expected['ensemble']['test']['accuracy']
  assert row['members_val_accuracy'] == pytest.approx(np.mean(
      [r['best_val_accuracy'] for r in out['rows'] if r['arm'] == 'boot']))
  csv_rows = report.read_csv(os.path.join(sweep_dir, 'ensembles.csv'))
  assert float(csv_rows[0]['ensemble_test_accuracy']) == row['ensemble_test_accuracy']
  md = open(os.path.join(sweep_dir, 'report.md')).read()
  assert "## Ensembles of each arm's seeds" in md and '| boot | 2 |' in md
  # Written again over the same runs: kept, not evaluated again; a changed run: evaluated.
  calls = []
  monkeypatch.setattr(ensembles_lib, '_evaluate', lambda arm, dirs: calls.append(arm) or row)
  assert report.write(sweep_dir)['ensembles'] == [row] and calls == []
  status = os.path.join(sweep_dir, 'boot', 'seed_1', 'status.json')
  os.utime(status, (os.path.getmtime(status) + 10,) * 2)
  report.write(sweep_dir)
  assert calls == ['boot']
  no = report.write(sweep_dir, ensembles=False)
  assert no['ensembles'] == [] and 'Ensembles' not in open(
      os.path.join(sweep_dir, 'report.md')).read()
