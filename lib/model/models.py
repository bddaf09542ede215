"""The classifiers (MLP, CNN, VGG, the ResNet family, ResNeXt, WRN, MobileNet, airbench),
their MODELS registry, `build` and `activations`; their building blocks are in
layers.py. Every model is `Module(num_classes, depth, width, activation, norm,
dtype, opts)` and is called as

    model.apply(variables, images, train=..., hp=..., rngs=..., mutable=...)

With train=False it is a plain, deterministic forward pass. Computation runs in
`dtype` (float32 or bfloat16); parameters stay float32; logits come out float32
(float64 when `dtype` is float64, for gradient checks).
"""
import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from lib.core.registry import Registry
from lib.model import inits, whitening
from lib.model.layers import (  # noqa: F401 - models.Options, models.NORMS ... stay public here
    ACTIVATIONS, DROPOUT_SITES, NORMS, BasicBlock, Block, Bottleneck, Layers, Maxout, Options,
    PreActBlock)

MODELS = Registry('model', 'model.name')


STEMS = ('auto', 'imagenet', 'cifar')   # model.stem, for the models that use `Model.stem`


class Model(Layers):
  num_classes: int = 10
  depth: int = 0
  width: int = 0
  stem_type: str = 'auto'   # model.stem
  num_coarse: int = 0       # >0: the coarse-class head of regularize.aux_coarse

  def classifier(self, x, train, hp):
    """The logits of the classes. With multitask heads on, the same features also
    feed `rotation_head` (4 rotations) and `coarse_head` (the coarse classes), whose
    logits are sown into the 'aux' collection for the train step (lib/training/steps.py)
    and never change the logits returned."""
    out = jnp.promote_types(self.dtype, jnp.float32)   # f32 (f64 grad checks)
    features = x
    x = self.dropout(x, train, hp, 'head')
    logits = self.dense(self.num_classes, last=True)(x)
    if self.opts.aux_rotation:
      self.sow('aux', 'rotation', self.dense(4, last=True, name='rotation_head')(features)
               .astype(out))
    if self.num_coarse:
      self.sow('aux', 'coarse', self.dense(self.num_coarse, last=True, name='coarse_head')(
          features).astype(out))
    return logits.astype(out)

  def block_kwargs(self):
    return dict(activation=self.activation, norm=self.norm, dtype=self.dtype, opts=self.opts)

  def stem(self, x, train, hp, width, preact=False):
    """model.stem=auto: 3x3 stride-1 conv for inputs of 64 pixels or less (the CIFAR
    habit), else 7x7 stride-2 conv + 3x3 stride-2 max-pool (ImageNet); `imagenet` or
    `cifar` use that one at any size (a 64-px ImageNet recipe keeps its stem)."""
    x = x.astype(self.dtype)
    if self.stem_type == 'imagenet' or (self.stem_type == 'auto' and x.shape[1] > 64):
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


@MODELS.register('cnn', depth=3, width=32, pooling=True)
class CNN(Model):
  """Plain CNN: `depth` 3x3 convs (width doubling, 2x2 max-pool after all but
  the last; model.pool), then a dense hidden layer of 8*width units and the classifier."""

  @nn.compact
  def __call__(self, x, train: bool = False, hp: Optional[dict] = None):
    x = x.astype(self.dtype)
    for i in range(self.depth):
      x = self.act(self.make_norm(train)(self.conv(self.width * 2 ** i)(x)), train, hp)
      x = self.dropout(x, train, hp, 'conv')
      if i < self.depth - 1:
        x = self.pool(x, i)
    x = x.reshape((x.shape[0], -1))
    x = self.act(self.dense(8 * self.width)(x), train, hp)
    return self.classifier(x, train, hp)


VGG_LAYERS = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}


class VGG(Model):
  """VGG (Simonyan & Zisserman 2015): five stages of 3x3 convs (width, 2w, 4w,
  8w, 8w channels) each closed by a 2x2 max-pool (model.pool), then two hidden FC layers of
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
      x = self.pool(x, stage)
    x = x.reshape((x.shape[0], -1))
    for i in range(2):
      if i > 0:
        x = self.dropout(x, train, hp, 'hidden')
      x = self.act(self.dense(64 * self.width)(x), train, hp)
    return self.classifier(x, train, hp)


@MODELS.register('airbench', depth=3, width=64, fixed_depth=3, whitening=True)
class Airbench(Model):
  """airbench94's net (Jordan 2024): a 2x2 conv without padding of 2 * 2*2*C channels (24 for
  RGB; the whitening layer, lib/model/whitening.py: model.whiten_init=patch sets and
  freezes its kernel) and the activation; 3 blocks of [3x3 conv -> 2x2 max-pool (VALID,
  as torch's) -> norm -> act -> 3x3 conv -> norm -> act] of width, 4*width, 4*width
  channels (64/256/256 at the default width 64); a global max-pool; the classifier, its
  logits times `logit_scale` (1/9). The norms have no learned scale (airbench's BatchNorm
  weight is frozen at 1), only an offset. 32x32 inputs end at 3x3 before the global
  max-pool; inputs need at least 16 pixels a side."""
  logit_scale: float = 1 / 9

  @nn.compact
  def __call__(self, x, train: bool = False, hp: Optional[dict] = None):
    x = x.astype(self.dtype)
    size = whitening.SIZE
    x = nn.Conv(2 * size * size * x.shape[-1], (size, size), padding='VALID', use_bias=True,
                dtype=self.dtype, kernel_init=inits.kernel_init(self.opts),
                bias_init=inits.bias_init(self.opts), name=whitening.LAYER)(x)
    x = self.act(x, train, hp)
    for width in (self.width, 4 * self.width, 4 * self.width):
      x = nn.max_pool(self.conv(width)(x), (2, 2), strides=(2, 2), padding='VALID')
      x = self.act(self.make_norm(train, scale=False)(x), train, hp)
      x = self.act(self.make_norm(train, scale=False)(self.conv(width)(x)), train, hp)
      x = self.dropout(x, train, hp, 'conv')
    return self.classifier(jnp.max(x, axis=(1, 2)), train, hp) * self.logit_scale


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
  MODELS.add(f'vgg{_d}', VGG, depth=_d, width=64, fixed_depth=_d, pooling=True)
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


def build(model_config, num_classes: int, regularize=None, dtype=None,
          num_coarse: int = 0) -> nn.Module:
  """The model of `model_config`; `regularize` (config.regularize) puts the
  train-time regularizers it turns on into the program (None: none). `dtype`
  overrides model.dtype (float64 for gradient checks); `num_coarse` > 0 adds the
  coarse-class head (regularize.aux_coarse)."""
  entry = MODELS.get(model_config.name)
  if dtype is None:
    dtype = jnp.bfloat16 if model_config.dtype == 'bfloat16' else jnp.float32
  return entry.fn(num_classes=num_classes, depth=model_config.depth, width=model_config.width,
                  activation=model_config.activation, norm=model_config.norm, dtype=dtype,
                  stem_type=model_config.stem, opts=Options.from_config(model_config, regularize),
                  num_coarse=num_coarse)


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
