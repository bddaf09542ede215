"""On-device, per-example augmentations applied inside the compiled train step.

The train step runs, in order:

  1. `apply(key, x, c, hp, 'pixel')` on float images in [0, 1]:
     crop, flip, resized_crop, jitter;
  2. normalize, x = (x - mean) / std;
  3. `apply(key, x, c, hp, 'normalized')`: cutout (0 is the dataset mean);
  4. `mix(mix_key, x, targets, c, hp)` on soft targets: mixup and/or cutmix.

An augmentation is one function `fn(key, images, c, hp) -> images` on images of
shape (B, H, W, C), registered with the factor keys (lib/core/factors.py) that turn
it on: it is in the program when any of them is not at its off value. `c` is config.augment: its static values (ints, bools, which
augmentations are on) shape the program. `hp` is `hparams(c)` passed in as jit
arguments: float32 scalar arrays with the continuous strengths, used only as
traced values so they can differ (or be vmapped) without recompiling. Each
image draws its own randomness, all from one key per step, so it does not
depend on how the batch is split over devices.

An augmentation registered with `examples=True` also gets `examples`: which
training examples the batch holds and in which epoch (`Examples`, given by the
resident step; None from the streaming pipeline). The alternating flip
(augment.flip_mode=alternate) needs it.
"""
import math
from typing import Any, Callable, Dict, List, NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from lib.core import factors
from lib.core.errors import UserError

STAGES = ('pixel', 'normalized')

# The continuous strengths: config.augment keys that travel as traced float32.
HP_KEYS = tuple(f.field for f in factors.traced() if f.section == 'augment')


class Examples(NamedTuple):
  """Which training examples a batch holds: their indices in the training split, the
  epoch, and a key fixed for the whole run (a function of its seed)."""
  index: Any    # (B,) int32
  epoch: Any    # () int32
  key: Any      # raw uint32[2] key


class Augmentation(NamedTuple):
  name: str
  stage: str         # 'pixel' (floats in [0, 1]) or 'normalized' (after (x - mean) / std)
  keys: Tuple[str, ...]  # the factors that turn it on
  fn: Callable       # (key, images, config.augment, hp) -> images
  examples: bool = False   # fn also takes examples=Examples (or None)

  def enabled(self, c) -> bool:
    """Whether config.augment `c` puts it in the program."""
    return any(factors.is_on(k, c[k.split('.')[1]]) for k in self.keys)


AUGMENTATIONS: List[Augmentation] = []


def register(name: str, keys: Sequence[str], stage: str = 'pixel', examples: bool = False):
  """Decorator: `fn` is the augmentation of factors `keys` (declared in
  lib/core/factors.py with site `stage`). Registration order is application order,
  and a new one appended last leaves the random streams of the others as they are.
  `examples`: fn also takes the keyword `examples` (an `Examples`, or None)."""
  assert stage in STAGES, stage
  for k in keys:
    assert factors.FACTORS[k].site == stage, (k, stage)
  def wrap(fn):
    AUGMENTATIONS.append(Augmentation(name, stage, tuple(keys), fn, examples))
    return fn
  return wrap


def unregister(name: str) -> None:
  """Takes a registration back (tests register throwaway augmentations)."""
  AUGMENTATIONS[:] = [a for a in AUGMENTATIONS if a.name != name]


def _uniform(key, shape, lo, hi):
  """U[lo, hi); exactly lo when hi == lo (so a strength of 0 is an exact identity)."""
  return lo + (hi - lo) * jax.random.uniform(key, shape)


def _span_mask(n: int, lo, size):
  """(..., n) bool: index r in [lo, lo + size), lo and size traced, broadcast over (...)."""
  r = jnp.arange(n, dtype=jnp.float32)
  lo = jnp.asarray(lo, jnp.float32)[..., None]
  return (r >= lo) & (r < lo + jnp.asarray(size, jnp.float32)[..., None])


def _gray(images):
  """(B, H, W, 1) luma (ITU-R 601, as torchvision) of RGB; the channel mean otherwise."""
  if images.shape[-1] == 3:
    return jnp.tensordot(images, jnp.array([0.299, 0.587, 0.114], images.dtype),
                         axes=([-1], [0]))[..., None]
  return images.mean(-1, keepdims=True)


@register('crop', ['augment.crop_padding'])
def random_crop(key, images, c, hp):
  """Zero-pad by crop_padding on each side, then crop back at a random offset."""
  p = int(c.crop_padding)
  b, h, w, ch = images.shape
  padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
  offsets = jax.random.randint(key, (b, 2), 0, 2 * p + 1)
  crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, ch))
  return jax.vmap(crop)(padded, offsets)


