"""Per-example host transforms of the streaming input path: numpy + PIL, deterministic
given a numpy Generator. `example_rng(seed, epoch, index)` gives each example of each epoch
its own stream, so the augmentation of an example does not depend on which worker reads it
or in what order. Training: Inception-style random-resized crop + flip; evaluation: the
shorter side resized to size / 0.875, then the centre crop."""
import math
from typing import Tuple

import numpy as np
from PIL import Image


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  """The random stream of example `index` in `epoch`: independent of the reading order."""
  return np.random.default_rng([seed, epoch, index])


def _resize(image: np.ndarray, width: int, height: int, box=None) -> np.ndarray:
  """HWC uint8 resized (the region `box` = (left, top, right, bottom) of it, if given) to
  (height, width) with PIL's bilinear filter, which widens when shrinking (antialiased)."""
  c = image.shape[-1]
  if c not in (1, 3):
    return np.stack([_resize(image[..., k:k + 1], width, height, box)[..., 0]
                     for k in range(c)], -1)
  pil = Image.fromarray(np.ascontiguousarray(image[..., 0] if c == 1 else image))
  out = np.asarray(pil.resize((width, height), Image.BILINEAR, box=box))
  return out[..., None] if c == 1 else out


def sample_crop_box(height: int, width: int, rng: np.random.Generator,
                    scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
  """(top, left, h, w) of an Inception-style crop: up to 10 draws of an area fraction
  uniform in `scale` and an aspect ratio w/h log-uniform in `ratio`, the first that fits;
  else a centred crop of the whole image, its aspect clamped to `ratio`."""
  if not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
    raise ValueError(f'need 0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]; '
                     f'got scale={scale} ratio={ratio}')
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  aspect = width / height
  if aspect < ratio[0]:
    w, h = width, max(1, min(height, int(round(width / ratio[0]))))
  elif aspect > ratio[1]:
    w, h = max(1, min(width, int(round(height * ratio[1])))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: np.ndarray, size: int, rng: np.random.Generator,
                        scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  """A random crop (sample_crop_box) resized to (size, size, C), bilinear, antialiased."""
  top, left, h, w = sample_crop_box(image.shape[0], image.shape[1], rng, scale, ratio)
  return _resize(image, size, size, box=(left, top, left + w, top + h))


def flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """The image mirrored left-right with probability 1/2 (a view)."""
  return image[:, ::-1] if rng.random() < 0.5 else image


def center_resize_crop(image: np.ndarray, size: int, crop_fraction: float = 0.875) -> np.ndarray:
  """The shorter side resized to round(size / crop_fraction) (bilinear, aspect kept), then
  the centre size x size. An image already that size with crop_fraction 1 is returned as is."""
  if not 0 < crop_fraction <= 1:
    raise ValueError(f'crop_fraction must lie in (0, 1], got {crop_fraction}')
  h, w = image.shape[:2]
  short = int(round(size / crop_fraction))
  if h <= w:
    nh, nw = short, max(short, int(round(w * short / h)))
  else:
    nh, nw = max(short, int(round(h * short / w))), short
  if (nh, nw) != (h, w):
    image = _resize(image, nw, nh)
  if (nh, nw) == (size, size):
    return image
  top, left = (nh - size) // 2, (nw - size) // 2
  return image[top:top + size, left:left + size]


def train_transform(image: np.ndarray, size: int, rng: np.random.Generator,
                    scale_lo: float = 0.08, flip: bool = True) -> np.ndarray:
  """random_resized_crop (area fraction in [scale_lo, 1]), then a random flip if `flip`."""
  image = random_resized_crop(image, size, rng, scale=(scale_lo, 1.0))
  return _flip(image, rng) if flip else image


_flip = flip   # train_transform's `flip` argument shadows the function


def eval_transform(image: np.ndarray, size: int, crop_fraction: float = 0.875) -> np.ndarray:
  """center_resize_crop: the deterministic evaluation view."""
  return center_resize_crop(image, size, crop_fraction)
