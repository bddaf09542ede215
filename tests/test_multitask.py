"""Multitask heads as regularizers: regularize.aux_rotation (predict the rotation of a
rotated copy of each batch) and regularize.aux_coarse (predict the coarse class):
the heads exist only when on, the rotated copies and their labels, the main pass's
batch statistics, evaluation by the main head alone, coarse labels from the data,
vectorized arms, one-line errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lib.core import sharding
from lib.core.errors import UserError
from lib.data import datasets as data
from lib.runs import group_train, train
from lib.training import arms, engine, steps
from lib.training import resolve as resolve_lib
from conftest import assert_same_metrics, quickstart_mlp

quiet = lambda message: None


def mlp(**overrides):
  return quickstart_mlp(1, **{'train.eval_every': 20, **overrides})


@pytest.fixture(scope='module')
def coarse_npz(tmp_path_factory):
  """The digits as an npz whose 10 classes fall in 5 coarse classes (c // 2)."""
  pixels, labels = data._digits_arrays()
  path = str(tmp_path_factory.mktemp('npz') / 'digits_coarse.npz')
  np.savez(path, images=np.round(pixels * (255 / 16)).astype(np.uint8)[..., None],
           labels=labels, coarse_labels=labels // 2)
  return path


def engine_of(config):
  config = resolve_lib.resolve(config)
  return engine.Engine(config, data.load(config.data), sharding.make_mesh())


def test_rotated_copies_are_the_images_turned_by_their_labels():
  x = np.random.RandomState(0).rand(6, 5, 5, 2).astype(np.float32)   # no symmetry
  turns = np.array([0, 1, 2, 3, 1, 3])
  out = np.asarray(steps.rotate_quarters(jnp.asarray(x), jnp.asarray(turns)))
  for i, k in enumerate(turns):
    np.testing.assert_array_equal(out[i], np.rot90(x[i], k, axes=(0, 1)))
  assert len({out[i].tobytes() for i in range(4)}) == 4
  # the step's rotation task: each copy's label is the number of quarter turns it got
  batch = jnp.asarray(np.random.RandomState(1).rand(64, 5, 5, 1).astype(np.float32))
  copies, labels = steps.rotation_task(jax.random.PRNGKey(3), batch)
  copies, labels = np.asarray(copies), np.asarray(labels)
  assert set(labels.tolist()) == {0, 1, 2, 3}
  for i in range(64):
    np.testing.assert_array_equal(copies[i], np.rot90(np.asarray(batch[i]), labels[i], axes=(0, 1)))


def test_heads_exist_only_when_on_and_leave_the_rest_of_the_model_alone(coarse_npz):
  plain = engine_of(mlp()).init_state()
  rot = engine_of(mlp(**{'regularize.aux_rotation': 0.5})).init_state()
  both = engine_of(mlp(**{'regularize.aux_rotation': 0.5, 'regularize.aux_coarse': 1.0,
                          'data.source': 'npz', 'data.path': coarse_npz})).init_state()
  names = lambda s: set(s.params)
  assert not {'rotation_head', 'coarse_head'} & names(plain)
  assert names(rot) - names(plain) == {'rotation_head'}
  assert names(both) - names(plain) == {'rotation_head', 'coarse_head'}
  assert both.params['rotation_head']['kernel'].shape[-1] == 4
  assert both.params['coarse_head']['kernel'].shape[-1] == 5
  for name in names(plain):   # the shared trunk and main head are initialized as without
    for a, b in zip(jax.tree.leaves(plain.params[name]), jax.tree.leaves(rot.params[name])):
      assert np.array_equal(a, b)


def test_evaluation_uses_the_main_head_only():
  with_heads = engine_of(mlp(**{'regularize.aux_rotation': 0.5}))
  without = engine_of(mlp())
  state = with_heads.init_state()
  trimmed = without.init_state().replace(
      params={k: v for k, v in state.params.items() if k != 'rotation_head'},
      batch_stats=state.batch_stats)
  assert with_heads.evaluate(state, 'val') == without.evaluate(trimmed, 'val')


def test_the_rotated_pass_leaves_the_batch_statistics_to_the_main_pass():
  """After one step, the running statistics are the plain step's: they come from the main
  forward pass alone (the rotated copies' are dropped), while the params differ."""
  out = []
  for overrides in ({}, {'regularize.aux_rotation': 1.0}):
    eng = engine_of(mlp(**{'model.norm': 'batch', **overrides}))
    state, _ = eng.train_step(eng.init_state(), eng.step_inputs(0), eng.zero_sums())
    out.append(jax.device_get(state))
  plain, rot = out
  assert jax.tree.leaves(plain.batch_stats)
  for a, b in zip(jax.tree.leaves(plain.batch_stats), jax.tree.leaves(rot.batch_stats)):
    assert np.array_equal(a, b)
  assert not np.array_equal(plain.params['Dense_0']['kernel'], rot.params['Dense_0']['kernel'])


def test_coarse_labels_come_from_the_data_and_must_agree(coarse_npz, tmp_path):
  dataset = data.load(resolve_lib.resolve(mlp(**{'data.source': 'npz',
                                                 'data.path': coarse_npz})).data)
  np.testing.assert_array_equal(dataset.coarse_of_class, np.arange(10) // 2)
  mapping = data.coarse_mapping(np.array([0, 1, 1, 0]), np.array([3, 0, 1, 3]), 3, 'x.npz')
  np.testing.assert_array_equal(mapping, [3, -2, -1])   # class 1 disagrees, 2 has none
  with pytest.raises(UserError, match='class 1 have several coarse labels') as e:
    steps.coarse_matrix_rows(mapping, resolve_lib.resolve(mlp()))
  assert '\n' not in str(e.value)
  with pytest.raises(UserError, match='data.source=digits does not carry') as e:
    engine_of(mlp(**{'regularize.aux_coarse': 0.5}))
  with pytest.raises(UserError, match='regularize.aux_rotation=-1'):
    resolve_lib.resolve(mlp(**{'regularize.aux_rotation': -1.0}))


def test_cifar100_pickles_carry_their_superclasses(tmp_path):
  import pickle
  rng = np.random.RandomState(0)
  for name, n in (('train', 40), ('test', 10)):
    fine = rng.randint(0, 100, n)
    with open(tmp_path / name, 'wb') as f:
      pickle.dump({b'data': rng.randint(0, 256, (n, 3072)).astype(np.uint8),
                   b'fine_labels': list(fine), b'coarse_labels': list(fine // 5)}, f)
  ds = data.load(resolve_lib.resolve(mlp(**{'data.source': 'cifar_dir', 'data.path': str(tmp_path),
                                            'data.val_fraction': 0.25})).data)
  seen = ds.coarse_of_class >= 0
  assert seen.any() and np.array_equal(ds.coarse_of_class[seen], np.arange(100)[seen] // 5)


def test_tfds_cifar100_carries_its_superclasses():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=40):
    ds = data.load(resolve_lib.resolve(mlp(**{'data.source': 'tfds', 'data.name': 'cifar100',
                                              'data.val_fraction': 0.25})).data)
  assert ds.num_classes == 100 and ds.coarse_of_class.shape == (100,)
  assert set(ds.coarse_of_class.tolist()) <= set(range(-2, 20))   # mock labels: random


def test_a_coarse_head_trains_on_four_devices(coarse_npz, tmp_path, devices):
  status = train.train_and_evaluate(
      mlp(**{'regularize.aux_coarse': 1.0, 'data.source': 'npz', 'data.path': coarse_npz}),
      str(tmp_path / 'coarse'), log=quiet)
  assert status['status'] == 'done' and status['best_val_accuracy'] > 0.5


def test_arms_may_differ_in_the_rotation_weight(tmp_path, devices):
  as_dict = lambda c: json.loads(json.dumps(resolve_lib.resolve(c).to_dict(), default=list))
  groups, notes = arms.group([as_dict(mlp(**{'regularize.aux_rotation': 0.5})),
                              as_dict(mlp(**{'regularize.aux_rotation': 1.0, 'seed': 1})),
                              as_dict(mlp())])
  assert groups == [[0, 1], [2]] and 'regularize.aux_rotation:on' in notes[0]
  configs = [mlp(**{'regularize.aux_rotation': 0.5}), mlp(**{'regularize.aux_rotation': 1.0})]
  alone = [str(tmp_path / f'alone{i}') for i in range(2)]
  for c, d in zip(configs, alone):
    assert train.train_and_evaluate(c, d, log=quiet)['best_val_accuracy'] > 0.5
  group = [str(tmp_path / f'arm{i}') for i in range(2)]
  lines = []
  group_train.train_group(configs, group, log=lines.append, devices=devices)
  assert any('2 arms' in l and 'as one program' in l for l in lines)
  for mine, theirs in zip(group, alone):
    assert_same_metrics(mine, theirs)
