"""Flax Linen classifiers, used as pure functions through init / apply.

Every model is `Module(num_classes, depth, width, activation, norm, dtype, opts)`
and is called as

    model.apply(variables, images, train=..., hp=..., rngs=..., mutable=...)

`opts` (an `Options`) holds what is fixed at trace time: the initializer and
which train-time regularizers are in the program and where. `hp` holds their
strengths as arrays (dropout rate, hidden-noise std, stochastic-depth p_L), so
one compiled program serves every value. With train=False every regularizer is
the identity and BatchNorm uses its running averages: evaluation is a plain,
deterministic forward pass.

Random streams: 'dropout' (dropout masks), 'noise' (hidden-unit noise),
'drop_path' (stochastic depth). With regularize.activation_l1 on, each hidden
activation sows sum|h| / batch into the 'losses' collection.

Computation runs in `dtype` (float32 or bfloat16); parameters stay float32;
logits come out float32 (float64 when `dtype` is float64, for gradient checks).
Each activation's output is sown into the 'activations' collection, which is
kept only where a caller makes it mutable (`activations()` below).
"""
import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lib.core import factors
from lib.core.registry import Registry
from lib.model import inits

MODELS = Registry('model', 'model.name')
ACTIVATIONS = Registry('activation', 'model.activation')
NORMS = Registry('normalization', 'model.norm')
DROPOUT_SITES = {'head': ('head',), 'hidden': ('head', 'hidden'), 'conv': ('conv',),
                 'all': ('head', 'hidden', 'conv')}
assert set(DROPOUT_SITES) == set(factors.FACTORS['regularize.dropout_at'].choices)

for _name, _fn in [('relu', nn.relu), ('leaky_relu', nn.leaky_relu), ('elu', nn.elu),
                   ('gelu', nn.gelu), ('tanh', jnp.tanh), ('sigmoid', nn.sigmoid)]:
  ACTIVATIONS.add(_name, _fn)


@dataclasses.dataclass(frozen=True)
class Options:
  """Trace-time model options (hashable). Strengths come at call time in `hp`."""
  init: str = 'kaiming_normal'
  init_scale: float = 0.01
  init_fan: str = 'fan_in'
  init_gain: str = 'auto'
  bias_init: float = 0.0
  activation: str = 'relu'
  zero_init_residual: bool = False
  dropout_at: str = 'head'
  dropout: bool = False            # which regularizers are in the program
  noise_hidden: bool = False
  activation_l1: bool = False
  stochastic_depth: bool = False

  @classmethod
  def from_config(cls, model_config, regularize=None):
    m = model_config
    kw = dict(init=m.init, init_scale=float(m.init_scale), init_fan=m.init_fan,
              init_gain=m.init_gain, bias_init=float(m.bias_init), activation=m.activation,
              zero_init_residual=bool(m.zero_init_residual))
    if regularize is not None:
      r = regularize
      on = lambda field: factors.is_on(f'regularize.{field}', r[field])
      kw.update(dropout_at=r.dropout_at, dropout=on('dropout'), noise_hidden=on('noise_hidden'),
                activation_l1=on('activation_l1'), stochastic_depth=on('survival_last'))
    return cls(**kw)


class Maxout(nn.Module):
  """Maxout unit (Goodfellow et al. 2013): max over `pieces` learned affine maps
  of its input, one per output channel; shape-preserving (a 1x1 layer of its own)."""
  pieces: int = 2
  dtype: Any = jnp.float32
  opts: Options = Options()

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    z = nn.Dense(c * self.pieces, dtype=self.dtype, kernel_init=inits.kernel_init(self.opts),
                 bias_init=inits.bias_init(self.opts))(x)
    return jnp.max(z.reshape(x.shape[:-1] + (c, self.pieces)), axis=-1)


ACTIVATIONS.add('maxout', None)   # built by Layers.act (it has parameters)


