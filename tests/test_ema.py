"""EMA (Polyak averaging) of the weights, train.ema_decay: the average after k steps is
the hand-computed one, it leaves the raw training untouched, it is evaluated,
checkpointed, selects the best checkpoint, resumes bit-identically, restores through
launch.eval --weights, and arms of one program may differ in its decay."""
import dataclasses
import json
import os
import subprocess
import sys
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lib.core import sharding
from lib.core.errors import UserError
from lib.data import datasets as data
from lib.runs import evaluate, group_train, train
from lib.runs.checkpoint import Checkpoints
from lib.runs.rundir import RunDir
from lib.training import arms, engine
from lib.training import resolve as resolve_lib
from lib.training import state as state_lib
from conftest import assert_same_metrics, quickstart_mlp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
quiet = lambda message: None


def mlp(epochs=1, **overrides):
  return quickstart_mlp(epochs, **{'train.eval_every': 5, 'optim.lr': 0.1, **overrides})


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


@pytest.mark.parametrize('warmup', ['none', 'timm'])
def test_ema_after_k_steps_is_the_hand_computed_average(warmup):
  config = resolve_lib.resolve(mlp(**{'train.ema_decay': 0.9, 'train.ema_warmup': warmup,
                                      'model.norm': 'batch'}))
  dataset = data.load(config.data)
  eng = engine.Engine(config, dataset, sharding.make_mesh())
  state, sums = eng.init_state(), eng.zero_sums()
  weights = [leaves({'params': state.params, 'batch_stats': state.batch_stats})]
  assert all(np.array_equal(a, b) for a, b in zip(leaves(state.ema), weights[0]))
  for step in range(4):
    state, sums = eng.train_step(state, eng.step_inputs(step), sums)
    weights.append(leaves({'params': state.params, 'batch_stats': state.batch_stats}))
  expected = weights[0]
  for u in range(1, 5):   # update number u (1-based)
    d = 0.9 if warmup == 'none' else min(0.9, 1 - u ** (-2 / 3))
    expected = [d * e + (1 - d) * w for e, w in zip(expected, weights[u])]
  got = leaves(state.ema)
  assert len(got) == len(expected) and any(np.any(s != 0) for s in got)
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
  # batch statistics are averaged too: the average differs from the raw statistics
  assert not all(np.array_equal(g, w) for g, w in zip(got, weights[-1]))
  if warmup == 'timm':   # the first update copies the weights (decay 0)
    assert min(0.9, 1 - 1 ** (-2 / 3)) == 0


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """A plain run, the same with EMA (decay 0.9) and with EMA selecting by the raw weights."""
  root = tmp_path_factory.mktemp('ema')
  dirs = {'plain': str(root / 'plain'), 'ema': str(root / 'ema'), 'raw': str(root / 'raw')}
  train.train_and_evaluate(mlp(), dirs['plain'], log=quiet)
  train.train_and_evaluate(mlp(**{'train.ema_decay': 0.9}), dirs['ema'], log=quiet)
  train.train_and_evaluate(mlp(**{'train.ema_decay': 0.9, 'train.select_by': 'raw'}),
                           dirs['raw'], log=quiet)
  return dirs


def test_ema_leaves_the_raw_training_alone_and_off_adds_nothing(runs):
  assert_same_metrics(runs['ema'], runs['plain'])   # raw val/train metrics bit-equal
  plain, ema = RunDir(runs['plain']).read_metrics(), RunDir(runs['ema']).read_metrics()
  assert not any(k.endswith('_ema') for row in plain for k in row)
  assert all('val_accuracy_ema' in row and 'val_loss_ema' in row for row in ema)
  assert any(r['val_loss_ema'] != r['val_loss'] for r in ema)
  assert 'selected_by' not in RunDir(runs['plain']).read_status()
  # off: the checkpoint holds no average; on: it does
  steps = lambda d: sorted(int(s) for s in os.listdir(os.path.join(d, 'checkpoints'))
                           if s.isdigit())
  plain_items = os.listdir(os.path.join(runs['plain'], 'checkpoints', str(steps(runs['plain'])[-1]),
                                        'state'))
  meta = lambda d: open(os.path.join(d, 'checkpoints', str(steps(d)[-1]), 'state',
                                     '_METADATA')).read()
  assert plain_items and "'ema'" not in meta(runs['plain']) and "'ema'" in meta(runs['ema'])


