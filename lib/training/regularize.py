"""Regularizers that act on the parameters or the loss, and their strengths.

Which regularizers are in the compiled program is decided by config.regularize
at trace time (a value other than the "off" value puts it in); how strong they
are comes in `hparams` as float32 arrays, so one program serves every strength.

  * L2 (lambda/2 * sum w^2) and L1 (lambda * sum |w|) penalties on the kernels
    (every parameter with regularize.decay_all_params), added to the loss;
  * activation L1 (alpha * sum |h| per example, summed over hidden layers; the
    models sow the sums, see lib/model/layers.py);
  * DropConnect (Wan et al. 2013): each step zeroes a random fraction p of the
    weights of every dense kernel and scales the rest by 1/(1-p) (inverted, one
    mask per step for the whole batch), so evaluation uses the plain weights;
  * weight noise: w + std * N(0, 1) on every conv/dense kernel at train time;
  * FGSM adversarial inputs (`fgsm`);
  * parameter tying (`tie_penalty`, regularize.tie_l2): lambda/2 ||w - w_ref||^2 to
    a reference kept in the train state (its initial weights, or another run's);
  * label smoothing, Gaussian input noise, dropout,
    hidden-unit noise and stochastic depth are applied where they act (lib/training/steps.py,
    lib/model/layers.py).

Their ranges and off values are declared once, in lib/core/factors.py. The `params`
and `loss` regularizers register here (`register`) and the train step applies
every one the config turns on, in registration order.
"""
from typing import Callable, List, NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp

from lib.core import factors
from lib.training import optim


class Transform(NamedTuple):
  """A regularizer of a factor whose site (lib/core/factors.py) is `params` or `loss`."""
  name: str          # also the name of its random stream (lib/training/state.py:stream)
  site: str
  keys: Tuple[str, ...]  # the factors that put it in the program
  always: bool       # in every program (its strength 0 is exact)
  fn: Callable


# params: fn(key, params, hp) -> params, applied in this order to the weights of
#   the training forward pass (not to the weights that are updated);
# loss: fn(params, decay_mask, model_state, hp) -> a penalty added to the loss, in
#   this order (model_state: the collections the forward pass returned).
TRANSFORMS: List[Transform] = []


def register(name: str, keys: Sequence[str], site: str, always: bool = False):
  """Decorator: `fn` is the `params` or `loss` regularizer of factors `keys`."""
  assert site in ('params', 'loss'), site
  for k in keys:
    assert factors.FACTORS[k].site == site, (k, site)
  def wrap(fn):
    TRANSFORMS.append(Transform(name, site, tuple(keys), always, fn))
    return fn
  return wrap


def unregister(name: str) -> None:
  TRANSFORMS[:] = [t for t in TRANSFORMS if t.name != name]


def active(config, site: str) -> List[Transform]:
  """The regularizers of `site` that `config` puts in the program, in order."""
  return [t for t in TRANSFORMS if t.site == site and (
      t.always or any(factors.on(config, k) for k in t.keys))]


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


def tie_penalty(params, anchor, mask):
  """1/2 sum (w - w_ref)^2 over the masked leaves (multiply by lambda): L2-SP (Li et
  al. 2018), the penalty between a model's weights and a reference's. Its gradient
  is w - w_ref (the reference is not trained: the step differentiates the params only)."""
  leaves = [0.5 * jnp.sum(jnp.square((p - a).astype(jnp.promote_types(p.dtype, jnp.float32))))
            for p, a, m in zip(jax.tree.leaves(params), jax.tree.leaves(anchor),
                               jax.tree.leaves(mask)) if m]
  return sum(leaves) if leaves else jnp.zeros((), jnp.float32)


def _per_leaf(fn, key, params, mask):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, max(len(leaves), 1))
  out = [fn(k, p) if m else p for k, p, m in zip(keys, leaves, jax.tree.leaves(mask))]
  return jax.tree.unflatten(treedef, out)


@register('l2', ['regularize.l2'], 'loss', always=True)
def _l2(params, decay, model_state, hp):
  return hp['l2'] * optim.l2_penalty(params, decay)


@register('l1', ['regularize.l1'], 'loss')
def _l1(params, decay, model_state, hp):
  return hp['l1'] * l1_penalty(params, decay)


@register('activation_l1', ['regularize.activation_l1'], 'loss')
def _activation_l1(params, decay, model_state, hp):
  """The models sow sum|h| / batch of each hidden activation (lib/model/layers.py)."""
  return hp['activation_l1'] * sum(jax.tree.leaves(model_state['losses']))


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


# Noise first: a weight DropConnect drops is exactly 0.
register('noise_weight', ['regularize.noise_weight'], 'params')(
    lambda key, params, hp: weight_noise(key, params, hp['noise_weight']))
register('dropconnect', ['regularize.dropconnect'], 'params')(
    lambda key, params, hp: dropconnect(key, params, hp['dropconnect']))
