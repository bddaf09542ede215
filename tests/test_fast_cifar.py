"""The fast CIFAR-10 baseline (experiments/fast_cifar.py, after airbench94) and its
ingredients, each a factor with an off value: the `airbench` model, patch-whitening of its
first layer (model.whiten_init), alternating flips (augment.flip_mode), Lookahead
(optim.lookahead), the normalization layers' learning-rate scale (optim.norm_lr_scale) and
flip + translate TTA (train.eval_tta=flip_translate). Synthetic data only."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments import fast_cifar
from lib.core import config as config_lib
from lib.core import factors, sharding
from lib.core.config import base_config
from lib.core.errors import UserError
from lib.data import datasets as data
from lib.model import models, whitening
from lib.runs.rundir import RunDir
from lib.runs import train
from lib.runs.train import train_and_evaluate
from lib.training import arms, augment, engine, eval_step, optim
from lib.training import vector_engine as ve
from lib.training import state as state_lib
from lib.training.resolve import resolve
from conftest import assert_same_metrics

quiet = lambda message: None


@pytest.fixture(scope='module')
def npz(tmp_path_factory):
  """600 16x16 RGB images (the digits, upsampled, tinted per channel, with noise: every
  2x2 patch direction has variance) and their 10 labels, as an npz."""
  from sklearn.datasets import load_digits
  digits = load_digits()
  rng = np.random.RandomState(0)
  gray = np.kron(digits.images[:600] / 16.0, np.ones((2, 2)))[..., None]   # (600, 16, 16, 1)
  images = 200 * gray * np.array([1.0, 0.7, 0.4]) + rng.uniform(0, 50, (600, 16, 16, 3))
  path = str(tmp_path_factory.mktemp('fast') / 'digits16.npz')
  np.savez(path, images=images.astype(np.uint8), labels=digits.target[:600].astype(np.int32))
  return path


def tiny(npz, **overrides):
  """The fast_cifar recipe on the 16x16 npz, 4 wide, batch 64, 1 epoch (flat overrides)."""
  c = fast_cifar.get_config('local')
  c.data.source, c.data.path = 'npz', npz
  c.model.width = 4
  c.train.batch_size, c.train.epochs, c.train.log_every = 64, 1, 1000
  c.train.eval_batch_size = 100
  c.schedule.warmup_epochs = 0.3
  c.update_from_flattened_dict(overrides)
  return c


def engine_of(config):
  config = resolve(config)
  return engine.Engine(config, data.load(config.data), sharding.make_mesh(jax.devices()[:1]))


def host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


# ----------------------------------------------------------------------------- the model
def test_airbench_is_airbench94s_net_at_width_64():
  c = base_config()
  c.model.name = 'airbench'
  model = models.build(resolve(c).model, 10)
  x = jnp.zeros((2, 32, 32, 3))
  v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  shapes = jax.tree.map(lambda s: s.shape, v['params'])
  assert shapes['whiten'] == {'kernel': (2, 2, 3, 24), 'bias': (24,)}
  assert [shapes[f'Conv_{i}']['kernel'][-1] for i in range(6)] == [64, 64, 256, 256, 256, 256]
  # BatchNorm has an offset and no learned scale (airbench freezes its weight at 1)
  assert all(set(shapes[f'BatchNorm_{i}']) == {'bias'} for i in range(6))
  # 1,971,640 in airbench94's PyTorch net; this head has a bias (+10)
  assert sum(int(np.prod(s)) for s in jax.tree.leaves(
      shapes, is_leaf=lambda t: isinstance(t, tuple))) == 1_971_650
  # logits are the classifier's times 1/9
  model4 = model.clone(width=4)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  variables = model4.init(jax.random.PRNGKey(0), images)
  scaled = model4.apply(variables, images)
  unscaled = model4.clone(logit_scale=1.0).apply(variables, images)
  np.testing.assert_allclose(scaled, unscaled / 9, rtol=1e-6)
  assert scaled.shape == (2, 10)


def test_whiten_init_needs_a_model_with_a_whitening_layer():
  c = base_config()
  c.model.name, c.model.whiten_init = 'resnet20', 'patch'
  with pytest.raises(UserError, match='model.whiten_init=patch .*airbench'):
    resolve(c)


# ----------------------------------------------------------------------------- patch whitening
def test_patch_whitening_makes_the_first_layers_outputs_white(npz):
  eng = engine_of(tiny(npz))
  state = eng.init_state()
  train_images = eng.dataset.split('train')[0]
  kernel = np.asarray(state.params['whiten']['kernel'])
  np.testing.assert_array_equal(kernel, whitening.from_images(train_images, eng.mean, eng.std))
  x = (train_images.astype(np.float32) / 255.0 - eng.mean) / eng.std
  _, found = eng.model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                             jnp.asarray(x), capture_intermediates=lambda m, _: m.name == 'whiten',
                             mutable=['intermediates'])
  out = np.asarray(found['intermediates']['whiten']['__call__'][0], np.float64)
  out = out.reshape(-1, out.shape[-1])     # every 2x2 patch of every training image
  half = out.shape[1] // 2
  np.testing.assert_allclose(out[:, half:], -out[:, :half], atol=1e-5)   # both signs
  cov = np.cov(out[:, :half], rowvar=False, bias=True)
  eigenvalues = np.sort(np.linalg.eigvalsh(whitening.patch_covariance(train_images, eng.mean,
                                                                      eng.std)))[::-1]
  # Whitened: each direction's variance is eigenvalue / (eigenvalue + eps), uncorrelated
  np.testing.assert_allclose(cov, np.diag(eigenvalues / (eigenvalues + whitening.EPS)),
                             atol=2e-4)
  assert np.all(np.diag(cov) > 0.5)
  # Without eps the covariance is the identity
  patches = whitening.patches(x.astype(np.float64))
  exact = whitening.kernel(np.cov(patches, rowvar=False, bias=True), 3, eps=0.0)
  white = patches @ exact.reshape(12, 24).astype(np.float64)[:, :12]
  np.testing.assert_allclose(np.cov(white, rowvar=False, bias=True), np.eye(12), atol=1e-4)


def test_whitening_filters_stay_frozen_while_their_bias_trains(npz):
  eng = engine_of(tiny(npz))
  state, sums = eng.init_state(), eng.zero_sums()
  before = host(state.params)
  for step in range(3):   # with lookahead (every 5 steps) and L2 on, as the recipe
    state, sums = eng.train_step(state, eng.step_inputs(step), sums)
  after = host(state.params)
  np.testing.assert_array_equal(after['whiten']['kernel'], before['whiten']['kernel'])
  assert not np.array_equal(after['whiten']['bias'], before['whiten']['bias'])
  assert not np.array_equal(after['Conv_0']['kernel'], before['Conv_0']['kernel'])
  # model.whiten_init=none: an ordinary layer, initialized and trained as the others
  eng = engine_of(tiny(npz, **{'model.whiten_init': 'none'}))
  state, sums = eng.init_state(), eng.zero_sums()
  plain = host(state.params['whiten']['kernel'])
  assert not np.allclose(plain, before['whiten']['kernel'])
  for step in range(2):   # the warmup's rate is 0 at step 0
    state, sums = eng.train_step(state, eng.step_inputs(step), sums)
  assert not np.array_equal(host(state.params['whiten']['kernel']), plain)


# ----------------------------------------------------------------------------- alternating flips
def flips(key, index, epoch):
  ex = augment.Examples(jnp.asarray(index, jnp.int32), jnp.int32(epoch), key)
  return np.asarray(jax.jit(augment.alternating_flips)(ex))


def test_alternating_flips_flip_each_image_in_exactly_one_of_two_consecutive_epochs():
  index = np.arange(2000)
  key = state_lib.run_stream(jax.random.PRNGKey(0), 'flip_parity')
  by_epoch = [flips(key, index, e) for e in range(4)]
  for a, b in zip(by_epoch, by_epoch[1:]):
    assert np.all(a != b)
  assert 0.45 < by_epoch[0].mean() < 0.55                     # a random half in epoch 0
  np.testing.assert_array_equal(by_epoch[0], by_epoch[2])     # the same half every 2 epochs
  # a function of the example's index: any batch order or split gives the same flips
  perm = np.random.RandomState(0).permutation(2000)
  np.testing.assert_array_equal(flips(key, perm[:100], 1), by_epoch[1][perm[:100]])
  other = flips(state_lib.run_stream(jax.random.PRNGKey(1), 'flip_parity'), index, 0)
  assert 0.4 < np.mean(other != by_epoch[0]) < 0.6            # another seed, another half
  # the augmentation mirrors exactly the images it flips
  c = ml_collections.FrozenConfigDict(base_config().augment.to_dict() | {
      'flip': True, 'flip_mode': 'alternate'})
  x = jax.random.uniform(jax.random.PRNGKey(2), (64, 4, 4, 3))
  ex = augment.Examples(jnp.arange(64), jnp.int32(1), key)
  out = np.asarray(augment.random_flip(jax.random.PRNGKey(3), x, c, {}, examples=ex))
  mirrored = np.all(out == np.asarray(x)[:, :, ::-1], axis=(1, 2, 3))
  same = np.all(out == np.asarray(x), axis=(1, 2, 3))
  np.testing.assert_array_equal(mirrored, by_epoch[1][:64])
  np.testing.assert_array_equal(same, ~by_epoch[1][:64])


def test_the_train_step_gives_each_batchs_indices_and_epoch(npz):
  """What the resident step passes the flip: the indices it gathered, the epoch, and one
  key for the whole run."""
  seen = []

  def record(key, images, c, hp, examples=None):
    jax.debug.callback(lambda i, e, k: seen.append((np.asarray(i), int(e), tuple(np.asarray(k)))),
                       examples.index, examples.epoch, examples.key)
    return images
  augment.register('test_record', ['augment.flip'], examples=True)(record)
  try:
    eng = engine_of(tiny(npz))
    state, sums = eng.init_state(), eng.zero_sums()
    spe = eng.steps_per_epoch
    for step in range(spe + 1):
      state, sums = eng.train_step(state, eng.step_inputs(step), sums)
    jax.block_until_ready(state)
  finally:
    augment.unregister('test_record')
  assert [e for _, e, _ in seen] == [0] * spe + [1]
  np.testing.assert_array_equal(seen[0][0], np.asarray(eng.epoch_indices(0))[0])
  np.testing.assert_array_equal(seen[-1][0], np.asarray(eng.epoch_indices(1))[0])
  assert len({k for _, _, k in seen}) == 1


def test_alternating_flips_need_the_resident_pipeline(npz):
  with pytest.raises(UserError, match='flip_mode=alternate needs the resident pipeline'):
    resolve(tiny(npz, **{'data.pipeline': 'stream'}))
  resolve(tiny(npz, **{'data.pipeline': 'stream', 'augment.flip_mode': 'random'}))


# ----------------------------------------------------------------------------- optimizer
def opt_config(**flat):
  c = base_config()
  c.optim.name = 'sgd'
  c.schedule.name = 'constant'
  c.update_from_flattened_dict(flat)
  return c


def hparams(c):
  return {k: jnp.asarray(v) for k, v in factors.hparams(c).items()}


PARAMS = {'Conv_0': {'kernel': jnp.full((3, 3, 2, 2), 0.5)},
          'BatchNorm_0': {'bias': jnp.full((2,), 0.1), 'scale': jnp.ones((2,))},
          'Dense_0': {'kernel': jnp.ones((2, 3)), 'bias': jnp.zeros((3,))}}


def test_norm_lr_scale_moves_norm_offsets_and_scales_by_that_much_more():
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), PARAMS)

  def one_step(c):
    tx = optim.make(c, 10, 10)[0](hparams(c))
    return host(tx.update(grads, tx.init(PARAMS), PARAMS)[0])
  plain = one_step(opt_config(**{'optim.lr': 0.1, 'optim.weight_decay': 0.01}))
  scaled = one_step(opt_config(**{'optim.lr': 0.1, 'optim.weight_decay': 0.01,
                                  'optim.norm_lr_scale': 64.0}))
  for leaf in ('bias', 'scale'):
    np.testing.assert_allclose(scaled['BatchNorm_0'][leaf], 64 * plain['BatchNorm_0'][leaf],
                               rtol=1e-6)
    assert np.all(plain['BatchNorm_0'][leaf] != 0)
  for name in ('Conv_0', 'Dense_0'):   # everything else exactly as without it
    for leaf, value in plain[name].items():
      np.testing.assert_array_equal(scaled[name][leaf], value)
  # the mask: normalization layers' offsets and scales only (airbench: its BatchNorm biases)
  c = base_config()
  c.model.name, c.model.width = 'airbench', 4
  v = jax.eval_shape(lambda: models.build(resolve(c).model, 10).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3))))
  flat = jax.tree_util.tree_flatten_with_path(optim.norm_mask(v['params']))[0]
  chosen = {'/'.join(p.key for p in path) for path, on in flat if on}
  assert chosen == {f'BatchNorm_{i}/bias' for i in range(6)}


def test_lookahead_every_k_steps_moves_the_slow_weights_alpha_of_the_way():
  k, alpha, lr = 3, 0.5, 0.1
  c = opt_config(**{'optim.lr': lr, 'optim.lookahead': k, 'optim.lookahead_alpha': alpha})
  tx = optim.make(c, 100, 10)[0](hparams(c))
  params, state = PARAMS, tx.init(PARAMS)
  slow = fast = host(PARAMS)
  grad = lambda p: jax.tree.map(lambda w: w ** 2, p)   # any gradient that depends on w
  for step in range(1, 2 * k + 1):
    updates, state = tx.update(grad(params), state, params)
    params = optax.apply_updates(params, updates)
    fast = jax.tree.map(lambda w: w - lr * w ** 2, fast)               # plain SGD
    if step % k == 0:   # sync: the slow weights step alpha towards the fast, which restart
      slow = jax.tree.map(lambda s, f: s + alpha * (f - s), slow, fast)
      fast = slow
    for got, want in zip(jax.tree.leaves(host(params)), jax.tree.leaves(fast)):
      np.testing.assert_allclose(got, want, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(host(state.slow)), jax.tree.leaves(slow)):
      np.testing.assert_allclose(got, want, rtol=1e-5)
  # lookahead 0 is the plain optimizer, whatever alpha says
  plain = opt_config(**{'optim.lr': lr, 'optim.lookahead_alpha': 0.9})
  tx = optim.make(plain, 100, 10)[0](hparams(plain))
  assert jax.tree.structure(tx.init(PARAMS)) == jax.tree.structure(
      optim.make(opt_config(**{'optim.lr': lr}), 100, 10)[0](hparams(plain)).init(PARAMS))


def test_new_factors_group_arms_as_declared():
  def group(*overrides):
    configs = [config_lib.to_json_dict(resolve(opt_config(**o))) for o in overrides]
    return arms.group(configs)[0]
  # a traced strength: arms differ in it within one program
  assert group({'optim.lookahead': 5, 'optim.lookahead_alpha': 0.5},
               {'optim.lookahead': 5, 'optim.lookahead_alpha': 0.8}) == [[0, 1]]
  assert len(group({'optim.lookahead': 5}, {'optim.lookahead': 2})) == 2     # shapes the state
  # a switch: adds to the optimizer's state, so on and off arms are apart
  assert group({'optim.norm_lr_scale': 64.0}, {'optim.norm_lr_scale': 16.0}) == [[0, 1]]
  assert len(group({'optim.norm_lr_scale': 64.0}, {})) == 2
  # the flip mode means nothing without the flip
  assert group({'augment.flip_mode': 'alternate'}, {}) == [[0, 1]]
  assert len(group({'augment.flip': True, 'augment.flip_mode': 'alternate'},
                   {'augment.flip': True})) == 2


def test_arms_differing_in_traced_strengths_train_as_their_own_runs(npz):
  """Two arms of one program (seed, Lookahead's alpha, the norm-rate scale differ; both
  whitened, both alternating flips): each arm's weights after 6 steps are its own run's."""
  configs = [resolve(tiny(npz)),
             resolve(tiny(npz, **{'seed': 1, 'optim.lookahead_alpha': 0.8,
                                  'optim.norm_lr_scale': 16.0}))]
  assert arms.group([config_lib.to_json_dict(c) for c in configs])[0] == [[0, 1]]
  dataset = data.load(configs[0].data)
  veng = ve.VectorEngine(configs, dataset, jax.devices()[:1])
  state, sums = veng.stack([veng.init_arm(0), veng.init_arm(1)]), veng.zero_sums()
  for step in range(6):
    state, sums = veng.train_step(state, veng.step_inputs(step), sums)
  for i, config in enumerate(configs):
    eng = engine.Engine(config, dataset, sharding.make_mesh(jax.devices()[:1]))
    alone, z = eng.init_state(), eng.zero_sums()
    for step in range(6):
      alone, z = eng.train_step(alone, eng.step_inputs(step), z)
    for a, b in zip(jax.tree.leaves(host(veng.arm_state(state, i).params)),
                    jax.tree.leaves(host(alone.params))):
      np.testing.assert_allclose(a, b, atol=1e-5)


# ----------------------------------------------------------------------------- TTA
def test_flip_translate_views_and_weights_are_airbenchs():
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 6, 6, 3)) + 1.0
  v = [np.asarray(a) for a in eval_step.views(x, 'flip_translate')]
  x = np.asarray(x)
  assert len(v) == 6 and all(a.shape == x.shape for a in v)
  np.testing.assert_array_equal(v[0], x)
  for plain, mirror in zip(v[::2], v[1::2]):
    np.testing.assert_array_equal(mirror, plain[:, :, ::-1])
  np.testing.assert_array_equal(v[2][:, 1:, 1:], x[:, :-1, :-1])    # moved 1 px down-right
  assert np.all(v[2][:, 0] == 0) and np.all(v[2][:, :, 0] == 0)     # black padding
  np.testing.assert_array_equal(v[4][:, :-1, :-1], x[:, 1:, 1:])    # moved 1 px up-left
  assert np.all(v[4][:, -1] == 0) and np.all(v[4][:, :, -1] == 0)
  weights = eval_step.view_weights('flip_translate')
  assert weights == (0.25, 0.25, 0.125, 0.125, 0.125, 0.125) and sum(weights) == 1
  # the prediction is the weighted mean of the views' softmax outputs
  c = base_config()
  c.model.name, c.model.width = 'airbench', 4
  model = models.build(resolve(c).model, 10)
  images = jax.random.uniform(jax.random.PRNGKey(1), (3, 16, 16, 3))
  variables = model.init(jax.random.PRNGKey(0), images)
  got = eval_step.make_log_probs(model, 0.5, 0.25, 'flip_translate')(variables, images)
  probs = [jax.nn.softmax(model.apply(variables, (view - 0.5) / 0.25))
           for view in eval_step.views(images, 'flip_translate')]
  want = np.log(sum(w * p for w, p in zip(weights, probs)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  plain = eval_step.make_log_probs(model, 0.5, 0.25, 'none')(variables, images)
  assert not np.allclose(got, plain, atol=1e-4)


# ----------------------------------------------------------------------------- the experiment
@pytest.mark.parametrize('arg', [None, 'local'])
def test_fast_cifar_configs_resolve_to_the_recipe(arg):
  c = resolve(fast_cifar.get_config(arg))
  assert c.model.name == 'airbench' and c.model.whiten_init == 'patch'
  assert (c.optim.name, c.optim.momentum, c.optim.lookahead) == ('nesterov', 0.85, 5)
  assert c.optim.norm_lr_scale == 64 and c.regularize.label_smoothing == 0.2
  assert (c.augment.flip, c.augment.flip_mode, c.augment.crop_padding) == (True, 'alternate', 2)
  assert c.train.eval_tta == 'flip_translate'
  # airbench's learning rate per example: 1.5 for a batch of 1024 on the mean loss
  assert c.optim.lr == pytest.approx(1.5 * c.train.batch_size / 1024)
  if arg is None:
    assert (c.data.source, c.model.width, c.train.batch_size, c.train.epochs) == (
        'tfds', 64, 1024, 10)
  else:
    assert c.data.source == 'cifar_dir'
  with pytest.raises(ValueError, match='unknown variant'):
    fast_cifar.get_config('locl')


def test_fast_cifar_shrunk_trains_and_evaluates_with_tta(npz, tmp_path):
  workdir = str(tmp_path / 'w')
  status = train_and_evaluate(tiny(npz), workdir, log=quiet)
  assert status['status'] == 'done', status
  rows = RunDir(workdir).read_metrics()
  assert rows and all(np.isfinite(r['val_loss']) for r in rows)
  eng = engine_of(tiny(npz))
  state = eng.init_state()
  with_tta, without = eng.evaluate(state, 'val'), eng.evaluate(state, 'val', 'none')
  assert with_tta['num_examples'] == without['num_examples'] == 60
  assert with_tta['loss'] != without['loss']


def test_a_killed_fast_cifar_run_resumes_bit_identically(npz, tmp_path):
  """The slow weights and the steps since a sync (optimizer state), the frozen filters and
  the epoch of the alternating flips all come back from the checkpoint."""
  config = tiny(npz, **{'train.epochs': 2, 'train.eval_every': 3})   # 8 steps an epoch
  whole, resumed = str(tmp_path / 'whole'), str(tmp_path / 'resumed')
  train_and_evaluate(config, whole, log=quiet)
  with pytest.raises(train.Preempted):   # at step 9: in epoch 1, between syncs at 5 and 10
    train_and_evaluate(config, resumed, log=quiet, stop_after_step=7)
  assert RunDir(resumed).read_metrics()[-1]['step'] == 9
  train_and_evaluate(config, resumed, log=quiet)
  assert_same_metrics(resumed, whole, atol=0)