def test_the_ema_selects_the_best_checkpoint_unless_told_raw(runs):
  for name, key in (('ema', 'val_accuracy_ema'), ('raw', 'val_accuracy')):
    rows = RunDir(runs[name]).read_metrics()
    status = RunDir(runs[name]).read_status()
    best = max(r[key] for r in rows)
    assert status['best_val_accuracy'] == best
    # ties go to the latest, as Orbax keeps the latest of equals
    assert status['best_step'] == max(r['step'] for r in rows if r[key] == best)
    assert status['final_val_accuracy'] == rows[-1][key]
  # here the two pick different checkpoints (the EMA peaks later), so the test can tell
  assert RunDir(runs['ema']).read_status()['best_step'] != RunDir(runs['raw']).read_status()[
      'best_step']
  assert RunDir(runs['ema']).read_status()['selected_by'] == 'val_accuracy_ema'
  assert 'selected_by' not in RunDir(runs['raw']).read_status()


def test_launch_eval_restores_either_weights(runs):
  status = RunDir(runs['ema']).read_status()
  row = {r['step']: r for r in RunDir(runs['ema']).read_metrics()}[status['best_step']]
  auto = evaluate.evaluate_checkpoint(runs['ema'], 'best')
  ema = evaluate.evaluate_checkpoint(runs['ema'], 'best', weights='ema')
  raw = evaluate.evaluate_checkpoint(runs['ema'], 'best', weights='raw')
  assert auto == ema and ema['weights'] == 'ema' and raw['weights'] == 'raw'
  assert ema['loss'] == pytest.approx(row['val_loss_ema'], rel=1e-5)
  assert raw['loss'] == pytest.approx(row['val_loss'], rel=1e-5)
  assert ema['loss'] != raw['loss']
  assert evaluate.evaluate_checkpoint(runs['raw'], 'best')['weights'] == 'raw'
  assert 'weights' not in evaluate.evaluate_checkpoint(runs['plain'], 'best')   # as before
  # an ensemble's member is evaluated with the weights that selected its checkpoint
  from lib.runs import ensemble
  one = ensemble.evaluate_ensemble([runs['ema']], ['val'])
  assert one['ensemble']['val']['loss'] == pytest.approx(auto['loss'], rel=1e-5)
  with pytest.raises(UserError, match='kept no moving average.*--weights=raw'):
    evaluate.evaluate_checkpoint(runs['plain'], 'best', weights='ema')
  out = subprocess.run([sys.executable, '-m', 'launch.eval', f'--workdir={runs["plain"]}',
                        '--weights=ema'], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode != 0 and 'Traceback' not in out.stderr
  assert 'kept no moving average' in out.stderr.strip().splitlines()[-1]


def test_a_resumed_run_restores_the_ema_bit_identically(runs, tmp_path):
  workdir = str(tmp_path / 'resumed')
  config = mlp(**{'train.ema_decay': 0.9})
  with pytest.raises(train.Preempted):
    train.train_and_evaluate(config, workdir, log=quiet, stop_after_step=20)
  train.train_and_evaluate(config, workdir, log=quiet)
  a, b = RunDir(workdir).read_metrics(), RunDir(runs['ema']).read_metrics()
  assert [r['step'] for r in a] == [r['step'] for r in b]
  for ra, rb in zip(a, b):
    assert ra['val_loss_ema'] == rb['val_loss_ema'] and ra['val_loss'] == rb['val_loss']
  # the last checkpoints' averages are bit-identical
  dataset = data.load(resolve_lib.resolve(config).data)
  eng = engine.Engine(resolve_lib.resolve(config), dataset, sharding.make_mesh())
  states = []
  for d in (workdir, runs['ema']):
    ckpt = Checkpoints(os.path.join(d, 'checkpoints'), read_only=True)
    states.append(ckpt.restore(ckpt.latest_step(), eng.abstract_state())[0])
    ckpt.close()
  for x, y in zip(leaves(states[0].ema), leaves(states[1].ema)):
    assert np.array_equal(x, y)


@flax.struct.dataclass
class _StateBeforeEma:   # the train state as checkpoints written before EMA hold it
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


def test_checkpoints_written_before_the_ema_field_still_restore(tmp_path):
  state = state_lib.TrainState(step=jnp.int32(7), params={'w': jnp.arange(3.0)}, batch_stats={},
                               opt_state=(jnp.ones(3),), rng=jnp.zeros(2, jnp.uint32))
  old = _StateBeforeEma(**{f.name: getattr(state, f.name)
                           for f in dataclasses.fields(_StateBeforeEma)})
  ckpt = Checkpoints(str(tmp_path / 'c'))
  ckpt.save(7, old, {'m': 1}, {'val_accuracy': 0.5, 'val_loss': 1.0})
  ckpt.close()
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  restored, meta = Checkpoints(str(tmp_path / 'c'), read_only=True).restore(7, abstract)
  assert isinstance(restored, state_lib.TrainState) and restored.ema is None
  assert int(restored.step) == 7 and np.array_equal(restored.params['w'], [0.0, 1.0, 2.0])
  assert meta == {'m': 1}


def test_arms_may_differ_in_the_decay_but_not_in_having_one(runs, tmp_path, devices):
  as_dict = lambda c: json.loads(json.dumps(resolve_lib.resolve(c).to_dict(), default=list))
  groups, notes = arms.group([as_dict(mlp(**{'train.ema_decay': 0.9})),
                              as_dict(mlp(**{'train.ema_decay': 0.99, 'seed': 1})),
                              as_dict(mlp())])
  assert groups == [[0, 1], [2]] and 'train.ema_decay:on=False vs True' in notes[0]
  dirs = [str(tmp_path / 'a0'), str(tmp_path / 'a1')]
  configs = [mlp(**{'train.ema_decay': 0.9}), mlp(**{'train.ema_decay': 0.5})]
  lines = []
  statuses = group_train.train_group(configs, dirs, log=lines.append, devices=devices)
  assert any('2 arms' in l and 'as one program' in l for l in lines)
  assert all(s['status'] == 'done' for s in statuses)
  a0, a1 = RunDir(dirs[0]).read_metrics(), RunDir(dirs[1]).read_metrics()
  mine = RunDir(runs['ema']).read_metrics()
  for r0, r1, r in zip(a0, a1, mine):   # arm 0 is the EMA run; arm 1 averages faster
    assert r0['val_loss_ema'] == pytest.approx(r['val_loss_ema'], abs=1e-5)
    assert r1['val_loss'] == pytest.approx(r['val_loss'], abs=1e-5)
  assert any(abs(r1['val_loss_ema'] - r['val_loss_ema']) > 1e-4 for r1, r in zip(a1, mine))
  assert_same_metrics(dirs[0], runs['ema'])


@pytest.mark.parametrize('key,value,words', [
    ('train.ema_decay', 1.0, 'train.ema_decay=1.0 must be in [0, 1) (0 = off)'),
    ('train.ema_decay', -0.5, 'train.ema_decay=-0.5 must be in [0, 1)'),
    ('train.ema_warmup', 'linear', "unknown train.ema_warmup='linear'; valid: none, timm"),
    ('train.select_by', 'best', "unknown train.select_by='best'; valid: ema, raw")])
def test_bad_values_are_one_line(key, value, words):
  with pytest.raises(UserError) as e:
    resolve_lib.resolve(mlp(**{key: value}))
  assert words in str(e.value) and '\n' not in str(e.value)