def _batch_norm(train, dtype, scale_init):
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                      scale_init=scale_init)


class _LayerNorm(nn.Module):
  """Layer norm of Ba et al. (2016) as Wu & He (2018) compare it for CNNs: each
  example over all its non-batch axes (H, W, C of a feature map, the features of
  a dense layer), with a per-channel scale and offset (= GroupNorm, one group)."""
  dtype: Any = jnp.float32
  scale_init: Any = nn.initializers.ones

  @nn.compact
  def __call__(self, x):
    return nn.LayerNorm(reduction_axes=tuple(range(1, x.ndim)), feature_axes=-1,
                        dtype=self.dtype, scale_init=self.scale_init)(x)


NORMS.add('none', lambda train, dtype, scale_init: (lambda x: x), doc='identity')
NORMS.add('batch', _batch_norm, doc='each channel over the batch and positions')
NORMS.add('layer', lambda train, dtype, scale_init: _LayerNorm(dtype=dtype,
                                                                scale_init=scale_init),
          doc='each example over all its positions and channels (H, W, C)')
# What ConvNeXt calls LayerNorm (Flax's nn.LayerNorm on NHWC). On an MLP it would be
# `layer` under another name, so resolve refuses it there (needs_spatial).
NORMS.add('layer_channels', lambda train, dtype, scale_init: nn.LayerNorm(
    dtype=dtype, scale_init=scale_init), needs_spatial=True,
    doc='each image position over its channels')
# Group count adapts to the width (8 groups where the width allows it).
NORMS.add('group', lambda train, dtype, scale_init: _GroupNorm(dtype=dtype, scale_init=scale_init),
          doc='each example over positions and groups of channels')
NORMS.add('instance', lambda train, dtype, scale_init: nn.GroupNorm(
    num_groups=None, group_size=1, dtype=dtype, scale_init=scale_init),
    needs_spatial=True, doc='each channel of each image over its positions')


class _GroupNorm(nn.Module):
  dtype: Any = jnp.float32
  scale_init: Any = nn.initializers.ones

  @nn.compact
  def __call__(self, x):
    return nn.GroupNorm(num_groups=math.gcd(8, x.shape[-1]), dtype=self.dtype,
                        scale_init=self.scale_init)(x)


class Layers(nn.Module):
  """Shared building blocks: init-aware conv/dense, norm, activation (with the
  hidden-unit regularizers) and dropout sites. Every field has a default so
  subclasses can add their own."""
  activation: str = 'relu'
  norm: str = 'batch'
  dtype: Any = jnp.float32
  opts: Options = Options()

  def dense(self, features, last=False):
    return nn.Dense(features, dtype=self.dtype, kernel_init=inits.kernel_init(self.opts, last),
                    bias_init=inits.bias_init(self.opts))

  def conv(self, features, kernel=3, strides=1, groups=1, zero=False, bias=None):
    # No bias when a normalization layer follows: its offset plays that role.
    use_bias = self.norm == 'none' if bias is None else bias
    return nn.Conv(features, (kernel, kernel), strides=strides, padding='SAME',
                   feature_group_count=groups, use_bias=use_bias, dtype=self.dtype,
                   kernel_init=nn.initializers.zeros if zero else inits.kernel_init(self.opts),
                   bias_init=inits.bias_init(self.opts))

  def make_norm(self, train, zero=False):
    scale_init = nn.initializers.zeros if zero else nn.initializers.ones
    return NORMS.get(self.norm).fn(train, self.dtype, scale_init)

  def act(self, x, train, hp):
    """Activation, then (at train time) activation-L1 bookkeeping and hidden noise."""
    if self.activation == 'maxout':
      x = Maxout(dtype=self.dtype, opts=self.opts)(x)
    else:
      x = ACTIVATIONS.get(self.activation).fn(x)
    # Kept only when 'activations' is mutable (diagnostics, TensorBoard histograms).
    self.sow('activations', 'out', x)
    if train and self.opts.activation_l1:
      self.sow('losses', 'activation_l1', jnp.sum(jnp.abs(x.astype(jnp.float32))) / x.shape[0])
    if train and self.opts.noise_hidden:
      noise = jax.random.normal(self.make_rng('noise'), x.shape, jnp.float32)
      x = x + (hp['noise_hidden'] * noise).astype(x.dtype)
    return x

  def dropout(self, x, train, hp, site: str):
    """Inverted dropout at `site` (head | hidden | conv) if regularize.dropout_at
    includes it: zero with probability p, scale survivors by 1/(1-p)."""
    if not (train and self.opts.dropout and site in DROPOUT_SITES[self.opts.dropout_at]):
      return x
    rate = hp['dropout']
    keep = jax.random.bernoulli(self.make_rng('dropout'), 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate).astype(x.dtype), jnp.zeros_like(x))

  def drop_path(self, branch, train, hp, depth_fraction: float):
    """Stochastic depth (Huang et al. 2016): drop this residual branch per example
    with probability depth_fraction * (1 - p_L), survivors scaled by 1/survival
    (so evaluation uses every block unscaled)."""
    if not (train and self.opts.stochastic_depth):
      return branch
    survival = 1.0 - depth_fraction * (1.0 - hp['survival_last'])
    keep = jax.random.bernoulli(self.make_rng('drop_path'), survival,
                                (branch.shape[0],) + (1,) * (branch.ndim - 1))
    self.sow('intermediates', 'survived', keep.reshape(-1))
    return jnp.where(keep, branch / survival.astype(branch.dtype), jnp.zeros_like(branch))


