import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lib.core.config import base_config
from lib.core.errors import UserError
from lib.model import models
from lib.training.resolve import resolve


def build(name, classes=10, **kw):
  c = base_config()
  c.model.name = name
  c.model.update(kw)
  c = resolve(c)
  return models.build(c.model, classes)


def count(model, shape=(1, 32, 32, 3)):
  v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape)))
  return sum(x.size for x in jax.tree.leaves(v['params']))


IMAGENET = (1, 224, 224, 3)


@pytest.mark.parametrize('name,kw,millions', [
    ('resnet20', {}, 0.27), ('resnet32', {}, 0.46), ('resnet56', {}, 0.85),
    ('resnet110', {}, 1.7), ('preact_resnet_cifar', {'depth': 110}, 1.7),
    ('wide_resnet', {}, 36.5),                           # WRN-28-10
    ('wide_resnet', {'depth': 16, 'width': 4}, 2.7),     # WRN-16-4
    ('resnext29_8x64d', {}, 34.4), ('resnext29_16x64d', {}, 68.1),
    ('resnet18', {}, 11.17)])
def test_parameter_counts_match_the_literature(name, kw, millions):
  assert count(build(name, **kw)) / 1e6 == pytest.approx(millions, rel=0.02)


@pytest.mark.parametrize('name,kw,exact', [
    ('resnet18', {}, 11_689_512), ('resnet50', {}, 25_557_032),   # torchvision
    ('mobilenet', {}, 4_231_976),                                  # Keras MobileNet 1.0, trainable
    ('vgg16', {'norm': 'none'}, 138_357_544)])                     # torchvision vgg16
def test_imagenet_parameter_counts_are_exact(name, kw, exact):
  assert count(build(name, classes=1000, **kw), IMAGENET) == exact


def test_resnet_cifar_depth_and_width_are_configurable():
  assert count(build('resnet_cifar', depth=56)) == count(build('resnet56'))
  assert count(build('resnet_cifar', width=32)) > 3.5 * count(build('resnet20'))
  with pytest.raises(UserError, match='resnet_cifar'):
    build('resnet20', depth=32)


@pytest.mark.parametrize('norm', ['batch', 'layer', 'layer_channels', 'group', 'instance',
                                  'none'])
@pytest.mark.parametrize('name', ['mlp', 'cnn', 'resnet20'])
def test_every_model_runs_with_every_norm(name, norm):
  if name == 'mlp' and norm in ('instance', 'layer_channels'):
    with pytest.raises(UserError, match=f'model.norm={norm} .*mlp'):
      build(name, norm=norm)
    return
  m = build(name, norm=norm, activation='gelu')
  x = jnp.ones((2, 8, 8, 3))
  v = m.init(jax.random.PRNGKey(0), x)
  out, _ = m.apply(v, x, train=True, mutable=['batch_stats'])
  assert out.shape == (2, 10) and out.dtype == jnp.float32
  assert ('batch_stats' in v) == (norm == 'batch')


def _normalize(norm, x):
  layer = models.NORMS.get(norm).fn(False, jnp.float32, nn.initializers.ones)
  return np.asarray(layer.apply(layer.init(jax.random.PRNGKey(0), x), x))


def test_layer_norm_normalizes_each_example_over_positions_and_channels():
  # A feature map whose channels and positions have their own offsets, as after a conv.
  k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
  offsets = (3.0 * jax.random.normal(k1, (1, 1, 1, 16))
             + 2.0 * jax.random.normal(k2, (1, 6, 6, 1)))
  spreads = jnp.exp(jax.random.normal(k3, (1, 1, 1, 16)))
  x = offsets + spreads * jax.random.normal(k4, (4, 6, 6, 16))
  y = _normalize('layer', x)
  np.testing.assert_allclose(y.mean(axis=(1, 2, 3)), 0, atol=1e-4)
  np.testing.assert_allclose(y.var(axis=(1, 2, 3)), 1, atol=1e-3)
  # One mean per example: positions are not centred over their channels, and the
  # channels keep their relative offsets.
  assert np.abs(y.mean(axis=-1)).max() > 0.5
  assert np.abs(y.mean(axis=(0, 1, 2))).max() > 0.5
  # Its parameters are per channel, as in GroupNorm with one group.
  layer = models.NORMS.get('layer').fn(False, jnp.float32, nn.initializers.ones)
  params = jax.tree.leaves(layer.init(jax.random.PRNGKey(0), x)['params'])
  assert [p.shape for p in params] == [(16,), (16,)]
  # layer_channels (ConvNeXt's LayerNorm) normalizes each position over its channels.
  y = _normalize('layer_channels', x)
  np.testing.assert_allclose(y.mean(axis=-1), 0, atol=1e-4)
  np.testing.assert_allclose(y.var(axis=-1), 1, atol=1e-3)
  # On dense features both are the usual layer norm over the features.
  h = x.reshape(4, -1)
  np.testing.assert_allclose(_normalize('layer', h), _normalize('layer_channels', h), atol=1e-5)


