"""The factor table (lib/core/factors.py): every factor declared once, and what derives
from it. A throwaway factor, declared and registered here, is validated,
vectorized and documented with nothing else added."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lib.core import factors, sharding
from lib.core import config as config_lib
from lib.core.errors import UserError
from lib.data import datasets as data
from lib.training import arms, augment, engine, steps
from lib.training import resolve as resolve_lib
from lib.training import vector_engine as ve
from conftest import quickstart_mlp

KEY = 'augment.test_tint'


@pytest.fixture
def tint():
  """A factor that adds a constant to the normalized images: one record, one function."""
  factors.declare(KEY, 0.0, 'a throwaway test factor: add a constant', 'normalized',
                  factors.at_least(0), traced=True)
  augment.register('test_tint', [KEY], stage='normalized')(
      lambda key, images, c, hp: images + hp['test_tint'])
  try:
    yield
  finally:
    augment.unregister('test_tint')
    factors.undeclare(KEY)


def test_readme_factor_table_is_current():
  with open('README.md') as f:
    text = f.read()
  assert factors.readme_with_table(text) == text, \
      'README factor table is stale: run python -m launch.factors --write'


def test_every_factor_is_a_config_key_at_its_off_value_and_derivations_agree():
  flat = config_lib.flatten(config_lib.base_config().to_dict())
  for key, f in factors.FACTORS.items():
    assert flat[key] == f.initial, key
    if f.off is not None:
      assert not factors.is_on(key, flat[key]), key
  hp = steps.hparams(resolve_lib.resolve(config_lib.base_config()))
  assert set(hp) == {f.field for f in factors.traced()}
  assert all(v.dtype == np.float32 for v in hp.values())
  # Keys that do not change the program: seed, traced / init / stop factors, watch keys.
  free = set(arms.varying_keys())
  assert {'seed', 'regularize.dropout', 'model.init', 'train.early_stop_patience',
          'train.log_every'} <= free
  assert not free & {'augment.flip', 'model.norm', 'regularize.dropout_at', 'train.epochs'}
  deps = factors.dependents()
  assert {'regularize.dropout_at': 'regularize.dropout',
          'augment.cutout_patches': 'augment.cutout_size',
          'model.fmp_ratio': 'model.pool', 'model.fmp_overlap': 'model.pool',
          'train.fmp_eval_draws': 'model.pool',
          'train.ema_warmup': 'train.ema_decay'}.items() <= deps.items()
  assert all(c in factors.FACTORS and factors.FACTORS[c].off is not None for c in deps.values())
  # a switch strength: arms differ in its value, but all have it on or all off
  assert {'train.ema_decay', 'regularize.tie_l2'} <= set(factors.switches()) <= free


def test_a_new_factor_is_validated(tint):
  c = quickstart_mlp(1)
  assert c.augment.test_tint == 0.0                     # base_config has the key
  c.augment.test_tint = -1.0
  with pytest.raises(UserError, match=r'augment.test_tint=-1.0 must be >= 0 \(0 = off\)'):
    resolve_lib.resolve(c)
  c.augment.test_tint = 0.5
  assert resolve_lib.resolve(c).augment.test_tint == 0.5


def test_a_new_factor_is_documented(tint):
  row = next(l for l in factors.markdown_table().splitlines() if f'`{KEY}`' in l)
  assert 'a throwaway test factor' in row and 'normalized' in row and 'yes (an array)' in row


def test_a_new_factor_is_vectorized_and_an_off_arm_computes_its_own_run(tint):
  off = resolve_lib.resolve(quickstart_mlp(1, **{'train.batch_size': 64}))
  on = resolve_lib.resolve(quickstart_mlp(1, **{'train.batch_size': 64, KEY: 0.5}))
  groups, _ = arms.group([config_lib.to_json_dict(off), config_lib.to_json_dict(on)])
  assert groups == [[0, 1]]                            # one program for both
  program = arms.program_config([off, on])
  assert program.augment.test_tint == 0.5
  assert [float(arms.arm_hparams(c, program)['test_tint']) for c in (off, on)] == [0.0, 0.5]

  dataset = data.load(off.data)
  veng = ve.VectorEngine([off, on], dataset, jax.devices()[:1], 'vmap')
  state, sums = veng.stack([veng.init_arm(0), veng.init_arm(1)]), veng.zero_sums()
  idx = veng.epoch_indices(0)
  for _ in range(3):
    state, sums = veng.train_step(state, idx, sums)

  def alone(config):
    eng = engine.Engine(config, dataset, sharding.make_mesh(jax.devices()[:1]))
    s, z, i = eng.init_state(), eng.zero_sums(), eng.epoch_indices(0)
    for _ in range(3):
      s, z = eng.train_step(s, i, z)
    return jax.device_get(s.params)

  leaf = lambda tree: jax.tree.leaves(tree)[0]
  vec = [jax.device_get(veng.arm_state(state, i).params) for i in (0, 1)]
  np.testing.assert_allclose(leaf(vec[0]), leaf(alone(off)), atol=1e-6)
  np.testing.assert_allclose(leaf(vec[1]), leaf(alone(on)), atol=1e-6)
  assert not np.allclose(leaf(vec[0]), leaf(vec[1]), atol=1e-4)   # the factor acts


def test_an_infinite_or_nan_strength_is_refused():
  for key in ('regularize.l1', 'regularize.noise_input', 'augment.brightness'):
    for bad in (float('inf'), float('nan')):
      c = quickstart_mlp(1, **{key: bad})
      with pytest.raises(UserError, match=key):
        resolve_lib.resolve(c)
  c = quickstart_mlp(1, **{'train.checkpoint_every_s': float('nan')})
  with pytest.raises(UserError, match='checkpoint_every_s'):
    resolve_lib.resolve(c)


def test_a_resolved_config_cannot_be_changed_through_its_json_or_smuggled_in():
  c = resolve_lib.resolve(quickstart_mlp(1))
  config_lib.to_json_dict(c)['seed'] = 7            # a caller's copy, not the config's
  assert config_lib.to_json_dict(c)['seed'] == 0
  d = config_lib.to_json_dict(c)
  assert config_lib.is_resolved(config_lib.from_resolved_json_dict(d))
  d['regularize']['dropout'] = 1.5                  # out of range: not trusted, resolved again
  rebuilt = config_lib.from_resolved_json_dict(d)
  assert not config_lib.is_resolved(rebuilt)
  with pytest.raises(UserError, match='regularize.dropout'):
    resolve_lib.resolve(rebuilt)
  d['regularize']['dropout'] = 0.0
  d['train']['unknown_key'] = 1                     # a key this code does not know
  assert not config_lib.is_resolved(config_lib.from_resolved_json_dict(d))
