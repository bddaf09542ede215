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


def _one_step(eng, **strengths):
  """The state and sums after the first step of engine `eng`, with these strengths."""
  hp = steps.hparams(eng.config)
  hp.update({k: np.float32(v) for k, v in strengths.items()})
  eng.hparams = {k: sharding.to_global(v, eng.rep) for k, v in hp.items()}
  state, sums = eng.train_step(eng.init_state(), eng.step_inputs(0), eng.zero_sums())
  return jax.device_get(state), jax.device_get(sums)


def test_each_auxiliary_loss_trains_the_trunk_and_its_own_head_only(coarse_npz):
  """One program with both heads, stepped with weights 0, rotation only, coarse only,
  against the plain step: weights 0 are the plain step; each loss moves the shared trunk
  and its own head, never the main head or the other head; the running statistics and
  the logged (main) loss are the plain step's."""
  common = {'model.norm': 'batch', 'optim.name': 'sgd', 'regularize.l2': 0.0,
            'regularize.dropout': 0.3, 'regularize.label_smoothing': 0.1,
            'data.source': 'npz', 'data.path': coarse_npz}
  plain, plain_sums = _one_step(engine_of(mlp(**common)))
  eng = engine_of(mlp(**common, **{'regularize.aux_rotation': 1.0,
                                   'regularize.aux_coarse': 1.0}))
  neither, _ = _one_step(eng, aux_rotation=0.0, aux_coarse=0.0)
  rotation, rotation_sums = _one_step(eng, aux_rotation=1.0, aux_coarse=0.0)
  coarse, coarse_sums = _one_step(eng, aux_rotation=0.0, aux_coarse=1.0)
  close = lambda a, b: all(jax.tree.leaves(jax.tree.map(
      lambda u, v: np.allclose(u, v, rtol=0, atol=1e-7), a, b)))
  head, trunk = 'Dense_2', ('Dense_0', 'Dense_1', 'BatchNorm_0', 'BatchNorm_1')
  for name in (head,) + trunk:
    assert close(neither.params[name], plain.params[name]), name
  for trained, own, other in ((rotation, 'rotation_head', 'coarse_head'),
                              (coarse, 'coarse_head', 'rotation_head')):
    assert close(trained.params[head], plain.params[head])
    assert close(trained.params[other], neither.params[other])
    assert not close(trained.params[own], neither.params[own])
    for name in trunk:
      assert not close(trained.params[name], neither.params[name]), (own, name)
    assert close(trained.batch_stats, plain.batch_stats)
  for sums in (rotation_sums, coarse_sums):
    assert np.allclose(sums['loss'], plain_sums['loss'], rtol=0, atol=1e-6)


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


def test_programs_of_other_coarse_labels_are_other_programs(coarse_npz, tmp_path):
  """The coarse classes are baked into the compiled step: the same file rewritten with
  other coarse labels alone (same images, labels, statistics) must not get the program
  compiled for the old ones."""
  from lib.training import vector_engine
  path = str(tmp_path / 'rewritten.npz')
  with np.load(coarse_npz) as f:
    images, labels = f['images'], f['labels']
  keys = []
  for mtime, coarse in ((1_000_000, labels // 2), (2_000_000, labels % 5)):
    np.savez(path, images=images, labels=labels, coarse_labels=coarse)
    os.utime(path, (mtime, mtime))
    configs = [resolve_lib.resolve(mlp(**{'regularize.aux_coarse': w, 'data.source': 'npz',
                                          'data.path': path})) for w in (0.5, 1.0)]
    veng = vector_engine.VectorEngine(configs, data.load(configs[0].data))
    keys.append(veng._program_key('step', False))
  assert keys[0] != keys[1]


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