def test_batchnorm_uses_running_averages_at_eval():
  m = build('cnn')
  x = jax.random.normal(jax.random.PRNGKey(1), (8, 8, 8, 3))
  v = m.init(jax.random.PRNGKey(0), x)
  # Eval output of an example does not depend on the rest of the batch...
  full = m.apply(v, x, train=False)
  np.testing.assert_allclose(m.apply(v, x[:2], train=False), full[:2], rtol=1e-5, atol=1e-5)
  # ...while train mode normalizes with batch statistics, so it does.
  t_full, _ = m.apply(v, x, train=True, mutable=['batch_stats'])
  t_part, _ = m.apply(v, x[:2], train=True, mutable=['batch_stats'])
  assert not np.allclose(t_full[:2], t_part, atol=1e-4)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  m = build('resnet20', dtype='bfloat16')
  v = m.init(jax.random.PRNGKey(0), jnp.ones((2, 32, 32, 3)))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v['params']))
  assert m.apply(v, jnp.ones((2, 32, 32, 3))).dtype == jnp.float32


def test_unknown_names_list_the_valid_ones():
  with pytest.raises(UserError, match='valid: .*resnet20'):
    build('resnet21')
  with pytest.raises(UserError, match='valid: elu, gelu, leaky_relu, maxout, relu, sigmoid, tanh'):
    build('mlp', activation='swish')


def _first_activation_and_logits(model, shape):
  """Shapes (no compute): the stem's first activation and the logits."""
  def run():
    x = jnp.zeros(shape)
    v = model.init(jax.random.PRNGKey(0), x)
    acts = models.activations(model, v, x, train=False)
    return acts[0][1], model.apply(v, x)
  return jax.eval_shape(run)


@pytest.mark.parametrize('name', ['resnet18', 'resnet50'])
def test_imagenet_stem_above_64_px_and_model_stem_forces_either(name):
  # auto: 7x7 stride-2 conv (its activation at half size) then a 3x3 stride-2 max-pool
  # above 64 px; a 3x3 stride-1 conv (full size) at 64 px and below, as before.
  act, logits = _first_activation_and_logits(build(name, classes=1000), IMAGENET)
  assert act.shape == (1, 112, 112, 64) and logits.shape == (1, 1000)
  assert _first_activation_and_logits(build(name), (1, 64, 64, 3))[0].shape == (1, 64, 64, 64)
  # model.stem=imagenet keeps the ImageNet stem (and torchvision's parameter count) at 64 px.
  narrow = build(name, classes=1000, stem='imagenet')
  assert _first_activation_and_logits(narrow, (1, 64, 64, 3))[0].shape == (1, 32, 32, 64)
  assert count(narrow, (1, 64, 64, 3)) == count(build(name, classes=1000), IMAGENET)
  cifar = build(name, classes=1000, stem='cifar')
  assert _first_activation_and_logits(cifar, IMAGENET)[0].shape == (1, 224, 224, 64)
  assert count(cifar, IMAGENET) == count(build(name, classes=1000), IMAGENET) - 7 * 7 * 3 * 64 \
      + 3 * 3 * 3 * 64


def test_model_stem_is_checked():
  with pytest.raises(UserError, match="unknown model.stem='big'; valid: auto, imagenet, cifar"):
    build('resnet18', stem='big')
  with pytest.raises(UserError, match='model.stem=imagenet .* model.name=mlp'):
    build('mlp', stem='imagenet')


def test_narrow_resnet50_and_resnet18_scale_every_stage_with_model_width():
  # Stage widths 64-128-256-512 (x4 expansion for the bottleneck) at width 64, the
  # same shape at any width: width w has (w/64)^2 of the conv parameters.
  for name, full in (('resnet18', 11_689_512), ('resnet50', 25_557_032)):
    fc = lambda w: (8 * w if name == 'resnet50' else 2 * w) * 4 * 1000 + 1000
    narrow = count(build(name, classes=1000, width=16), IMAGENET)
    assert narrow - fc(16) == pytest.approx((full - fc(64)) / 16, rel=0.01)


