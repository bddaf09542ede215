import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lib.core.config import base_config
from lib.core.errors import UserError
from lib.model import inits

DENSE = (1000, 1000)
CONV = (3, 3, 64, 128)
# Fans written out by hand: conv fan_in = 3*3*64, fan_out = 3*3*128.
FANS = {DENSE: {'fan_in': 1000, 'fan_out': 1000, 'fan_avg': 1000},
        CONV: {'fan_in': 576, 'fan_out': 1152, 'fan_avg': 864}}
RECT = (400, 1600)  # dense with distinct fans
FANS[RECT] = {'fan_in': 400, 'fan_out': 1600, 'fan_avg': 1000}
GAIN = {'relu': math.sqrt(2), 'leaky_relu': math.sqrt(2 / (1 + 0.01 ** 2)), 'tanh': 5 / 3,
        'sigmoid': 1.0, 'linear': 1.0}


def model_config(**kw):
  c = base_config().model
  for k, v in kw.items():
    c[k] = v
  return c


def sample(cfg, shape, last_layer=False, seed=0):
  w = inits.kernel_init(cfg, last_layer=last_layer)(jax.random.PRNGKey(seed), shape, jnp.float32)
  assert w.shape == shape and w.dtype == jnp.float32
  return np.asarray(w, np.float64)


def assert_std(w, std):
  assert abs(w.std() / std - 1) < 0.05, (w.std(), std)
  assert abs(w.mean()) < 0.05 * std


@pytest.mark.parametrize('shape', [DENSE, CONV, RECT])
@pytest.mark.parametrize('fan', ['fan_in', 'fan_out', 'fan_avg'])
@pytest.mark.parametrize('dist', ['normal', 'uniform'])
def test_variance_scaling_std(shape, fan, dist):
  f = FANS[shape][fan]
  # xavier: 1/sqrt(fan), no gain even with a relu activation
  w = sample(model_config(init=f'xavier_{dist}', init_fan=fan, activation='relu'), shape)
  assert_std(w, 1 / math.sqrt(f))
  # kaiming: gain/sqrt(fan) for each gain, explicit and auto
  for act in ('relu', 'leaky_relu', 'tanh'):
    w = sample(model_config(init=f'kaiming_{dist}', init_fan=fan, activation=act), shape)
    assert_std(w, GAIN[act] / math.sqrt(f))
  # lecun: 1/sqrt(fan_in) whatever init_fan says
  w = sample(model_config(init=f'lecun_{dist}', init_fan=fan, activation='relu'), shape)
  assert_std(w, 1 / math.sqrt(FANS[shape]['fan_in']))


def test_xavier_fan_avg_is_glorot():
  w = sample(model_config(init='xavier_normal', init_fan='fan_avg'), RECT)
  assert_std(w, math.sqrt(2 / (400 + 1600)))
  assert abs(math.sqrt(2 / (400 + 1600)) / (1 / math.sqrt(400)) - 1) > 0.3  # distinguishable


def test_uniform_limits_and_normal_untruncated():
  w = sample(model_config(init='kaiming_uniform', init_fan='fan_in'), DENSE)
  limit = math.sqrt(3) * math.sqrt(2 / 1000)
  assert np.abs(w).max() <= limit + 1e-7 and np.abs(w).max() > 0.99 * limit
  w = sample(model_config(init='kaiming_normal', init_fan='fan_in'), DENSE)
  std = math.sqrt(2 / 1000)
  assert np.abs(w).max() > 3 * std  # a truncated normal (at 2 std) would not reach this
  assert abs(w.std() / std - 1) < 0.01  # and no truncation-corrected rescaling


@pytest.mark.parametrize('shape', [DENSE, CONV])
def test_normal_and_uniform_use_init_scale(shape):
  assert_std(sample(model_config(init='normal', init_scale=0.02), shape), 0.02)
  w = sample(model_config(init='uniform', init_scale=0.3), shape)
  assert_std(w, 0.3 / math.sqrt(3))
  assert np.abs(w).max() <= 0.3 and np.abs(w).max() > 0.29


def test_zeros_and_constant_exact():
  assert np.all(sample(model_config(init='zeros', init_scale=0.5), CONV) == 0)
  w = sample(model_config(init='constant', init_scale=0.25), (3, 4))
  assert np.all(w == 0.25)
  b = inits.bias_init(model_config(bias_init=0.1))(jax.random.PRNGKey(0), (7,), jnp.float32)
  np.testing.assert_array_equal(b, np.full((7,), 0.1, np.float32))
  b = inits.bias_init(model_config())(jax.random.PRNGKey(0), (7,), jnp.float32)
  np.testing.assert_array_equal(b, np.zeros((7,)))


