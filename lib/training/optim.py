"""Optax optimizers and learning-rate schedules built from the config.

The update is `-lr * schedule(step) * (direction(grad) + wd * w)`:
  * direction: the optimizer's preconditioned gradient (momentum, Adam, ...), times
    optim.norm_lr_scale on the normalization layers' offsets and scales (`norm_mask`);
  * wd: decoupled weight decay (AdamW style). It equals an L2 penalty lambda = wd
    for plain SGD only: L2's gradient goes through the direction, so under
    momentum beta it accumulates to lambda / (1 - beta) per step, and under Adam it
    is rescaled per coordinate;
  * schedule: a multiplier with peak 1.0, so `optim.lr` is always the peak rate.
The L2 penalty (lambda/2 * sum w^2) is a loss term, see `l2_penalty`. The frozen
whitening filters (model.whiten_init=patch, `frozen_mask`) get a zero update. With
optim.lookahead = k the whole update is Lookahead's fast step (`lookahead`): every k
steps the slow weights move towards the fast ones, which restart from them.

Continuous strengths (lr, weight_decay, l2, norm_lr_scale, lookahead_alpha) are
*arrays* in `hparams`, passed to the compiled step, so one program serves any value
(and later many arms). The chain is rebuilt inside the step from those arrays; its
state structure does not depend on them (only on which factors are on).
"""
import numbers
from typing import Any, Callable, Dict, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lib.core import factors
from lib.core.errors import UserError
from lib.core.registry import Registry
from lib.model.whitening import LAYER as WHITEN_LAYER

OPTIMIZERS = Registry('optimizer', 'optim.name')
SCHEDULES = Registry('schedule', 'schedule.name')

OPTIMIZERS.add('sgd', lambda c: optax.identity())
OPTIMIZERS.add('momentum', lambda c: optax.trace(decay=c.momentum))
OPTIMIZERS.add('nesterov', lambda c: optax.trace(decay=c.momentum, nesterov=True))
OPTIMIZERS.add('adagrad', lambda c: optax.scale_by_rss(initial_accumulator_value=0.1, eps=1e-7))
OPTIMIZERS.add('rmsprop', lambda c: optax.scale_by_rms(decay=c.rms_decay, eps=c.eps))
OPTIMIZERS.add('adam', lambda c: optax.scale_by_adam(b1=c.b1, b2=c.b2, eps=c.eps))
# AdamW is Adam plus optim.weight_decay, which is decoupled for every optimizer.
OPTIMIZERS.add('adamw', lambda c: optax.scale_by_adam(b1=c.b1, b2=c.b2, eps=c.eps))


# Each schedule maps (config.schedule, steps after warmup, warmup steps, steps per
# epoch) to a multiplier of the peak rate that starts at 1.0.
SCHEDULES.add('constant', lambda c, n, w, e: optax.constant_schedule(1.0))
SCHEDULES.add('cosine', lambda c, n, w, e: optax.cosine_decay_schedule(
    1.0, decay_steps=max(n, 1), alpha=c.final_fraction))
SCHEDULES.add('linear', lambda c, n, w, e: optax.linear_schedule(1.0, c.final_fraction,
                                                                 max(n, 1)))
def _step_schedule(c, n, w, e):
  # Milestones are epochs (milestone_epochs, when given) or fractions of all training
  # (milestone_fractions), both counted from the start, warmup included; the main
  # schedule counts from the end of warmup. Milestones landing on one step compound.
  at = ([m * e for m in c.milestone_epochs] if c.milestone_epochs
        else [f * (n + w) for f in c.milestone_fractions])
  scales = {}
  for step in at:
    boundary = max(int(round(step)) - w, 0)
    scales[boundary] = scales.get(boundary, 1.0) * c.factor
  return optax.piecewise_constant_schedule(1.0, scales)


SCHEDULES.add('step', _step_schedule)


def _inverse_sqrt_schedule(c, n, w, e):
  # sqrt(tau / (t + tau)), t counted from the end of warmup: alpha_0 / sqrt(t) of the
  # absolute step when tau is the warmup length. Without warmup tau is one epoch, so
  # the rate halves over 3 epochs rather than falling to 1/sqrt(t+1) (0.05 of the
  # peak after a CIFAR epoch, a strawman).
  tau = float(max(w if w > 0 else e, 1))
  return lambda count: jnp.sqrt(tau / (count + tau))


SCHEDULES.add('inverse_sqrt', _inverse_sqrt_schedule)


def schedule(schedule_config, total_steps: int, steps_per_epoch: int) -> Callable:
  """The learning-rate multiplier as a function of the step (peak 1.0)."""
  if schedule_config.warmup_epochs < 0:
    raise UserError(f'schedule.warmup_epochs={schedule_config.warmup_epochs} must be >= 0')
  _check_milestone_epochs(schedule_config, total_steps / steps_per_epoch)
  warmup = int(round(schedule_config.warmup_epochs * steps_per_epoch))
  if warmup >= total_steps and warmup > 0:
    raise UserError(f'schedule.warmup_epochs={schedule_config.warmup_epochs} is not '
                    f'shorter than training ({total_steps} steps)')
  main = SCHEDULES.get(schedule_config.name).fn(schedule_config, total_steps - warmup, warmup,
                                                steps_per_epoch)
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup), main], [warmup])