@register('flip', ['augment.flip'], examples=True)
def random_flip(key, images, c, hp, examples=None):
  """Mirror each image left-right with probability 1/2 (flip_mode=random), or by
  `alternating_flips` (flip_mode=alternate)."""
  if c.flip_mode == 'alternate':
    if examples is None:
      raise UserError('augment.flip_mode=alternate needs the example indices, which only the '
                      'resident pipeline gives the step; use --config.data.pipeline=resident '
                      'or augment.flip_mode=random')
    flip = alternating_flips(examples)[:, None, None, None]
  else:
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
  return jnp.where(flip, images[:, :, ::-1, :], images)


def alternating_flips(examples: Examples):
  """(B,) bool: airbench's derandomized flip. Each example has a parity bit, a function of
  the run's key and its index alone (so a random half of the split, fixed for the run);
  it is flipped in the epochs whose parity differs from its bit: the half with bit 1 in
  epoch 0, 2, ..., the other half in epoch 1, 3, ..., so every image is flipped in exactly
  one of any two consecutive epochs."""
  bit = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(examples.key, i)))(
      examples.index)
  return bit != (examples.epoch % 2 == 1)


@register('resized_crop', ['augment.resized_crop_scale'])
def random_resized_crop(key, images, c, hp):
  """Inception-style crop of area ~ U[scale, 1] * H*W, log aspect ~ U[log 3/4, log 4/3],
  uniform position, resized back to H x W bilinearly.

  A box that would not fit keeps its area and takes the nearest aspect ratio that
  fits, so scale 1 is the identity.
  """
  b, h, w, ch = images.shape
  k_area, k_ratio, k_y, k_x = jax.random.split(key, 4)
  area = h * w * _uniform(k_area, (b,), hp['resized_crop_scale'], 1.0)
  area = jnp.maximum(area, 1.0)  # at least one pixel
  ratio = jnp.exp(_uniform(k_ratio, (b,), math.log(3 / 4), math.log(4 / 3)))  # width / height
  box_w = jnp.clip(jnp.sqrt(area * ratio), area / h, w)
  box_h = jnp.minimum(area / box_w, h)
  y0 = _uniform(k_y, (b,), 0.0, h - box_h)
  x0 = _uniform(k_x, (b,), 0.0, w - box_w)
  scale = jnp.stack([h / box_h, w / box_w], -1)  # >= 1: always upsampling
  translation = -jnp.stack([y0, x0], -1) * scale
  resize = lambda img, s, t: jax.image.scale_and_translate(
      img, (h, w, ch), (0, 1), s, t, method='linear', antialias=False)
  return jax.vmap(resize)(images, scale, translation)


@register('jitter', ['augment.brightness', 'augment.contrast', 'augment.saturation'])
def color_jitter(key, images, c, hp):
  """Brightness, contrast, saturation in that order, each factor ~ U[max(0, 1-s), 1+s]
  per image, blended as torchvision does and clipped to [0, 1]; strength 0 is the identity.

  brightness: f*x; contrast: blend with the image's mean gray; saturation: blend
  with each pixel's gray (nothing to do for 1-channel images).
  """
  b = images.shape[0]
  keys = jax.random.split(key, 3)
  mean_gray = lambda x: _gray(x).mean(axis=(1, 2, 3), keepdims=True)
  ops = [('brightness', lambda x: 0.0), ('contrast', mean_gray), ('saturation', _gray)]
  for k, (name, target) in zip(keys, ops):
    if name == 'saturation' and images.shape[-1] == 1:
      continue
    s = hp[name]
    f = _uniform(k, (b, 1, 1, 1), jnp.maximum(0.0, 1.0 - s), 1.0 + s)
    blended = jnp.clip(f * images + (1.0 - f) * target(images), 0.0, 1.0)
    images = jnp.where(s > 0, blended, images)
  return images


@register('cutout', ['augment.cutout_size'], stage='normalized')
def cutout(key, images, c, hp):
  """Set cutout_patches squares of side cutout_size per image to 0 (the dataset mean).

  Centres are uniform over the image and squares are clipped at its borders
  (DeVries & Taylor 2017); a square covers rows [cy - s//2, cy - s//2 + s).
  """
  b, h, w, _ = images.shape
  centres = jax.random.randint(key, (b, int(c.cutout_patches), 2), 0, jnp.array([h, w]))
  size = hp['cutout_size']
  lo = centres - jnp.floor(size / 2)
  rows = _span_mask(h, lo[..., 0], size)  # (B, P, H)
  cols = _span_mask(w, lo[..., 1], size)  # (B, P, W)
  mask = jnp.any(rows[:, :, :, None] & cols[:, :, None, :], axis=1)  # (B, H, W)
  return jnp.where(mask[..., None], 0.0, images)


