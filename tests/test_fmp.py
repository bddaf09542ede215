"""model.pool: fractional max-pooling (lib/model/fmp.py), 2x2 average pooling, and max
pooling left as it was; the per-step draws, deterministic evaluation (one fixed draw or
the average over train.fmp_eval_draws), training on 4 devices and as vectorized arms."""
import json
import math
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import quickstart
from lib.core import sharding
from lib.core.config import base_config
from lib.core.errors import UserError
from lib.data import datasets as data
from lib.model import fmp, models
from lib.runs import evaluate, group_train
from lib.runs.rundir import RunDir
from lib.training import engine, steps
from lib.training.resolve import resolve

quiet = lambda message: None
pool = jax.jit(fmp.pool, static_argnums=(2, 3))   # one compilation per shape, not per op
# Sides and ratios: every region 1 wide but one, Graham's sqrt(2), the last row left out
# (11 / 1.9: 5 regions of at most 2), exactly 2x2 and 2 on an odd side.
SIDES_AND_RATIOS = [(11, 1.05), (11, math.sqrt(2)), (8, math.sqrt(2)), (11, 1.9), (8, 2.0),
                    (3, 2.0)]


def reach(n, ratio, overlap, key):
  """{output (i, j): the set of input pixels (r, c) it pools}, found by pooling the one-hot
  image of every input pixel."""
  onehot = np.eye(n * n, dtype=np.float32).reshape(n * n, n, n, 1)
  out = np.asarray(pool(onehot, key, ratio, overlap))[..., 0]   # (n*n, n_out, n_out)
  regions = {}
  for pixel, o in enumerate(out):
    for i, j in zip(*np.nonzero(o)):
      regions.setdefault((i, j), set()).add(divmod(pixel, n))
  return out.shape[1:], regions


def as_rectangle(cells):
  rows, cols = sorted({r for r, _ in cells}), sorted({c for _, c in cells})
  assert cells == {(r, c) for r in rows for c in cols}, cells   # a full rectangle
  return (rows[0], rows[-1]), (cols[0], cols[-1])


def test_regions_are_1_or_2_wide_disjoint_or_overlapping_by_one_row_and_cover_the_input():
  for n, ratio in SIDES_AND_RATIOS:
    n_out = int(n // ratio)
    covered = min(n, 2 * n_out)   # the last row is left out only where 2 * n_out < n
    assert covered == n or (covered == n - 1 and ratio > 1.5)
    for seed in range(2):
      shape, regions = reach(n, ratio, False, jax.random.PRNGKey(seed))
      assert shape == (n_out, n_out) and len(regions) == n_out ** 2, (n, ratio)
      seen = set()
      for cells in regions.values():
        (r0, r1), (c0, c1) = as_rectangle(cells)
        assert r1 - r0 + 1 in (1, 2) and c1 - c0 + 1 in (1, 2), (n, ratio)
        assert not seen & cells, (n, ratio)           # disjoint
        seen |= cells
      assert seen == {(r, c) for r in range(covered) for c in range(covered)}, (n, ratio)
      # overlapping: region i is [a_i, a_{i+1}], clipped at the last row
      shape, regions = reach(n, ratio, True, jax.random.PRNGKey(seed))
      assert shape == (n_out, n_out)
      rects = {ij: as_rectangle(cells) for ij, cells in regions.items()}
      rows = [rects[(i, 0)][0] for i in range(n_out)]
      assert all(rects[(i, j)][0] == rows[i] for i, j in rects)   # one row sequence
      for (a0, a1), (b0, b1) in zip(rows, rows[1:]):
        assert a1 == b0 and a1 - a0 + 1 in (2, 3), (n, ratio)
      assert rows[0][0] == 0 and rows[-1][1] == n - 1, (n, ratio)


def test_ratio_2_disjoint_is_2x2_max_pooling_and_draws_differ():
  x = np.random.RandomState(0).randn(2, 10, 7, 3).astype(np.float32)
  for seed in range(3):
    np.testing.assert_array_equal(pool(x, jax.random.PRNGKey(seed), 2.0, False),
                                  nn.max_pool(x, (2, 2), strides=(2, 2)))   # VALID: 5 x 3
  a, b = (pool(x, jax.random.PRNGKey(s), math.sqrt(2), False) for s in (0, 1))
  assert a.shape == b.shape == (2, 7, 4, 3) and not np.array_equal(a, b)
  assert pool(x[:, :1], jax.random.PRNGKey(0), math.sqrt(2), True).shape == (2, 1, 4, 3)


def build(name, **model):
  c = base_config()
  c.model.name, c.model.norm = name, 'batch'
  c.model.update(model)
  c = resolve(c)
  return c, models.build(c.model, 10)


class OldCNN(models.CNN):
  """The CNN as it was before model.pool (nn.max_pool written out)."""

  @nn.compact
  def __call__(self, x, train=False, hp=None):
    for i in range(self.depth):
      x = self.act(self.make_norm(train)(self.conv(self.width * 2 ** i)(x)), train, hp)
      if i < self.depth - 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='SAME')
    x = self.act(self.dense(8 * self.width)(x.reshape((x.shape[0], -1))), train, hp)
    return self.classifier(x, train, hp)