class Model(Layers):
  num_classes: int = 10
  depth: int = 0
  width: int = 0

  def classifier(self, x, train, hp):
    x = self.dropout(x, train, hp, 'head')
    logits = self.dense(self.num_classes, last=True)(x)
    return logits.astype(jnp.promote_types(self.dtype, jnp.float32))   # f32 (f64 grad checks)

  def block_kwargs(self):
    return dict(activation=self.activation, norm=self.norm, dtype=self.dtype, opts=self.opts)

  def stem(self, x, train, hp, width, preact=False):
    """3x3 stride-1 conv for inputs of 64 pixels or less (the CIFAR habit), else
    7x7 stride-2 conv + 3x3 max-pool (ImageNet)."""
    x = x.astype(self.dtype)
    if x.shape[1] > 64:
      x = self.conv(width, kernel=7, strides=2)(x)
      x = nn.max_pool(self.act(self.make_norm(train)(x), train, hp), (3, 3), strides=(2, 2),
                      padding='SAME')
    else:
      x = self.conv(width)(x)
      if not preact:   # pre-activation nets normalize at the start of each block
        x = self.act(self.make_norm(train)(x), train, hp)
    return x

  def residual_stages(self, x, train, hp, block, stage_blocks: Sequence[int], widths,
                      **block_kw):
    """Stages of residual blocks; the first block of each stage after the first
    has stride 2. Block l of L (1-based, over the whole net) gets depth fraction
    l / L for stochastic depth."""
    total, l = sum(stage_blocks), 0
    for stage, blocks in enumerate(stage_blocks):
      for b in range(blocks):
        l += 1
        strides = 2 if stage > 0 and b == 0 else 1
        x = block(features=widths[stage], strides=strides, depth_fraction=l / total,
                  **block_kw, **self.block_kwargs())(x, train, hp)
    return x

  def head(self, x, train, hp, preact=False):
    if preact:   # the last block's output is not yet normalized
      x = self.act(self.make_norm(train)(x), train, hp)
    return self.classifier(jnp.mean(x, axis=(1, 2)), train, hp)


