"""Regularizers that act on the parameters or the loss, and their strengths.

Which regularizers are in the compiled program is decided by config.regularize
at trace time (a value other than the "off" value puts it in); how strong they
are comes in `hparams` as float32 arrays, so one program serves every strength.

  * L2 (lambda/2 * sum w^2) and L1 (lambda * sum |w|) penalties on the kernels
    (every parameter with regularize.decay_all_params), added to the loss;
  * activation L1 (alpha * sum |h| per example, summed over hidden layers; the
    models sow the sums, see lib/models.py);
  * DropConnect (Wan et al. 2013): each step zeroes a random fraction p of the
    weights of every dense kernel and scales the rest by 1/(1-p) (inverted, one
    mask per step for the whole batch), so evaluation uses the plain weights;
  * weight noise: w + std * N(0, 1) on every conv/dense kernel at train time;
  * FGSM adversarial inputs (`fgsm`);
  * label smoothing, Gaussian input noise, dropout,
    hidden-unit noise and stochastic depth are applied where they act (lib/steps.py,
    lib/models.py); their strengths are validated here.
"""
from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from lib.errors import UserError
from lib.models import DROPOUT_SITES

# key -> (lowest valid, highest valid, whether the highest is included, off value)
_RANGES = {
    'l1': (0.0, np.inf, False, 0.0),
    'activation_l1': (0.0, np.inf, False, 0.0),
    'dropout': (0.0, 1.0, False, 0.0),
    'dropconnect': (0.0, 1.0, False, 0.0),
    'noise_input': (0.0, np.inf, False, 0.0),
    'noise_hidden': (0.0, np.inf, False, 0.0),
    'noise_weight': (0.0, np.inf, False, 0.0),
    'survival_last': (0.0, 1.0, True, 1.0),
    'label_smoothing': (0.0, 1.0, False, 0.0),
    'adversarial_eps': (0.0, np.inf, False, 0.0),
}
HP_KEYS = tuple(_RANGES)   # every regularize strength travels as a traced float32


def check(r) -> None:
  for key, (lo, hi, hi_ok, off) in _RANGES.items():
    v = r[key]
    ok = (lo < v if key == 'survival_last' else lo <= v) and (v <= hi if hi_ok else v < hi)
    if not ok:
      right = ']' if hi_ok else ')'
      left = '(' if key == 'survival_last' else '['
      raise UserError(f'regularize.{key}={v} must be in {left}{lo}, {hi}{right} '
                      f'({off} = off)')
  if r.dropout_at not in DROPOUT_SITES:
    raise UserError(f'unknown regularize.dropout_at={r.dropout_at!r}; valid: '
                    f'{", ".join(sorted(DROPOUT_SITES))}')


def enabled(r, key: str) -> bool:
  """Whether the regularizer `key` is in the program (its value is not the off value)."""
  return r[key] != _RANGES[key][3]


def hparams(r) -> Dict[str, np.ndarray]:
  check(r)
  return {key: np.float32(r[key]) for key in _RANGES}


def kernel_mask(params, dense_only: bool = False):
  """True for conv/dense kernels (dense_only: 2-D kernels only)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: getattr(path[-1], 'key', None) == 'kernel' and (
          not dense_only or p.ndim == 2), params)


def l1_penalty(params, mask):
  """sum |w| over the masked leaves (multiply by lambda)."""
  leaves = [jnp.sum(jnp.abs(p.astype(jnp.promote_types(p.dtype, jnp.float32))))
            for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m]
  return sum(leaves) if leaves else jnp.zeros((), jnp.float32)


def _per_leaf(fn, key, params, mask):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, max(len(leaves), 1))
  out = [fn(k, p) if m else p for k, p, m in zip(keys, leaves, jax.tree.leaves(mask))]
  return jax.tree.unflatten(treedef, out)


def dropconnect(key, params, rate):
  """Inverted DropConnect on every dense kernel: zero with probability `rate`."""
  def drop(k, w):
    keep = jax.random.bernoulli(k, 1.0 - rate, w.shape)
    return jnp.where(keep, w / (1.0 - rate), jnp.zeros_like(w))
  return _per_leaf(drop, key, params, kernel_mask(params, dense_only=True))


def fgsm(loss_of_x, x, eps, std, lo, hi):
  """FGSM (Goodfellow et al. 2015) on normalized inputs x: the adversarial
  example x + eps * sign(grad_x loss) with eps in [0, 1] pixel units (so eps/std
  in normalized units), kept inside the valid pixel range [lo, hi]. Training uses
  the adversarial batch alone (no clean term), with the current weights."""
  grad_x = jax.grad(loss_of_x)(x)
  return jax.lax.stop_gradient(jnp.clip(x + eps * jnp.sign(grad_x) / std, lo, hi))


def weight_noise(key, params, std):
  """w + std * N(0, 1) on every conv/dense kernel."""
  return _per_leaf(lambda k, w: w + std * jax.random.normal(k, w.shape, w.dtype), key, params,
                   kernel_mask(params))
