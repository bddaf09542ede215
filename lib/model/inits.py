"""Kernel initializers of conv/dense layers, chosen by `model.init`.

Fans (as in PyTorch and Flax): a dense kernel (in, out) has fan_in = in,
fan_out = out; a conv kernel (kh, kw, in, out) has fan_in = kh*kw*in and
fan_out = kh*kw*out (receptive field times channels). `fan` below is the fan
named by `model.init_fan`: fan_in, fan_out or fan_avg = (fan_in + fan_out) / 2.
`gain` is `model.init_gain` ('auto': from `model.activation`, see `gain_for`),
and always 1 (linear) for the classifier layer. `scale` is `model.init_scale`.

  zeros            W = 0
  constant         W = scale
  normal           W ~ N(0, scale^2)
  uniform          W ~ U[-scale, scale]                (std = scale / sqrt(3))
  xavier_normal    W ~ N(0, 1/fan)   std = 1/sqrt(fan); with fan_in this is the
                   lecture's Xavier 1/sqrt(fan_in); fan_avg gives Glorot &
                   Bengio's sqrt(2/(fan_in + fan_out)). No gain.
  kaiming_normal   W ~ N(0, gain^2/fan)  std = gain/sqrt(fan); relu gain gives
                   He et al.'s sqrt(2/fan_in).
  lecun_normal     W ~ N(0, 1/fan_in)    std = 1/sqrt(fan_in), whatever init_fan.
  *_uniform        the same variance as *_normal: U[-limit, limit] with
                   limit = sqrt(3) * std.
  orthogonal       W reshaped to (fan_in, fan_out) = gain * (a matrix with
                   orthonormal columns if fan_in >= fan_out, else orthonormal
                   rows), so W^T W = gain^2 I (or W W^T = gain^2 I).

Normal distributions are untruncated.
"""
import math

import jax
import jax.numpy as jnp

from lib.core import factors
from lib.core.errors import UserError
from lib.core.registry import Registry

INITS = Registry('initializer', 'model.init')
GAINS = Registry('gain', 'model.init_gain')
FANS = ('fan_avg', 'fan_in', 'fan_out')

# Each init entry maps (scale, fan, gain) to an initializer (key, shape, dtype) -> array.
_vs = jax.nn.initializers.variance_scaling  # variance = scale / fan; 'normal' is untruncated

INITS.add('zeros', lambda scale, fan, gain: jax.nn.initializers.zeros)
INITS.add('constant', lambda scale, fan, gain: jax.nn.initializers.constant(scale))
INITS.add('normal', lambda scale, fan, gain: jax.nn.initializers.normal(stddev=scale))
INITS.add('uniform', lambda scale, fan, gain: _symmetric_uniform(scale))
INITS.add('xavier_normal', lambda scale, fan, gain: _vs(1.0, fan, 'normal'))
INITS.add('xavier_uniform', lambda scale, fan, gain: _vs(1.0, fan, 'uniform'))
INITS.add('kaiming_normal', lambda scale, fan, gain: _vs(gain ** 2, fan, 'normal'))
INITS.add('kaiming_uniform', lambda scale, fan, gain: _vs(gain ** 2, fan, 'uniform'))
INITS.add('lecun_normal', lambda scale, fan, gain: _vs(1.0, 'fan_in', 'normal'))
INITS.add('lecun_uniform', lambda scale, fan, gain: _vs(1.0, 'fan_in', 'uniform'))
# jax's orthogonal flattens every axis but the last: (kh, kw, in, out) -> (kh*kw*in, out).
INITS.add('orthogonal', lambda scale, fan, gain: jax.nn.initializers.orthogonal(
    scale=gain, column_axis=-1))

# PyTorch's torch.nn.init.calculate_gain values; flax/jax leaky_relu slope is 0.01.
for _name, _gain in [('relu', math.sqrt(2.0)),
                     ('leaky_relu', math.sqrt(2.0 / (1.0 + 0.01 ** 2))),
                     ('tanh', 5.0 / 3.0),
                     ('linear', 1.0),
                     ('sigmoid', 1.0)]:
  GAINS.add(_name, (lambda g: (lambda: g))(_gain))

# model.init_gain='auto': activation name -> gain name (anything else: linear).
AUTO_GAIN = {'relu': 'relu', 'elu': 'relu', 'gelu': 'relu', 'maxout': 'relu',
             'leaky_relu': 'leaky_relu', 'tanh': 'tanh', 'sigmoid': 'sigmoid'}


def _symmetric_uniform(limit):
  """W ~ U[-limit, limit]."""
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, minval=-limit, maxval=limit)
  return init


def gain_for(init_gain: str, activation: str) -> float:
  """The gain named by init_gain, or for 'auto' the one of `activation`.

  auto: relu, elu, gelu, maxout -> sqrt(2); leaky_relu -> sqrt(2/(1+0.01^2));
  tanh -> 5/3; sigmoid -> 1; anything else -> 1 (linear).
  """
  if init_gain == 'auto':
    return GAINS.get(AUTO_GAIN.get(activation, 'linear')).fn()
  if init_gain not in GAINS:
    raise UserError(f'unknown gain model.init_gain={init_gain!r}; valid: auto, '
                    f'{", ".join(GAINS.names())}')
  return GAINS.get(init_gain).fn()


def check(model_config) -> None:
  """Validates model.init, init_scale, init_fan and init_gain (one-line UserErrors)."""
  INITS.get(model_config.init)
  if model_config.init_fan not in FANS:
    raise UserError(f'unknown fan model.init_fan={model_config.init_fan!r}; valid: '
                    f'{", ".join(FANS)}')
  gain_for(model_config.init_gain, model_config.activation)
  factors.FACTORS['model.init_scale'].check(model_config.init_scale)   # its declared range


def kernel_init(model_config, last_layer: bool = False):
  """The kernel initializer (key, shape, dtype) -> array named by model_config.init.

  last_layer=True (the classifier, followed by no nonlinearity) uses gain 1;
  everything else is the same as for hidden layers.
  """
  check(model_config)
  gain = 1.0 if last_layer else gain_for(model_config.init_gain, model_config.activation)
  return INITS.get(model_config.init).fn(
      float(model_config.init_scale), model_config.init_fan, gain)


def bias_init(model_config):
  """Every bias = model_config.bias_init (a constant)."""
  return jax.nn.initializers.constant(float(model_config.bias_init))