# ----------------------------------------------------------------------------- plain nets
@MODELS.register('mlp', depth=2, width=256)
class MLP(Model):
  """`depth` hidden layers of `width` units: dense -> norm -> activation."""

  @nn.compact
  def __call__(self, x, train: bool = False, hp: Optional[dict] = None):
    x = x.reshape((x.shape[0], -1)).astype(self.dtype)
    for i in range(self.depth):
      if i > 0:
        x = self.dropout(x, train, hp, 'hidden')
      x = self.act(self.make_norm(train)(self.dense(self.width)(x)), train, hp)
    return self.classifier(x, train, hp)


@MODELS.register('cnn', depth=3, width=32)
class CNN(Model):
  """Plain CNN: `depth` 3x3 convs (width doubling, 2x2 max-pool after all but
  the last), then a dense hidden layer of 8*width units and the classifier."""

  @nn.compact
  def __call__(self, x, train: bool = False, hp: Optional[dict] = None):
    x = x.astype(self.dtype)
    for i in range(self.depth):
      x = self.act(self.make_norm(train)(self.conv(self.width * 2 ** i)(x)), train, hp)
      x = self.dropout(x, train, hp, 'conv')
      if i < self.depth - 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='SAME')
    x = x.reshape((x.shape[0], -1))
    x = self.act(self.dense(8 * self.width)(x), train, hp)
    return self.classifier(x, train, hp)


VGG_LAYERS = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}


class VGG(Model):
  """VGG (Simonyan & Zisserman 2015): five stages of 3x3 convs (width, 2w, 4w,
  8w, 8w channels) each closed by a 2x2 max-pool, then two hidden FC layers of
  64*width units (4096 at the default width 64) and the classifier. The hidden
  FC layers are the classic place for dropout 0.5 (regularize.dropout_at=hidden)."""

  @nn.compact
  def __call__(self, x, train: bool = False, hp: Optional[dict] = None):
    x = x.astype(self.dtype)
    for stage, convs in enumerate(VGG_LAYERS[self.depth]):
      for _ in range(convs):
        x = self.act(self.make_norm(train)(self.conv(self.width * 2 ** min(stage, 3))(x)),
                     train, hp)
        x = self.dropout(x, train, hp, 'conv')
      x = nn.max_pool(x, (2, 2), strides=(2, 2), padding='SAME')
    x = x.reshape((x.shape[0], -1))
    for i in range(2):
      if i > 0:
        x = self.dropout(x, train, hp, 'hidden')
      x = self.act(self.dense(64 * self.width)(x), train, hp)
    return self.classifier(x, train, hp)


# ----------------------------------------------------------------------------- residual blocks
class Block(Layers):
  features: int = 0
  strides: int = 1
  depth_fraction: float = 1.0
  shortcut: str = 'conv'   # 'pad' (option A: subsample + zero channels) | 'conv' (1x1 projection)

  def project(self, x, train, out_features, norm=True):
    if self.strides == 1 and x.shape[-1] == out_features:
      return x
    if self.shortcut == 'pad':
      x = x[:, ::self.strides, ::self.strides, :]
      extra = out_features - x.shape[-1]
      return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    x = self.conv(out_features, kernel=1, strides=self.strides, bias=None if norm else False)(x)
    return self.make_norm(train)(x) if norm else x

  def last_norm(self, train):
    """The branch's last normalization; zero scale under model.zero_init_residual."""
    return self.make_norm(train, zero=self.opts.zero_init_residual)

  def last_conv(self, features, **kw):
    # With no normalization to zero, zero the branch's last conv instead.
    zero = self.opts.zero_init_residual and self.norm == 'none'
    return self.conv(features, zero=zero, **kw)


class BasicBlock(Block):
  """conv3x3 -> norm -> act -> [dropout] -> conv3x3 -> norm, plus the shortcut, then act."""

  @nn.compact
  def __call__(self, x, train, hp):
    y = self.act(self.make_norm(train)(self.conv(self.features, strides=self.strides)(x)),
                 train, hp)
    y = self.dropout(y, train, hp, 'conv')
    y = self.last_norm(train)(self.last_conv(self.features)(y))
    y = self.drop_path(y, train, hp, self.depth_fraction)
    return self.act(self.project(x, train, self.features) + y, train, hp)


