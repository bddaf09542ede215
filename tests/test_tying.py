"""Parameter tying (L2-SP), regularize.tie_l2 / regularize.tie_to: the penalty and its
gradient, the pull back to the initial weights, another run's weights as the
reference, exact resume, vectorized arms differing in lambda, one-line errors."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lib.core import sharding
from lib.core.errors import UserError
from lib.data import datasets as data
from lib.runs import group_train, train, tying
from lib.runs.checkpoint import Checkpoints
from lib.runs.rundir import RunDir
from lib.training import arms, engine, losses, optim
from lib.training import regularize
from lib.training import resolve as resolve_lib
from conftest import assert_same_metrics, quickstart_mlp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
quiet = lambda message: None


def mlp(**overrides):
  return quickstart_mlp(1, **{'train.eval_every': 10, **overrides})


def test_the_penalty_is_zero_at_the_reference_and_its_gradient_is_w_minus_ref():
  params = {'Dense_0': {'kernel': jnp.arange(6.0).reshape(2, 3), 'bias': jnp.ones(3)}}
  ref = {'Dense_0': {'kernel': jnp.full((2, 3), 2.0), 'bias': jnp.zeros(3)}}
  mask = optim.decay_mask(params, False)   # kernels only
  assert float(regularize.tie_penalty(ref, ref, mask)) == 0.0
  lam = 0.3
  value, grads = jax.value_and_grad(lambda p: lam * regularize.tie_penalty(p, ref, mask))(params)
  w = np.arange(6.0).reshape(2, 3)
  assert float(value) == pytest.approx(lam / 2 * np.sum((w - 2.0) ** 2))
  np.testing.assert_allclose(grads['Dense_0']['kernel'], lam * (w - 2.0), rtol=1e-6)
  np.testing.assert_array_equal(grads['Dense_0']['bias'], np.zeros(3))   # not a kernel
  all_mask = optim.decay_mask(params, True)   # regularize.decay_all_params
  grads = jax.grad(lambda p: regularize.tie_penalty(p, ref, all_mask))(params)
  np.testing.assert_allclose(grads['Dense_0']['bias'], np.ones(3))


def test_with_no_data_gradient_the_step_pulls_the_weights_back_to_init(monkeypatch):
  lr, lam = 0.1, 2.0
  monkeypatch.setattr(losses, 'loss', lambda name, logits, targets: 0.0 * logits.sum(-1))
  config = resolve_lib.resolve(mlp(**{'regularize.tie_l2': lam, 'optim.name': 'sgd',
                                      'optim.lr': lr, 'schedule.name': 'constant',
                                      'regularize.l2': 0.0, 'optim.weight_decay': 0.0}))
  eng = engine.Engine(config, data.load(config.data), sharding.make_mesh())
  state = eng.init_state()
  init = jax.device_get(state.params)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(state.anchor)),
                                                   jax.tree.leaves(init)))
  moved = jax.tree.map(lambda w: w + 0.5, init)
  state = eng.owned(state.replace(params=moved))
  state, _ = eng.train_step(state, eng.step_inputs(0), eng.zero_sums())
  after = jax.device_get(state.params)
  for layer in init:
    np.testing.assert_allclose(after[layer]['kernel'] - init[layer]['kernel'],
                               (1 - lr * lam) * 0.5, atol=1e-5)   # back towards init
    np.testing.assert_allclose(after[layer]['bias'], moved[layer]['bias'], atol=1e-7)


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('ref') / 'ref')
  train.train_and_evaluate(mlp(), workdir, log=quiet)
  return workdir


def _restore(workdir, config, which='latest'):
  config = resolve_lib.resolve(config)
  eng = engine.Engine(config, data.load(config.data), sharding.make_mesh())
  ckpt = Checkpoints(os.path.join(workdir, 'checkpoints'), read_only=True)
  try:
    return ckpt.restore(ckpt.resolve(which), eng.abstract_state())[0]
  finally:
    ckpt.close()


def test_another_runs_weights_are_the_reference(reference_run, tmp_path):
  assert tying.parse('runs/a:latest') == ('runs/a', 'latest')
  assert tying.parse('runs/a:120') == ('runs/a', '120')
  assert tying.parse('runs/a') == ('runs/a', 'best')
  tied = mlp(**{'regularize.tie_l2': 0.01, 'regularize.tie_to': f'{reference_run}:best',
                'seed': 3})
  train.train_and_evaluate(tied, str(tmp_path / 'tied'), log=quiet)
  best = _restore(reference_run, mlp(), 'best')
  state = _restore(str(tmp_path / 'tied'), tied)
  for a, b in zip(jax.tree.leaves(jax.device_get(state.anchor)),
                  jax.tree.leaves(jax.device_get(best.params))):
    assert np.array_equal(a, b)
  assert _restore(reference_run, mlp()).anchor is None   # off: no anchor in the state


def test_bad_references_are_one_line(reference_run, tmp_path):
  for tie_to, words in ((str(tmp_path / 'nowhere'), 'holds no checkpoints'),
                        (f'{reference_run}:999', 'no checkpoint at step 999')):
    with pytest.raises(UserError, match=words) as e:
      train.train_and_evaluate(mlp(**{'regularize.tie_l2': 0.1, 'regularize.tie_to': tie_to}),
                               str(tmp_path / 'x'), log=quiet, fresh=True)
    assert '\n' not in str(e.value)
  out = subprocess.run(
      [sys.executable, '-m', 'launch.train', '--config=experiments/quickstart.py',
       f'--workdir={tmp_path / "wide"}', '--config.train.epochs=1', '--config.model.width=32',
       '--config.regularize.tie_l2=0.1', f'--config.regularize.tie_to={reference_run}'],
      cwd=ROOT, capture_output=True, text=True)
  last = out.stderr.strip().splitlines()[-1]
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  assert 'do not fit this model' in last and 'Dense_0' in last
  with pytest.raises(UserError, match='regularize.tie_l2=-1'):
    resolve_lib.resolve(mlp(**{'regularize.tie_l2': -1.0}))


def test_a_tied_run_resumes_exactly(tmp_path):
  config = mlp(**{'regularize.tie_l2': 0.05})
  whole, cut = str(tmp_path / 'whole'), str(tmp_path / 'cut')
  train.train_and_evaluate(config, whole, log=quiet)
  with pytest.raises(train.Preempted):
    train.train_and_evaluate(config, cut, log=quiet, stop_after_step=20)
  train.train_and_evaluate(config, cut, log=quiet)
  assert_same_metrics(cut, whole, atol=0)


def test_arms_may_differ_in_lambda(tmp_path, devices):
  import json
  as_dict = lambda c: json.loads(json.dumps(resolve_lib.resolve(c).to_dict(), default=list))
  groups, _ = arms.group([as_dict(mlp(**{'regularize.tie_l2': 0.01})),
                          as_dict(mlp(**{'regularize.tie_l2': 0.5, 'seed': 1})), as_dict(mlp())])
  assert groups == [[0, 1], [2]]
  configs = [mlp(**{'regularize.tie_l2': 0.01}), mlp(**{'regularize.tie_l2': 0.5, 'seed': 1})]
  alone = [str(tmp_path / f'alone{i}') for i in range(2)]
  for c, d in zip(configs, alone):
    train.train_and_evaluate(c, d, log=quiet)
  group = [str(tmp_path / f'arm{i}') for i in range(2)]
  lines = []
  statuses = group_train.train_group(configs, group, log=lines.append, devices=devices)
  assert any('2 arms' in l and 'as one program' in l for l in lines)
  for status, mine, theirs in zip(statuses, group, alone):
    assert status['status'] == 'done'
    assert_same_metrics(mine, theirs)
  a = RunDir(alone[0]).read_metrics()[-1]['val_loss']
  b = RunDir(alone[1]).read_metrics()[-1]['val_loss']
  assert a != b
