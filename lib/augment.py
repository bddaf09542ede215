"""On-device, per-example augmentations applied inside the compiled train step.

An augmentation is one function `fn(key, images, config.augment) -> images` on
float images in [0, 1] of shape (B, H, W, C), registered with the predicate that
says when the config turns it on. They run in registration order. Randomness is
drawn for the whole global batch from one key, so it does not depend on how the
batch is split over devices.
"""
from typing import Callable, List, NamedTuple

import jax
import jax.numpy as jnp

from lib.errors import UserError


class Augmentation(NamedTuple):
  name: str
  enabled: Callable  # config.augment -> bool
  fn: Callable       # (key, images, config.augment) -> images


AUGMENTATIONS: List[Augmentation] = []


def register(name: str, enabled: Callable):
  def wrap(fn):
    AUGMENTATIONS.append(Augmentation(name, enabled, fn))
    return fn
  return wrap


@register('crop', lambda c: c.crop_padding > 0)
def random_crop(key, images, c):
  """Zero-pad by crop_padding on each side, then crop back at a random offset."""
  p = int(c.crop_padding)
  b, h, w, ch = images.shape
  padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
  offsets = jax.random.randint(key, (b, 2), 0, 2 * p + 1)
  crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, ch))
  return jax.vmap(crop)(padded, offsets)


@register('flip', lambda c: bool(c.flip))
def random_flip(key, images, c):
  """Mirror each image left-right with probability 1/2."""
  flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
  return jnp.where(flip, images[:, :, ::-1, :], images)


def check(c):
  if c.crop_padding < 0:
    raise UserError(f'augment.crop_padding={c.crop_padding} must be >= 0 (0 = off)')


def active(c) -> List[Augmentation]:
  return [a for a in AUGMENTATIONS if a.enabled(c)]


def apply(key, images, c):
  """Applies every enabled augmentation, each with its own key."""
  # Keyed by registration index, so enabling one augmentation does not change
  # the random stream of another.
  for i, aug in enumerate(AUGMENTATIONS):
    if aug.enabled(c):
      images = aug.fn(jax.random.fold_in(key, i), images, c)
  return images