def test_bfloat16_resnet50_computes_in_bfloat16_with_float32_params_and_logits():
  m = build('resnet50', dtype='bfloat16', width=8, stem='imagenet')
  x = jnp.ones((2, 64, 64, 3))
  shapes = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), x))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes['params']))
  # Variables drawn on the host (ResNet-50's compiled init alone takes 14 s here).
  rng = np.random.default_rng(0)

  def draw(path, s):
    name = getattr(path[-1], 'key', '')
    if name == 'kernel':
      return jnp.asarray(rng.normal(0, np.sqrt(2 / np.prod(s.shape[:-1])), s.shape), s.dtype)
    return jnp.full(s.shape, 1.0 if name in ('scale', 'var') else 0.0, s.dtype)
  v = jax.tree_util.tree_map_with_path(draw, shapes)
  acts = jax.eval_shape(lambda: [a for _, a in models.activations(m, v, x, train=False)])
  assert len(acts) > 50 and all(a.dtype == jnp.bfloat16 for a in acts)
  logits = jax.jit(m.apply)(v, x)
  assert logits.dtype == jnp.float32 and logits.shape == (2, 10)
  full = jax.jit(build('resnet50', width=8, stem='imagenet').apply)(v, x)   # in float32
  assert float(jnp.abs(logits - full).max()) < 0.02 * float(jnp.abs(full).max())


def _equations(jaxpr):
  """Every equation of a jaxpr and of the jaxprs inside it (jit, custom rules, branches)."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  for e in jaxpr.eqns:
    yield e
    for v in e.params.values():
      for inner in (v if isinstance(v, (list, tuple)) else [v]):
        if hasattr(inner, 'eqns') or hasattr(inner, 'jaxpr'):
          yield from _equations(inner)


def test_bfloat16_train_step_computes_in_bfloat16_and_keeps_float32_where_it_must():
  """model.dtype=bfloat16 in the whole train step: every conv and matmul (forward and
  backward) in bfloat16; softmax and loss, BN statistics, the optimizer, the EMA and the
  parameters in float32. The one bfloat16 reduction allowed is the head's bias gradient
  (a sum over the batch of the bfloat16 logits' cotangent, then cast to the f32 params)."""
  from lib.core import sharding
  from lib.data import datasets as data
  from lib.training import engine
  from conftest import quickstart_mlp
  c = quickstart_mlp(1, **{'model.name': 'resnet_cifar', 'model.depth': 8, 'model.width': 4,
                           'model.norm': 'batch', 'model.dtype': 'bfloat16',
                           'train.batch_size': 32, 'train.ema_decay': 0.9})
  c = resolve(c)
  eng = engine.Engine(c, data.load(c.data), sharding.make_mesh(jax.devices()[:1]))
  state, sums, idx = eng.init_state(), eng.zero_sums(), eng.epoch_indices(0)
  images, labels = eng.split_on_device('train')
  args = (state, eng.hparams, images, labels, idx, sums)
  dtypes = lambda e: {str(v.aval.dtype) for v in e.invars if hasattr(getattr(v, 'aval', None), 'dtype')}
  eqns = list(_equations(jax.make_jaxpr(eng._train_step)(*args)))
  matmuls = [e for e in eqns if e.primitive.name in ('conv_general_dilated', 'dot_general')]
  assert len(matmuls) >= 20 and all(dtypes(e) == {'bfloat16'} for e in matmuls)
  softmax = [e for e in eqns if e.primitive.name in ('exp', 'log', 'reduce_max')]
  assert softmax and all(dtypes(e) == {'float32'} for e in softmax)
  low = [e for e in eqns if e.primitive.name == 'reduce_sum' and 'bfloat16' in dtypes(e)]
  assert [tuple(e.outvars[0].aval.shape) for e in low] == [(10,)]   # BN's sums are f32
  new_state, new_sums = jax.eval_shape(eng._train_step, *args)   # dtypes, without compiling
  for name in ('params', 'opt_state', 'batch_stats', 'ema'):
    leaves = [x for x in jax.tree.leaves(getattr(new_state, name))
              if jnp.issubdtype(x.dtype, jnp.floating)]
    assert leaves and all(x.dtype == jnp.float32 for x in leaves), name
  assert new_sums['loss'].dtype == jnp.float32
