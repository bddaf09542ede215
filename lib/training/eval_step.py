"""The evaluation step: a deterministic forward pass, with test-time augmentation.

`make_eval_step` sums loss and correct predictions over a padded batch (the
engine scans it over a whole split), and top-5 correct predictions for datasets
of more than 10 classes (`reports_top5`); `views` gives the test-time views of
`train.eval_tta` (none, flip, crops, flip_translate) and `view_weights` their weights
in the averaged softmax. Its two halves, `make_log_probs` (the
prediction) and `batch_sums`, also serve ensembles of runs (lib/runs/ensemble.py).
"""
from typing import Callable

import jax
import jax.numpy as jnp

from lib.core import factors
from lib.model import fmp

TTA = factors.FACTORS['train.eval_tta'].choices
TOP_K = 5


def reports_top5(num_classes: int) -> bool:
  """Whether evaluations of a dataset with `num_classes` classes also report top-5
  accuracy: only above 10 classes, so 10-class runs write what they always did."""
  return num_classes > 10


def views(x, tta: str, pad: int = 4):
  """The test-time views of a batch: itself (none); it and its mirror image
  (flip); the 4 corner and the centre crops of the image zero-padded by `pad`
  pixels, each also mirrored (crops: 10 views, as the ResNet paper's 10-crop);
  it and its mirror image, then both translated by one pixel towards the bottom
  right and towards the top left, zero-padded (flip_translate: 6 views, airbench's)."""
  if tta == 'none':
    return [x]
  if tta == 'flip':
    return [x, x[:, :, ::-1, :]]
  h, w = x.shape[1:3]
  if tta == 'flip_translate':
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    shifted = [padded[:, :h, :w, :], padded[:, 2:, 2:, :]]   # content moved +1 px, -1 px
    return [v for s in [x] + shifted for v in (s, s[:, :, ::-1, :])]
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  corners = [(0, 0), (0, 2 * pad), (2 * pad, 0), (2 * pad, 2 * pad), (pad, pad)]
  crops = [padded[:, i:i + h, j:j + w, :] for i, j in corners]
  return crops + [c[:, :, ::-1, :] for c in crops]


def view_weights(tta: str):
  """The weights of the views in the averaged softmax, or None for equal weights:
  flip_translate weighs the image and its mirror 1/4 each and the 4 translated views 1/8
  each, as airbench (which averages logits; here, as for the other views, the softmax)."""
  return (0.25, 0.25, 0.125, 0.125, 0.125, 0.125) if tta == 'flip_translate' else None


def make_eval_step(model, mean, std, tta: str = 'none', top5: bool = False,
                   draws: int = 1) -> Callable:
  """eval_step(state, images, labels, idx, mask) -> sums of loss, correct, count
  (and correct5 with `top5`: the label among the 5 highest scores).

  With test-time augmentation the softmax outputs of the views are averaged
  (cross-entropy of the averaged prediction, top-1 and top-5 of it). Crops pad
  in pixel space, with black as in training's random crop. `draws` > 1 (fractional
  max-pooling, train.fmp_eval_draws) averages them over as many fixed draws of the
  pooling regions too: the model's own fixed draw and lib/model/fmp.py:eval_draw_key(1..).
  """
  log_probs = make_log_probs(model, mean, std, tta, draws)

  def eval_step(state, images, labels, idx, mask):
    x = images[idx].astype(jnp.float32) / 255.0
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    return batch_sums(log_probs(variables, x), labels[idx], mask, top5)

  return eval_step


def make_log_probs(model, mean, std, tta: str = 'none', draws: int = 1) -> Callable:
  """log_probs(variables, x) -> the (batch, classes) log-probabilities of the model's
  prediction on pixels x in [0, 1], normalized by mean/std, in evaluation mode (with
  test-time views and/or several fixed draws of fractional pooling regions, the log
  of their averaged softmax)."""
  def predict(variables, x, draw=0):
    rngs = {'rngs': {'fmp': fmp.eval_draw_key(draw)}} if draw else {}
    return model.apply(variables, x, train=False, **rngs)

  def log_probs(variables, x):
    if tta == 'none' and draws == 1:
      return jax.nn.log_softmax(predict(variables, (x - mean) / std))
    vs = views(x, tta)
    weights = view_weights(tta) or (1.0,) * len(vs)   # equal: x * 1.0 is exact
    probs = sum(w * jax.nn.softmax(predict(variables, (v - mean) / std, d))
                for v, w in zip(vs, weights) for d in range(draws))
    return jnp.log(jnp.maximum(probs / (sum(weights) * draws), 1e-30))

  return log_probs


def batch_sums(log_probs, labels, mask, top5: bool = False):
  """The sums of one padded batch: loss (cross-entropy of the prediction), correct,
  count (and correct5 with `top5`) over the examples `mask` keeps."""
  loss = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  correct = jnp.argmax(log_probs, -1) == labels
  m = mask.astype(jnp.float32)
  out = {'loss': jnp.sum(loss * m), 'correct': jnp.sum(correct * m), 'count': jnp.sum(m)}
  if top5:
    out['correct5'] = jnp.sum(top_k_correct(log_probs, labels, TOP_K) * m)
  return out


def top_k_correct(scores, labels, k: int):
  """Per example, whether the label is among the k highest scores. Ties go to the
  lower class index, as in argmax (lax.top_k is stable), so top-k never counts
  fewer than top-1."""
  _, top = jax.lax.top_k(scores, min(k, scores.shape[-1]))
  return jnp.any(top == labels[:, None], axis=-1)