class Bottleneck(Block):
  """1x1 (width) -> 3x3 (width, stride, `groups` groups) -> 1x1 (out_features),
  each followed by norm (act after the first two), plus the shortcut, then act.
  ResNet-50: groups 1, out = 4*width; ResNeXt: groups = cardinality."""
  groups: int = 1
  out_features: int = 0

  @nn.compact
  def __call__(self, x, train, hp):
    y = self.act(self.make_norm(train)(self.conv(self.features, kernel=1)(x)), train, hp)
    y = self.act(self.make_norm(train)(self.conv(self.features, strides=self.strides,
                                                 groups=self.groups)(y)), train, hp)
    y = self.dropout(y, train, hp, 'conv')
    y = self.last_norm(train)(self.last_conv(self.out_features, kernel=1)(y))
    y = self.drop_path(y, train, hp, self.depth_fraction)
    return self.act(self.project(x, train, self.out_features) + y, train, hp)


class PreActBlock(Block):
  """Pre-activation block (He et al. 2016b; also Wide ResNet): norm -> act ->
  conv3x3 -> norm -> act -> [dropout] -> conv3x3, plus the shortcut; no act after
  the sum. A projection shortcut reads the pre-activated input."""

  @nn.compact
  def __call__(self, x, train, hp):
    pre = self.act(self.make_norm(train)(x), train, hp)
    needs_projection = self.strides != 1 or x.shape[-1] != self.features
    shortcut = self.project(pre if self.shortcut == 'conv' else x, train, self.features,
                            norm=False) if needs_projection else x
    y = self.conv(self.features, strides=self.strides)(pre)
    y = self.dropout(self.act(self.make_norm(train)(y), train, hp), train, hp, 'conv')
    # No norm closes a pre-activation branch: zero-init residual zeroes its last conv.
    y = self.conv(self.features, zero=self.opts.zero_init_residual)(y)
    y = self.drop_path(y, train, hp, self.depth_fraction)
    return shortcut + y


# ----------------------------------------------------------------------------- residual nets
class ResNetCifar(Model):
  """CIFAR ResNet (He et al. 2016, sec. 4.2): 3 stages of (depth-2)/6 basic
  blocks with width, 2*width, 4*width channels and option-A shortcuts;
  ResNet-20 has 0.27M params, ResNet-110 1.7M. preact=True: pre-activation blocks."""
  preact: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False, hp: Optional[dict] = None):
    if (self.depth - 2) % 6:
      raise ValueError(f'CIFAR ResNet depth must be 6n+2, got {self.depth}')
    n = (self.depth - 2) // 6
    x = self.stem(x, train, hp, self.width, preact=self.preact)
    block = PreActBlock if self.preact else BasicBlock
    x = self.residual_stages(x, train, hp, block, (n, n, n),
                             [self.width * 2 ** s for s in range(3)], shortcut='pad')
    return self.head(x, train, hp, preact=self.preact)


class ResNet(Model):
  """ImageNet-style ResNet-18/34 with basic blocks and projection shortcuts
  (11.2M / 21.3M params for 1000 classes); preact=True: pre-activation blocks."""
  stages: tuple = (2, 2, 2, 2)
  preact: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False, hp: Optional[dict] = None):
    x = self.stem(x, train, hp, self.width, preact=self.preact)
    widths = [self.width * 2 ** s for s in range(len(self.stages))]
    x = self.residual_stages(x, train, hp, PreActBlock if self.preact else BasicBlock,
                             self.stages, widths, shortcut='conv')
    return self.head(x, train, hp, preact=self.preact)