def test_max_is_the_default_and_computes_what_the_cnn_did_before_and_avg_is_the_2x2_mean():
  c, model = build('cnn', depth=3, width=4)
  assert c.model.pool == 'max'
  x = np.random.RandomState(0).randn(3, 9, 9, 3).astype(np.float32)   # odd: SAME padding
  variables = jax.jit(model.init)(jax.random.PRNGKey(1), x)
  old = OldCNN(**{f: getattr(model, f) for f in ('depth', 'width', 'norm', 'opts')})
  np.testing.assert_array_equal(jax.jit(model.apply)(variables, x),
                                jax.jit(old.apply)(variables, x))
  # avg: the mean of each 2x2 block (of the part of one at an odd edge)
  _, avg = build('cnn', depth=3, width=4, pool='avg')
  y = np.random.RandomState(2).randn(2, 5, 4, 3).astype(np.float32)
  got = np.asarray(jax.jit(lambda v: avg.apply(variables, v, method=lambda m, v: m.pool(v, 0)))(y))
  want = y[:, :4].reshape(2, 2, 2, 2, 2, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(got[:, :2], want, rtol=1e-6)
  np.testing.assert_allclose(got[:, 2], y[:, 4].reshape(2, 2, 2, 3).mean(axis=2), rtol=1e-6)
  with pytest.raises(UserError, match='model.pool=fractional sets the pooling layers of cnn'):
    build('resnet20', pool='fractional')
  with pytest.raises(UserError, match=r'model.fmp_ratio=2.5 must be in \(1, 2\]'):
    build('cnn', pool='fractional', fmp_ratio=2.5)


def test_vgg_shapes_with_each_pool():
  x = jnp.zeros((1, 32, 32, 3))
  sizes = {}
  for kind in ('max', 'avg', 'fractional'):
    _, model = build('vgg11', width=2, pool=kind)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))['params']
    sizes[kind] = shapes['Dense_0']['kernel'].shape[0]   # flattened last feature map
  # 32 -> 16 8 4 2 1 (2x2); 32 -> 22 15 10 7 4 (sqrt 2); 16 channels at the end
  assert sizes == {'max': 16, 'avg': 16, 'fractional': 16 * 4 * 4}


def tiny_cnn(**overrides):
  c = quickstart.get_config()
  c.model.name, c.model.depth, c.model.width, c.model.norm = 'cnn', 2, 8, 'batch'
  c.model.pool = 'fractional'
  c.optim.lr, c.regularize.l2 = 0.05, 0.0
  c.train.epochs, c.train.batch_size, c.train.log_every = 1, 64, 1000
  c.update_from_flattened_dict(overrides)
  return c


def test_each_step_draws_its_own_regions(devices):
  config = resolve(tiny_cnn())
  dataset = data.load(config.data)
  mesh = sharding.make_mesh(devices[:1])
  eng = engine.Engine(config, dataset, mesh)
  batch_step = jax.jit(steps.make_batch_step(eng.model, eng.tx_build, config, mesh, eng.mean,
                                             eng.std, dataset.num_classes))
  images, labels = (a[:16] for a in dataset.split('train'))
  state = eng.init_state()
  loss = lambda step: float(batch_step(state.replace(step=jnp.int32(step)), eng.hparams, images,
                                       labels, eng.zero_sums())[1]['loss'])
  # Nothing else in this step is random (no augmentation, no dropout): the same batch and
  # weights give the same loss at the same step, another at the next (another draw).
  first, second, again = loss(0), loss(1), loss(0)
  assert first == again and first != second


