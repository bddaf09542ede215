"""The evaluation step: a deterministic forward pass, with test-time augmentation.

`make_eval_step` sums loss and correct predictions over a padded batch (the
engine scans it over a whole split); `views` gives the test-time views of
`train.eval_tta` (none, flip, crops).
"""
from typing import Callable

import jax
import jax.numpy as jnp

from lib.core import factors

TTA = factors.FACTORS['train.eval_tta'].choices


def views(x, tta: str, pad: int = 4):
  """The test-time views of a batch: itself (none); it and its mirror image
  (flip); the 4 corner and the centre crops of the image zero-padded by `pad`
  pixels, each also mirrored (crops: 10 views, as the ResNet paper's 10-crop)."""
  if tta == 'none':
    return [x]
  if tta == 'flip':
    return [x, x[:, :, ::-1, :]]
  h, w = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  corners = [(0, 0), (0, 2 * pad), (2 * pad, 0), (2 * pad, 2 * pad), (pad, pad)]
  crops = [padded[:, i:i + h, j:j + w, :] for i, j in corners]
  return crops + [c[:, :, ::-1, :] for c in crops]


def make_eval_step(model, mean, std, tta: str = 'none') -> Callable:
  """eval_step(state, images, labels, idx, mask) -> sums of loss, correct, count.

  With test-time augmentation the softmax outputs of the views are averaged
  (cross-entropy of the averaged prediction). Crops pad in pixel space, with
  black as in training's random crop.
  """
  def predict(state, x):
    return model.apply({'params': state.params, 'batch_stats': state.batch_stats}, x, train=False)

  def eval_step(state, images, labels, idx, mask):
    x = images[idx].astype(jnp.float32) / 255.0
    y = labels[idx]
    if tta == 'none':
      log_probs = jax.nn.log_softmax(predict(state, (x - mean) / std))
    else:
      probs = sum(jax.nn.softmax(predict(state, (v - mean) / std)) for v in views(x, tta))
      log_probs = jnp.log(jnp.maximum(probs / len(views(x[:1], tta)), 1e-30))
    loss = -jnp.take_along_axis(log_probs, y[:, None], axis=-1)[:, 0]
    correct = jnp.argmax(log_probs, -1) == y
    m = mask.astype(jnp.float32)
    return {'loss': jnp.sum(loss * m), 'correct': jnp.sum(correct * m), 'count': jnp.sum(m)}

  return eval_step
