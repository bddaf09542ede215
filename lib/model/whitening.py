"""Patch-whitening filters of a first conv layer (model.whiten_init=patch), as airbench
(Jordan 2024) sets its first layer.

`patch_covariance` is a statistic of the training images alone (like their mean and
std): the covariance of every `SIZE` x `SIZE` patch of the first `IMAGES` normalized
training images. `kernel` turns it into the conv kernel (SIZE, SIZE, C, 2 * SIZE*SIZE*C):
filter k is eigenvector k of that covariance (largest eigenvalue first) divided by
sqrt(eigenvalue_k + EPS), followed by the same filters negated. On the patches it was
computed from, each half's outputs (the conv without its bias) then have covariance
diag(eigenvalue / (eigenvalue + EPS)): the identity, but for the directions of least
variance, which EPS keeps from being amplified without bound.

The filters are set after the model's own init (lib/training/state.py:init_state) in
the layer named `LAYER`, and frozen by the optimizer (lib/training/optim.py); its bias
trains. numpy only.
"""
import numpy as np

LAYER = 'whiten'   # the name of the whitening conv in the models that have one
SIZE = 2           # its kernel side
IMAGES = 5000      # training images the covariance is estimated from (airbench's 5000)
EPS = 5e-4         # added to each eigenvalue (airbench's)


def patches(x: np.ndarray, size: int = SIZE) -> np.ndarray:
  """(N * (H-size+1) * (W-size+1), size*size*C): every size x size patch of the images x
  (N, H, W, C), flattened in the order of a conv kernel's (kh, kw, C) axes."""
  n, h, w, c = x.shape
  shifted = [x[:, dy:h - size + 1 + dy, dx:w - size + 1 + dx, :]
             for dy in range(size) for dx in range(size)]
  return np.stack(shifted, axis=3).reshape(-1, size * size * c)


def patch_covariance(images: np.ndarray, mean, std, size: int = SIZE, n: int = IMAGES,
                     chunk: int = 500) -> np.ndarray:
  """(size*size*C, size*size*C) float64: the covariance of the size x size patches of
  the first `n` of `images` (uint8 NHWC) scaled to [0, 1] and normalized by mean/std."""
  images = images[:n]
  mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
  d = size * size * images.shape[-1]
  total, outer, count = np.zeros(d), np.zeros((d, d)), 0
  for start in range(0, len(images), chunk):   # a bounded amount of memory at a time
    x = (images[start:start + chunk].astype(np.float64) / 255.0 - mean) / std
    p = patches(x, size)
    total += p.sum(0)
    outer += p.T @ p
    count += len(p)
  if count == 0:
    raise ValueError('no training images to compute the patch covariance from')
  mu = total / count
  return outer / count - np.outer(mu, mu)


def kernel(covariance: np.ndarray, channels: int, size: int = SIZE,
           eps: float = EPS) -> np.ndarray:
  """(size, size, channels, 2 * size*size*channels) float32: the whitening filters of
  `covariance` (largest eigenvalue first), then the same negated."""
  eigenvalues, eigenvectors = np.linalg.eigh(covariance)   # ascending
  order = np.argsort(eigenvalues)[::-1]
  scaled = eigenvectors[:, order] / np.sqrt(np.maximum(eigenvalues[order], 0.0) + eps)
  filters = np.concatenate([scaled, -scaled], axis=1)       # (size*size*C, 2 * size*size*C)
  return filters.reshape(size, size, channels, -1).astype(np.float32)


def from_images(images: np.ndarray, mean, std, size: int = SIZE) -> np.ndarray:
  """The whitening kernel of a training split's images (uint8 NHWC)."""
  return kernel(patch_covariance(images, mean, std, size), images.shape[-1], size)