def test_orthogonal():
  g = 5 / 3
  cfg = model_config(init='orthogonal', activation='tanh')
  w = sample(cfg, (64, 64))
  np.testing.assert_allclose(w.T @ w, g ** 2 * np.eye(64), atol=1e-4)
  w = sample(cfg, (96, 32))  # tall: orthonormal columns
  np.testing.assert_allclose(w.T @ w, g ** 2 * np.eye(32), atol=1e-4)
  w = sample(cfg, (32, 96))  # wide: orthonormal rows
  np.testing.assert_allclose(w @ w.T, g ** 2 * np.eye(32), atol=1e-4)
  w = sample(cfg, (3, 3, 8, 16)).reshape(3 * 3 * 8, 16)  # conv: (kh*kw*in, out)
  np.testing.assert_allclose(w.T @ w, g ** 2 * np.eye(16), atol=1e-4)
  w = sample(model_config(init='orthogonal', activation='relu'), (64, 64))
  np.testing.assert_allclose(w.T @ w, 2 * np.eye(64), atol=1e-4)
  w = sample(cfg, (64, 64), last_layer=True)  # classifier: gain 1
  np.testing.assert_allclose(w.T @ w, np.eye(64), atol=1e-4)


def test_gain_for():
  assert inits.gain_for('auto', 'relu') == pytest.approx(math.sqrt(2))
  for act in ('elu', 'gelu', 'maxout'):
    assert inits.gain_for('auto', act) == pytest.approx(math.sqrt(2))
  assert inits.gain_for('auto', 'leaky_relu') == pytest.approx(math.sqrt(2 / 1.0001))
  assert inits.gain_for('auto', 'tanh') == pytest.approx(5 / 3)
  assert inits.gain_for('auto', 'sigmoid') == 1.0
  assert inits.gain_for('auto', 'swish_or_anything') == 1.0
  assert inits.gain_for('tanh', 'relu') == pytest.approx(5 / 3)  # explicit beats activation
  assert inits.gain_for('linear', 'relu') == 1.0
  assert inits.GAINS.names() == ['leaky_relu', 'linear', 'relu', 'sigmoid', 'tanh']


def test_classifier_uses_linear_gain():
  for gain in ('auto', 'relu', 'tanh'):
    cfg = model_config(init='kaiming_normal', activation='relu', init_gain=gain)
    assert_std(sample(cfg, DENSE, last_layer=True), 1 / math.sqrt(1000))
    hidden = GAIN['relu' if gain == 'auto' else gain]
    assert_std(sample(cfg, DENSE), hidden / math.sqrt(1000))
  # inits without a gain are unchanged
  cfg = model_config(init='normal', init_scale=0.05)
  assert_std(sample(cfg, DENSE, last_layer=True), 0.05)


def test_works_in_flax_layers():
  cfg = model_config(init='kaiming_uniform', bias_init=0.5)
  layer = nn.Conv(128, (3, 3), kernel_init=inits.kernel_init(cfg), bias_init=inits.bias_init(cfg))
  params = layer.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 64)))['params']
  assert params['kernel'].shape == CONV
  assert_std(np.asarray(params['kernel']), math.sqrt(2 / 576))
  np.testing.assert_array_equal(params['bias'], np.full((128,), 0.5, np.float32))
  dense = nn.Dense(10, kernel_init=inits.kernel_init(cfg, last_layer=True))
  assert dense.init(jax.random.PRNGKey(0), jnp.zeros((1, 5)))['params']['kernel'].shape == (5, 10)


def test_registry_names_and_default_config_is_valid():
  assert inits.INITS.names() == sorted([
      'zeros', 'constant', 'normal', 'uniform', 'xavier_normal', 'xavier_uniform',
      'kaiming_normal', 'kaiming_uniform', 'lecun_normal', 'lecun_uniform', 'orthogonal'])
  inits.check(model_config())
  for name in inits.INITS.names():
    for fan in ('fan_in', 'fan_out', 'fan_avg'):
      inits.check(model_config(init=name, init_fan=fan))


@pytest.mark.parametrize('key,value,pattern', [
    ('init_fan', 'fan_sum', r'model\.init_fan=.*fan_avg, fan_in, fan_out'),
    ('init_gain', 'relux', r'model\.init_gain=.*auto.*leaky_relu.*tanh'),
    ('init', 'he_normal', r'model\.init=.*kaiming_normal.*xavier_uniform'),
    ('init_scale', -0.1, r'model\.init_scale'),
])
def test_bad_values_raise_user_error(key, value, pattern):
  cfg = model_config(**{key: value})
  with pytest.raises(UserError, match=pattern) as e:
    inits.check(cfg)
  assert '\n' not in str(e.value)
  with pytest.raises(UserError, match=pattern):
    inits.kernel_init(cfg)
