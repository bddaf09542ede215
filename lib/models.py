"""Flax Linen classifiers, used as pure functions through init / apply.

Every model is `Module(num_classes, depth, width, activation, norm, dtype)` and
is called as `model.apply(variables, images, train=..., rngs=..., mutable=...)`.
`norm` selects batch / layer / group normalization or none; BatchNorm uses batch
statistics when train=True and running averages otherwise. Computation runs in
`dtype` (float32 or bfloat16); parameters stay float32; logits come out float32.
"""
import functools
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lib.registry import Registry

MODELS = Registry('model', 'model.name')
ACTIVATIONS = Registry('activation', 'model.activation')
NORMS = Registry('normalization', 'model.norm')

for _name, _fn in [('relu', nn.relu), ('leaky_relu', nn.leaky_relu), ('elu', nn.elu),
                   ('gelu', nn.gelu), ('tanh', jnp.tanh), ('sigmoid', nn.sigmoid)]:
  ACTIVATIONS.add(_name, _fn)

NORMS.add('none', lambda train, dtype: (lambda x: x))
NORMS.add('batch', lambda train, dtype: nn.BatchNorm(
    use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype))
NORMS.add('layer', lambda train, dtype: nn.LayerNorm(dtype=dtype))
# Group count adapts to the width (8 groups where the width allows it).
NORMS.add('group', lambda train, dtype: _GroupNorm(dtype=dtype))


class _GroupNorm(nn.Module):
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.GroupNorm(num_groups=math.gcd(8, x.shape[-1]), dtype=self.dtype)(x)


# He/Kaiming normal (std sqrt(2/fan_in)) for ReLU-family hidden layers.
he_normal = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


def conv(features, dtype, norm, kernel=3, strides=1):
  # No bias when a normalization layer follows: its offset plays that role.
  return nn.Conv(features, (kernel, kernel), strides=strides, padding='SAME',
                 use_bias=norm == 'none', dtype=dtype, kernel_init=he_normal)


def make_norm(norm, train, dtype):
  return NORMS.get(norm).fn(train, dtype)


class _Base(nn.Module):
  num_classes: int
  depth: int
  width: int
  activation: str = 'relu'
  norm: str = 'batch'
  dtype: Any = jnp.float32

  def act(self, x):
    return ACTIVATIONS.get(self.activation).fn(x)

  def make_norm(self, train):
    return make_norm(self.norm, train, self.dtype)

  def dense(self, features):
    return nn.Dense(features, dtype=self.dtype, kernel_init=he_normal)

  def conv(self, features, kernel=3, strides=1):
    return conv(features, self.dtype, self.norm, kernel, strides)

  def block(self, features, strides, shortcut, train):
    return BasicBlock(features, strides, self.activation, self.norm, self.dtype, shortcut, train)

  def classifier(self, x):
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


@MODELS.register('mlp', depth=2, width=256)
class MLP(_Base):
  """`depth` hidden layers of `width` units: dense -> norm -> activation."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1)).astype(self.dtype)
    for _ in range(self.depth):
      x = self.act(self.make_norm(train)(self.dense(self.width)(x)))
    return self.classifier(x)


@MODELS.register('cnn', depth=3, width=32)
class CNN(_Base):
  """Plain CNN: `depth` 3x3 convs (width doubling, 2x2 max-pool after all but
  the last), then a dense hidden layer of 8*width units and the classifier."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype)
    for i in range(self.depth):
      x = self.act(self.make_norm(train)(self.conv(self.width * 2 ** i)(x)))
      if i < self.depth - 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='SAME')
    x = x.reshape((x.shape[0], -1))
    x = self.act(self.dense(8 * self.width)(x))
    return self.classifier(x)


class BasicBlock(nn.Module):
  """Two 3x3 convs with a shortcut: 'pad' (option A: subsample + zero channels,
  parameter-free, as in the CIFAR ResNets) or 'conv' (1x1 projection + norm)."""
  features: int
  strides: int
  activation: str
  norm: str
  dtype: Any
  shortcut: str = 'pad'
  train: bool = False

  @nn.compact
  def __call__(self, x):
    act = ACTIVATIONS.get(self.activation).fn
    norm = lambda: make_norm(self.norm, self.train, self.dtype)
    y = act(norm()(conv(self.features, self.dtype, self.norm, strides=self.strides)(x)))
    y = norm()(conv(self.features, self.dtype, self.norm)(y))
    if self.strides != 1 or x.shape[-1] != self.features:
      if self.shortcut == 'pad':
        x = x[:, ::self.strides, ::self.strides, :]
        extra = self.features - x.shape[-1]
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
      else:
        x = norm()(conv(self.features, self.dtype, self.norm, kernel=1, strides=self.strides)(x))
    return act(x + y)


class ResNetCifar(_Base):
  """CIFAR ResNet (He et al. 2016, sec. 4.2): 3 stages of (depth-2)/6 basic
  blocks with width, 2*width, 4*width channels; ResNet-20 has 0.27M params."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    if (self.depth - 2) % 6:
      raise ValueError(f'CIFAR ResNet depth must be 6n+2, got {self.depth}')
    n = (self.depth - 2) // 6
    x = self.act(self.make_norm(train)(self.conv(self.width)(x.astype(self.dtype))))
    for stage in range(3):
      for b in range(n):
        strides = 2 if stage > 0 and b == 0 else 1
        x = self.block(self.width * 2 ** stage, strides, 'pad', train)(x)
    return self.classifier(jnp.mean(x, axis=(1, 2)))


class ResNet(_Base):
  """ImageNet-style ResNet-18/34 (basic blocks, projection shortcuts). Inputs of
  64 pixels or less get a 3x3 stride-1 stem without max-pool (the CIFAR habit)."""
  stages: tuple = (2, 2, 2, 2)

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype)
    if x.shape[1] > 64:
      x = self.act(self.make_norm(train)(self.conv(self.width, kernel=7, strides=2)(x)))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    else:
      x = self.act(self.make_norm(train)(self.conv(self.width)(x)))
    for stage, blocks in enumerate(self.stages):
      for b in range(blocks):
        strides = 2 if stage > 0 and b == 0 else 1
        x = self.block(self.width * 2 ** stage, strides, 'conv', train)(x)
    return self.classifier(jnp.mean(x, axis=(1, 2)))


MODELS.add('resnet_cifar', ResNetCifar, depth=20, width=16)
for _d in (20, 32, 44, 56, 110):
  MODELS.add(f'resnet{_d}', ResNetCifar, depth=_d, width=16, fixed_depth=_d)
MODELS.add('resnet18', functools.partial(ResNet, stages=(2, 2, 2, 2)),
           depth=18, width=64, fixed_depth=18)
MODELS.add('resnet34', functools.partial(ResNet, stages=(3, 4, 6, 3)),
           depth=34, width=64, fixed_depth=34)


def build(model_config, num_classes: int) -> nn.Module:
  entry = MODELS.get(model_config.name)
  dtype = jnp.bfloat16 if model_config.dtype == 'bfloat16' else jnp.float32
  return entry.fn(num_classes=num_classes, depth=model_config.depth, width=model_config.width,
                  activation=model_config.activation, norm=model_config.norm, dtype=dtype)