def _beta_or_one(key, alpha, shape):
  """lam ~ Beta(alpha, alpha), or exactly 1 where the (traced) alpha is 0."""
  safe = jnp.where(alpha > 0, alpha, 1.0)
  return jnp.where(alpha > 0, jax.random.beta(key, safe, safe, shape), 1.0)


def _mixup(lam, images, targets, partner):
  lam_x = lam.reshape((-1,) + (1,) * (images.ndim - 1))
  images = lam_x * images + (1.0 - lam_x) * images[partner]
  targets = lam[:, None] * targets + (1.0 - lam[:, None]) * targets[partner]
  return images, targets


def _cutmix(lam, key_box, images, targets, partner):
  b, h, w, _ = images.shape
  side = jnp.sqrt(1.0 - lam)  # box of area (1 - lam) * H*W, shaped like the image
  box = jnp.floor(jnp.stack([h * side, w * side], -1))  # (B, 2)
  centres = jax.random.randint(key_box, (b, 2), 0, jnp.array([h, w]))
  lo = centres - jnp.floor(box / 2)
  mask = _span_mask(h, lo[:, 0], box[:, 0])[:, :, None] & _span_mask(w, lo[:, 1], box[:, 1])[:, None, :]
  images = jnp.where(mask[..., None], images[partner], images)
  f = mask.sum((1, 2)).astype(jnp.float32)[:, None] / (h * w)  # pasted fraction after clipping
  targets = (1.0 - f) * targets + f * targets[partner]
  return images, targets


def mix(key, images, targets, c, hp):
  """Mixup / cutmix of normalized images with a random partner; (images, targets).

  targets are (B, num_classes) soft labels, mixed with exactly the weight of
  each partner's share of the image. mixup: x = lam*x_i + (1-lam)*x_j with
  per-example lam ~ Beta(alpha, alpha). cutmix: paste the partner's box of area
  (1-lam)*H*W at a uniform centre, clipped at the borders. Both on: one of them
  per batch, each with probability 1/2. c decides whether mix is in the program
  at all; inside it, a (traced) alpha of 0 turns that one off, and both 0 is the
  identity. `key` must be its own stream, not the key given to `apply`.
  """
  on_m = factors.is_on('augment.mixup_alpha', c.mixup_alpha)
  on_c = factors.is_on('augment.cutmix_alpha', c.cutmix_alpha)
  if not (on_m or on_c):
    return images, targets
  # One program for every setting: an alpha switched off in c is a constant 0.
  alpha_m = hp['mixup_alpha'] if on_m else jnp.float32(0)
  alpha_c = hp['cutmix_alpha'] if on_c else jnp.float32(0)
  k_partner, k_lam, k_box, k_choice = (jax.random.fold_in(key, i) for i in range(4))
  partner = jax.random.permutation(k_partner, images.shape[0])
  p_cutmix = jnp.where(alpha_c > 0, jnp.where(alpha_m > 0, 0.5, 1.0), 0.0)
  choose_cutmix = jax.random.bernoulli(k_choice, p_cutmix)  # one draw per batch
  alpha = jnp.where(choose_cutmix, alpha_c, alpha_m)
  lam = _beta_or_one(k_lam, alpha, (images.shape[0],))
  cut = _cutmix(lam, k_box, images, targets, partner)
  mixed = _mixup(lam, images, targets, partner)
  return tuple(jnp.where(choose_cutmix, a, b) for a, b in zip(cut, mixed))


def check(c):
  """Raises UserError for an augment value out of its range (lib/core/factors.py)."""
  for f in factors.in_section('augment'):
    f.check(c[f.field])


def hparams(c) -> Dict[str, np.float32]:
  """The continuous strengths (HP_KEYS), validated, to pass into the step as jit arguments."""
  check(c)
  return {k: np.float32(c[k]) for k in HP_KEYS}


def active(c, stage: str = None) -> List[Augmentation]:
  return [a for a in AUGMENTATIONS if a.enabled(c) and stage in (None, a.stage)]


def apply(key, images, c, hp, stage: str, skip: Sequence[str] = (), examples=None):
  """Applies the enabled augmentations of `stage` in registration order, each with its
  own key; those named in `skip` were done by the input pipeline (on the host).
  `examples` (an `Examples`, or None) goes to those registered to take it."""
  assert stage in STAGES, stage
  # Keyed by registration index, so enabling one augmentation does not change
  # the random stream of another.
  for i, aug in enumerate(AUGMENTATIONS):
    if aug.stage == stage and aug.enabled(c) and aug.name not in skip:
      extra = {'examples': examples} if aug.examples else {}
      images = aug.fn(jax.random.fold_in(key, i), images, c, hp, **extra)
  return images