class ResNetBottleneck(Model):
  """Bottleneck ResNet-50/101/152 (4x expansion, stride on the 3x3 as in
  torchvision's v1.5); ResNet-50 has 25.6M params for 1000 classes."""
  stages: tuple = (3, 4, 6, 3)

  @nn.compact
  def __call__(self, x, train: bool = False, hp: Optional[dict] = None):
    x = self.stem(x, train, hp, self.width)
    total, l = sum(self.stages), 0
    for stage, blocks in enumerate(self.stages):
      for b in range(blocks):
        l += 1
        w = self.width * 2 ** stage
        x = Bottleneck(features=w, out_features=4 * w, strides=2 if stage > 0 and b == 0 else 1,
                       depth_fraction=l / total, shortcut='conv',
                       **self.block_kwargs())(x, train, hp)
    return self.head(x, train, hp)


class ResNeXtCifar(Model):
  """ResNeXt for CIFAR (Xie et al. 2017, sec. 5.3): a 3x3 stem of 64 channels,
  3 stages of (depth-2)/9 bottleneck blocks whose 3x3 conv has `cardinality`
  groups of width*2^stage channels each (the "C x d" of ResNeXt-29 8x64d, 34.4M
  params), block outputs 256, 512, 1024."""
  cardinality: int = 8

  @nn.compact
  def __call__(self, x, train: bool = False, hp: Optional[dict] = None):
    if (self.depth - 2) % 9:
      raise ValueError(f'ResNeXt depth must be 9n+2, got {self.depth}')
    n = (self.depth - 2) // 9
    x = self.stem(x, train, hp, 64)
    total, l = 3 * n, 0
    for stage in range(3):
      for b in range(n):
        l += 1
        x = Bottleneck(features=self.cardinality * self.width * 2 ** stage,
                       groups=self.cardinality, out_features=256 * 2 ** stage,
                       strides=2 if stage > 0 and b == 0 else 1, depth_fraction=l / total,
                       shortcut='conv', **self.block_kwargs())(x, train, hp)
    return self.head(x, train, hp)


class WideResNet(Model):
  """Wide ResNet WRN-d-k (Zagoruyko & Komodakis 2016): pre-activation blocks,
  3 stages of (d-4)/6 blocks with 16k, 32k, 64k channels (k = model.width), 1x1
  projection shortcuts; dropout between the two convs of a block is
  regularize.dropout_at=conv. WRN-28-10 has 36.5M params."""

  @nn.compact
  def __call__(self, x, train: bool = False, hp: Optional[dict] = None):
    if (self.depth - 4) % 6:
      raise ValueError(f'Wide ResNet depth must be 6n+4, got {self.depth}')
    n = (self.depth - 4) // 6
    x = self.stem(x, train, hp, 16, preact=True)
    x = self.residual_stages(x, train, hp, PreActBlock, (n, n, n),
                             [16 * self.width * 2 ** s for s in range(3)], shortcut='conv')
    return self.head(x, train, hp, preact=True)


MOBILENET_LAYERS = ((2, 1), (4, 2), (4, 1), (8, 2), (8, 1), (16, 2)) + ((16, 1),) * 5 + (
    (32, 2), (32, 1))


class MobileNet(Model):
  """MobileNet v1 (Howard et al. 2017): a 3x3 conv of `width` channels then 13
  depthwise-separable blocks (3x3 depthwise conv -> norm -> act -> 1x1 conv ->
  norm -> act); width 32 is multiplier 1.0 (4.2M params for 1000 classes).
  Inputs of 64 pixels or less use stride 1 in the stem and the first stride-2
  block (a CIFAR adaptation), so 32x32 images end at 2x2."""

  @nn.compact
  def __call__(self, x, train: bool = False, hp: Optional[dict] = None):
    small = x.shape[1] <= 64
    x = x.astype(self.dtype)
    x = self.act(self.make_norm(train)(self.conv(self.width, strides=1 if small else 2)(x)),
                 train, hp)
    first_stride = True
    for mult, strides in MOBILENET_LAYERS:
      if small and strides == 2 and first_stride:
        strides, first_stride = 1, False
      c = x.shape[-1]
      x = self.act(self.make_norm(train)(self.conv(c, strides=strides, groups=c)(x)), train, hp)
      x = self.act(self.make_norm(train)(self.conv(self.width * mult, kernel=1)(x)), train, hp)
      x = self.dropout(x, train, hp, 'conv')
    return self.head(x, train, hp)