def test_evaluation_draws_are_fixed_and_averaged():
  c, model = build('cnn', depth=3, width=4, pool='fractional', fmp_overlap=True)
  x = np.random.RandomState(0).randint(0, 256, (16, 8, 8, 3)).astype(np.uint8)
  y = np.arange(16) % 10
  v = jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 3)))
  state = steps.TrainState(step=0, params=v['params'], batch_stats=v['batch_stats'],
                           opt_state=None, rng=None)
  idx, mask = np.arange(16), np.ones(16, bool)
  steps_ = {k: jax.jit(steps.make_eval_step(model, 0.5, 0.25, draws=k)) for k in (1, 3)}
  run = lambda draws: float(steps_[draws](state, x, y, idx, mask)['loss'])
  one, three = run(1), run(3)
  assert one == run(1) and three == run(3)                    # fixed draws
  assert not np.isclose(one, three, rtol=1e-6)   # other draws: averaging changes the prediction
  # one draw is the model's own evaluation (no 'fmp' rng: its fixed draw)
  xs = (x.astype(np.float32) / 255 - 0.5) / 0.25
  plain = np.asarray(jax.nn.log_softmax(jax.jit(model.apply)(v, xs)))
  np.testing.assert_allclose(one, -np.sum(plain[np.arange(16), y]), rtol=1e-6)


@pytest.fixture(scope='module')
def fmp_arms(tmp_path_factory, devices):
  """Two arms of tiny_cnn with fractional pooling (2 evaluation draws), differing only in
  seed, trained as one program on 4 devices: their workdirs, statuses and group log."""
  root = tmp_path_factory.mktemp('fmp')
  dirs = [str(root / f'arm{s}') for s in (0, 1)]
  lines = []
  statuses = group_train.train_group([tiny_cnn(**{'train.fmp_eval_draws': 2, 'seed': s})
                                      for s in (0, 1)], dirs, log=lines.append, devices=devices)
  return dirs, statuses, lines


def test_fractional_arms_differing_in_seed_train_as_one_program_on_four_devices(fmp_arms):
  dirs, statuses, lines = fmp_arms
  assert 'as one program' in lines[0] and 'mesh 1 arms x 4 data' in lines[0]
  assert [s['status'] for s in statuses] == ['done', 'done']
  for d in dirs:
    rows = RunDir(d).read_metrics()
    assert all(np.isfinite(r['running_train_loss']) and np.isfinite(r['val_loss']) for r in rows)
    assert rows[-1]['val_accuracy'] > 0.3   # chance: 0.1
  assert rows[-1]['val_loss'] != RunDir(dirs[0]).read_metrics()[-1]['val_loss']


def test_a_checkpoint_evaluates_to_its_logged_accuracy_with_its_own_draws(fmp_arms, tmp_path):
  dirs, statuses, _ = fmp_arms
  result = evaluate.evaluate_checkpoint(dirs[0], 'best')     # launch.eval's path
  assert result['accuracy'] == pytest.approx(statuses[0]['best_val_accuracy'], abs=1e-9)
  # The same checkpoint with one evaluation draw: its own engine (not the one kept for 2)
  one = str(tmp_path / 'one_draw')
  shutil.copytree(dirs[0], one)
  config = RunDir(one).read_config()
  config['train']['fmp_eval_draws'] = 1
  with open(os.path.join(one, 'config.json'), 'w') as f:
    json.dump(config, f)
  assert evaluate.evaluate_checkpoint(one, 'best')['loss'] != result['loss']
  # an ensemble of the run alone evaluates it with its own draws, as launch.eval does
  from lib.runs import ensemble
  alone = ensemble.evaluate_ensemble([dirs[0]], ['val'])['ensemble']['val']
  assert alone['loss'] == pytest.approx(result['loss'], rel=1e-5)
