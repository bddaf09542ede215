"""The building blocks of the classifiers in models.py: trace-time `Options`,
the activation and normalization registries, dropout sites, and `Layers` (an
init-aware conv / dense, norm, activation with the hidden-unit regularizers,
dropout, stochastic depth) with the residual blocks built from it.

`opts` (an `Options`) holds what is fixed at trace time: the initializer and
which train-time regularizers are in the program and where. `hp` holds their
strengths as arrays (dropout rate, hidden-noise std, stochastic-depth p_L), so
one compiled program serves every value. With train=False every regularizer is
the identity and BatchNorm uses its running averages.

Random streams: 'dropout' (dropout masks), 'noise' (hidden-unit noise),
'drop_path' (stochastic depth), 'fmp' (fractional max-pooling regions; without it
a fixed draw). With regularize.activation_l1 on, each hidden
activation sows sum|h| / batch into the 'losses' collection. Each activation's
output is sown into the 'activations' collection, kept only where a caller
makes it mutable (models.activations).
"""
import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from lib.core import factors
from lib.core.registry import Registry
from lib.model import fmp, inits

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
  pool: str = 'max'                # model.pool: the CNN's and VGG's downsampling
  fmp_ratio: float = math.sqrt(2)  # model.fmp_ratio, model.fmp_overlap (pool=fractional)
  fmp_overlap: bool = False
  aux_rotation: bool = False       # regularize.aux_rotation: the rotation head (multitask)

  @classmethod
  def from_config(cls, model_config, regularize=None):
    m = model_config
    kw = dict(init=m.init, init_scale=float(m.init_scale), init_fan=m.init_fan,
              init_gain=m.init_gain, bias_init=float(m.bias_init), activation=m.activation,
              zero_init_residual=bool(m.zero_init_residual), pool=m.pool,
              fmp_ratio=float(m.fmp_ratio), fmp_overlap=bool(m.fmp_overlap))
    if regularize is not None:
      r = regularize
      on = lambda field: factors.is_on(f'regularize.{field}', r[field])
      kw.update(dropout_at=r.dropout_at, dropout=on('dropout'), noise_hidden=on('noise_hidden'),
                activation_l1=on('activation_l1'), stochastic_depth=on('survival_last'),
                aux_rotation=on('aux_rotation'))
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


# Each normalization is built from (train, dtype, scale_init); a scale_init of None
# means no learned scale (fixed at 1, as airbench's BatchNorm): Layers.make_norm(scale=False).
def _scale(scale_init):
  return dict(use_scale=scale_init is not None, scale_init=scale_init or nn.initializers.ones)


def _batch_norm(train, dtype, scale_init):
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                      **_scale(scale_init))


class _LayerNorm(nn.Module):
  """Layer norm of Ba et al. (2016) as Wu & He (2018) compare it for CNNs: each
  example over all its non-batch axes (H, W, C of a feature map, the features of
  a dense layer), with a per-channel scale and offset (= GroupNorm, one group)."""
  dtype: Any = jnp.float32
  scale_init: Any = nn.initializers.ones

  @nn.compact
  def __call__(self, x):
    return nn.LayerNorm(reduction_axes=tuple(range(1, x.ndim)), feature_axes=-1,
                        dtype=self.dtype, **_scale(self.scale_init))(x)


NORMS.add('none', lambda train, dtype, scale_init: (lambda x: x), doc='identity')
NORMS.add('batch', _batch_norm, doc='each channel over the batch and positions')
NORMS.add('layer', lambda train, dtype, scale_init: _LayerNorm(dtype=dtype,
                                                                scale_init=scale_init),
          doc='each example over all its positions and channels (H, W, C)')
# What ConvNeXt calls LayerNorm (Flax's nn.LayerNorm on NHWC). On an MLP it would be
# `layer` under another name, so resolve refuses it there (needs_spatial).
NORMS.add('layer_channels', lambda train, dtype, scale_init: nn.LayerNorm(
    dtype=dtype, **_scale(scale_init)), needs_spatial=True,
    doc='each image position over its channels')
# Group count adapts to the width (8 groups where the width allows it).
NORMS.add('group', lambda train, dtype, scale_init: _GroupNorm(dtype=dtype, scale_init=scale_init),
          doc='each example over positions and groups of channels')
NORMS.add('instance', lambda train, dtype, scale_init: nn.GroupNorm(
    num_groups=None, group_size=1, dtype=dtype, **_scale(scale_init)),
    needs_spatial=True, doc='each channel of each image over its positions')


class _GroupNorm(nn.Module):
  dtype: Any = jnp.float32
  scale_init: Any = nn.initializers.ones

  @nn.compact
  def __call__(self, x):
    return nn.GroupNorm(num_groups=math.gcd(8, x.shape[-1]), dtype=self.dtype,
                        **_scale(self.scale_init))(x)


class Layers(nn.Module):
  """Shared building blocks: init-aware conv/dense, norm, activation (with the
  hidden-unit regularizers) and dropout sites. Every field has a default so
  subclasses can add their own."""
  activation: str = 'relu'
  norm: str = 'batch'
  dtype: Any = jnp.float32
  opts: Options = Options()

  def dense(self, features, last=False, name=None):
    return nn.Dense(features, dtype=self.dtype, kernel_init=inits.kernel_init(self.opts, last),
                    bias_init=inits.bias_init(self.opts), name=name)

  def conv(self, features, kernel=3, strides=1, groups=1, zero=False, bias=None):
    # No bias when a normalization layer follows: its offset plays that role.
    use_bias = self.norm == 'none' if bias is None else bias
    return nn.Conv(features, (kernel, kernel), strides=strides, padding='SAME',
                   feature_group_count=groups, use_bias=use_bias, dtype=self.dtype,
                   kernel_init=nn.initializers.zeros if zero else inits.kernel_init(self.opts),
                   bias_init=inits.bias_init(self.opts))

  def make_norm(self, train, zero=False, scale=True):
    """The normalization of model.norm; zero: its scale starts at 0; scale=False: it has
    no learned scale (fixed at 1), only an offset."""
    scale_init = None if not scale else nn.initializers.zeros if zero else nn.initializers.ones
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

  def pool(self, x, layer: int):
    """The downsampling of model.pool: 2x2 max (SAME), 2x2 average (SAME, the padding
    not counted), or fractional max-pooling by model.fmp_ratio (lib/model/fmp.py),
    its regions drawn from the 'fmp' rng where the caller gives one (the train step),
    else the fixed draw of pooling layer `layer` (evaluation)."""
    if self.opts.pool == 'max':
      return nn.max_pool(x, (2, 2), strides=(2, 2), padding='SAME')
    if self.opts.pool == 'avg':
      return nn.avg_pool(x, (2, 2), strides=(2, 2), padding='SAME', count_include_pad=False)
    key = self.make_rng('fmp') if self.has_rng('fmp') else fmp.fixed_key(layer)
    return fmp.pool(x, key, self.opts.fmp_ratio, self.opts.fmp_overlap)




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