for _d, _layers in VGG_LAYERS.items():
  MODELS.add(f'vgg{_d}', VGG, depth=_d, width=64, fixed_depth=_d)
MODELS.add('resnet_cifar', ResNetCifar, depth=20, width=16, residual=True)
for _d in (20, 32, 44, 56, 110):
  MODELS.add(f'resnet{_d}', ResNetCifar, depth=_d, width=16, fixed_depth=_d, residual=True)
MODELS.add('preact_resnet_cifar', functools.partial(ResNetCifar, preact=True),
           depth=20, width=16, residual=True)
for _d, _stages in ((18, (2, 2, 2, 2)), (34, (3, 4, 6, 3))):
  MODELS.add(f'resnet{_d}', functools.partial(ResNet, stages=_stages),
             depth=_d, width=64, fixed_depth=_d, residual=True)
MODELS.add('preact_resnet18', functools.partial(ResNet, stages=(2, 2, 2, 2), preact=True),
           depth=18, width=64, fixed_depth=18, residual=True)
for _d, _stages in ((50, (3, 4, 6, 3)), (101, (3, 4, 23, 3)), (152, (3, 8, 36, 3))):
  MODELS.add(f'resnet{_d}', functools.partial(ResNetBottleneck, stages=_stages),
             depth=_d, width=64, fixed_depth=_d, residual=True)
MODELS.add('resnext_cifar', ResNeXtCifar, depth=29, width=64, residual=True)
for _c, _w in ((8, 64), (16, 64)):
  MODELS.add(f'resnext29_{_c}x{_w}d', functools.partial(ResNeXtCifar, cardinality=_c),
             depth=29, width=_w, fixed_depth=29, residual=True)
MODELS.add('wide_resnet', WideResNet, depth=28, width=10, residual=True)
MODELS.add('mobilenet', MobileNet, depth=28, width=32, fixed_depth=28)


def build(model_config, num_classes: int, regularize=None, dtype=None) -> nn.Module:
  """The model of `model_config`; `regularize` (config.regularize) puts the
  train-time regularizers it turns on into the program (None: none). `dtype`
  overrides model.dtype (float64 for gradient checks)."""
  entry = MODELS.get(model_config.name)
  if dtype is None:
    dtype = jnp.bfloat16 if model_config.dtype == 'bfloat16' else jnp.float32
  return entry.fn(num_classes=num_classes, depth=model_config.depth, width=model_config.width,
                  activation=model_config.activation, norm=model_config.norm, dtype=dtype,
                  opts=Options.from_config(model_config, regularize))


def activations(model, variables, images, hp=None, train=True):
  """[(name, output)] of every activation layer for one batch, grouped by module in
  the order the modules are first used ('act0': the first activation of the top
  module, 'BasicBlock_3/act1': the second one inside that block).

  With train=True normalization uses the batch's statistics (as at a training step)
  and no train-time randomness is drawn unless the model's options turn it on.
  """
  _, state = model.apply(variables, images, train=train, hp=hp,
                         mutable=['activations', 'batch_stats'])
  out = []

  def walk(tree, path):
    for key, value in tree.items():   # insertion order is call order
      if isinstance(value, dict):
        walk(value, path + (key,))
      else:
        for i, x in enumerate(value):
          out.append(('/'.join(path + (f'act{i}',)), x))
  walk(state.get('activations', {}), ())
  return out
