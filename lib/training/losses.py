"""Classification losses as per-class loss matrices, and label smoothing.

Every loss in `LOSSES` maps logits s of shape (B, C) to a per-class loss matrix
P of shape (B, C) with

  P[b, c] = L(s_b, c)   (the loss of example b if its label were c).

`loss` then takes the expectation under the (possibly soft) targets t:

  loss(s, t)[b] = sum_c t[b, c] * P[b, c],

which is linear in t, so mixup / cutmix / label smoothing (all of which mix
one-hot targets) mean the same thing for every loss: the mixed loss. For
cross-entropy this is the usual soft-target cross-entropy
-sum_c t_c log softmax(s)_c.
"""
import jax
import jax.numpy as jnp

from lib.core.registry import Registry

LOSSES = Registry('loss', 'train.loss')


@LOSSES.register('cross_entropy')
def cross_entropy(logits):
  """P[b, c] = -log softmax(s_b)_c = logsumexp(s_b) - s_b,c."""
  return -jax.nn.log_softmax(logits, axis=-1)


def _margins(logits):
  """Pairwise hinge terms m[b, c, j] = max(0, s_b,j - s_b,c + 1) with m[b, c, c] = 0.

  The j == c term (which would be max(0, 1) = 1) is removed exactly by masking,
  not by subtracting 1 afterwards. Memory is B*C*C floats.
  """
  c = logits.shape[-1]
  m = jnp.maximum(0.0, logits[..., None, :] - logits[..., :, None] + 1.0)
  return jnp.where(jnp.eye(c, dtype=bool), 0.0, m)


@LOSSES.register('hinge')
def hinge(logits):
  """Multiclass SVM (Weston-Watkins / CS231n form, margin 1).

  P[b, c] = sum_{j != c} max(0, s_b,j - s_b,c + 1).
  """
  return jnp.sum(_margins(logits), axis=-1)


@LOSSES.register('squared_hinge')
def squared_hinge(logits):
  """Squared multiclass hinge: P[b, c] = sum_{j != c} max(0, s_b,j - s_b,c + 1)^2."""
  return jnp.sum(jnp.square(_margins(logits)), axis=-1)


def per_class(name: str, logits):
  """The (B, C) per-class loss matrix of loss `name` (UserError if unknown)."""
  return LOSSES.get(name).fn(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)))


def loss(name: str, logits, targets):
  """Per-example loss (B,): loss[b] = sum_c targets[b, c] * P_name(logits)[b, c].

  `targets` are one-hot or soft (mixup, cutmix, label smoothing) rows summing to 1.
  """
  return jnp.sum(targets.astype(jnp.float32) * per_class(name, logits), axis=-1)


def smooth(targets, eps):
  """Label smoothing: (1 - eps) * targets + eps / C, C = targets.shape[-1].

  `eps` may be a Python number or a traced array (it is never made a float).
  """
  c = targets.shape[-1]
  return (1.0 - eps) * targets + eps / c