def _check_milestone_epochs(c, epochs: float) -> None:
  """schedule.milestone_epochs: for the step schedule, each inside training."""
  if not c.milestone_epochs:
    return
  given = ', '.join(str(m) for m in c.milestone_epochs)
  if c.name != 'step':
    raise UserError(f'schedule.milestone_epochs=({given}) is read by schedule.name=step only, '
                    f'not {c.name}; set schedule.name=step or leave it empty')
  if not all(isinstance(m, numbers.Real) and not isinstance(m, bool) and 0 < m < epochs
             for m in c.milestone_epochs):
    raise UserError(f'schedule.milestone_epochs=({given}) must each lie inside training, '
                    f'in (0, {epochs:g}) epochs')


def decay_mask(params, decay_all: bool = False):
  """True for the leaves that L2 and weight decay act on: conv/dense kernels
  (not biases or normalization scale/offset) unless decay_all."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: decay_all or getattr(path[-1], 'key', None) == 'kernel', params)


def norm_mask(params):
  """True for the offsets ('bias') and scales of normalization layers (a module whose
  name says Norm: BatchNorm_0, LayerNorm_1, GroupNorm_0): what optim.norm_lr_scale
  multiplies."""
  def is_norm(path, _):
    keys = [str(getattr(p, 'key', '')) for p in path]
    return len(keys) >= 2 and keys[-1] in ('bias', 'scale') and 'Norm' in keys[-2]
  return jax.tree_util.tree_map_with_path(is_norm, params)


def frozen_mask(params):
  """True for the kernel of the whitening layer (model.whiten_init=patch): never trained."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: [getattr(p, 'key', None) for p in path] == [WHITEN_LAYER, 'kernel'],
      params)


class LookaheadState(NamedTuple):
  inner: Any   # optax.lookahead's state: the wrapped update's, and the steps since a sync
  slow: Any    # the slow weights


def lookahead(inner: optax.GradientTransformation, sync_period: int,
              alpha) -> optax.GradientTransformation:
  """optax.lookahead (Zhang et al. 2019) around `inner`, with the slow weights kept in
  the optimizer state: the params stay the fast weights alone (optax's update takes
  LookaheadParams(fast, slow) as its params). Every `sync_period` steps, after the fast
  step, slow += alpha * (fast - slow) and the fast weights become the slow ones."""
  wrapped = optax.lookahead(inner, sync_period, alpha)

  def init(params):
    return LookaheadState(wrapped.init(optax.LookaheadParams.init_synced(params)), params)

  def update(updates, state, params):
    both, inner_state = wrapped.update(updates, state.inner,
                                       optax.LookaheadParams(fast=params, slow=state.slow))
    return both.fast, LookaheadState(inner_state, optax.apply_updates(state.slow, both.slow))

  return optax.GradientTransformation(init, update)


def l2_penalty(params, mask):
  """sum(w^2) / 2 over the masked leaves (multiply by lambda)."""
  leaves = [jnp.sum(jnp.square(p.astype(jnp.promote_types(p.dtype, jnp.float32))))
            for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m]
  return 0.5 * sum(leaves) if leaves else jnp.zeros((), jnp.float32)


def hparams(config) -> Dict[str, np.ndarray]:
  """The optimizer's continuous strengths (lr, weight_decay), validated: the
  factors of site `optimizer` in lib/core/factors.py."""
  out = factors.hparams(config)
  return {f.field: out[f.field] for f in factors.traced() if f.site == 'optimizer'}


def make(config, total_steps: int, steps_per_epoch: int):
  """Returns (build(hparams) -> optax.GradientTransformation, schedule)."""
  multiplier = schedule(config.schedule, total_steps, steps_per_epoch)
  decay_all = config.regularize.decay_all_params
  direction = OPTIMIZERS.get(config.optim.name).fn
  clip = config.optim.clip_norm
  norm_scaled = factors.on(config, 'optim.norm_lr_scale')
  frozen = config.model.whiten_init == 'patch'
  sync_period = config.optim.lookahead

  def build(hp) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(clip)] if clip > 0 else []
    parts.append(direction(config.optim))
    if norm_scaled:   # their rate times the scale; decoupled decay is not scaled
      parts.append(optax.masked(optax.scale(hp['norm_lr_scale']), norm_mask))
    parts += [
        optax.add_decayed_weights(hp['weight_decay'], mask=lambda p: decay_mask(p, decay_all)),
        optax.scale_by_learning_rate(lambda count: hp['lr'] * multiplier(count)),
    ]
    if frozen:
      parts.append(optax.masked(optax.set_to_zero(), frozen_mask))
    chain = optax.chain(*parts)
    return lookahead(chain, sync_period, hp['lookahead_alpha']) if sync_period else chain

  return build, multiplier
