"""The compiled train step: the objective, in the order the README states.

The batch is gathered on device from the resident dataset by this epoch's
permutation (`make_train_step`), or comes from the streaming pipeline
(`make_batch_step`, the same step on a given batch); every random draw comes from the step's named streams
(lib/training/state.py). The state, its streams and the evaluation step live in
state.py and eval_step.py; their names are re-exported here.
"""
from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lib.core import factors, sharding
from lib.core.errors import UserError
from lib.training import augment, losses, optim, regularize
from lib.training import state as state_lib
from lib.training.eval_step import TTA, make_eval_step, views  # noqa: F401
from lib.training.state import (RNG_STREAMS, TrainState, init_state, stream,  # noqa: F401
                                zero_sums)

def hparams(config) -> Dict[str, np.ndarray]:
  """Every continuous strength of `config` (the traced factors of lib/core/factors.py:
  optimizer, regularizers, augmentations) as a float32 scalar: the compiled step
  takes them as arrays."""
  return factors.hparams(config)


def hparam_config_keys() -> Dict[str, str]:
  """hparams name -> the config key it comes from (e.g. 'dropout' -> 'regularize.dropout')."""
  return factors.hparam_keys()


def make_train_step(model, tx_build, config, mesh, mean, std, num_classes: int,
                    steps_per_epoch: int, coarse_of_class=None) -> Callable:
  """train_step(state, hparams, images, labels, epoch_indices, sums) -> (state, sums)
  on the resident split: the batch of this step gathered by index, then `make_batch_step`'s."""
  batch_step = make_batch_step(model, tx_build, config, mesh, mean, std, num_classes,
                               coarse_of_class=coarse_of_class)

  def train_step(state, hp, images, labels, epoch_indices, sums):
    idx = jax.lax.dynamic_index_in_dim(epoch_indices, state.step % steps_per_epoch, keepdims=False)
    examples = augment.Examples(idx, state.step // steps_per_epoch,
                                state_lib.run_stream(state.rng, 'flip_parity'))
    return batch_step(state, hp, images[idx], labels[idx], sums, examples)

  return train_step


def rotate_quarters(x, turns):
  """Each image x[i] (NHWC, square) rotated by turns[i] quarter turns counter-clockwise
  (np.rot90 of its H, W axes)."""
  rotated = [x] + [jnp.rot90(x, k, axes=(1, 2)) for k in (1, 2, 3)]
  out = rotated[0]
  for k in (1, 2, 3):
    out = jnp.where((turns == k)[:, None, None, None], rotated[k], out)
  return out


def rotation_task(key, x):
  """(rotated copies, their labels): each image turned by k quarter turns, k drawn
  uniformly from 0..3 per example; k is the copy's label."""
  turns = jax.random.randint(key, (x.shape[0],), 0, 4)
  return rotate_quarters(x, turns), turns


def coarse_matrix_rows(coarse_of_class, config):
  """The coarse class of each class, or one error line where the data has none."""
  if coarse_of_class is None:
    raise UserError(f'regularize.aux_coarse needs coarse labels, which data.source='
                    f'{config.data.source} does not carry (CIFAR-100 from cifar_dir or tfds, '
                    'or an npz with coarse_labels); set regularize.aux_coarse=0')
  mixed = np.flatnonzero(np.asarray(coarse_of_class) == -2)
  if len(mixed):
    raise UserError(f'regularize.aux_coarse: the examples of class {mixed[0]} have several '
                    'coarse labels; each class must belong to one coarse class')
  return np.asarray(coarse_of_class)


def make_batch_step(model, tx_build, config, mesh, mean, std, num_classes: int,
                    host_augmentations=(), coarse_of_class=None) -> Callable:
  """batch_step(state, hparams, batch_images, batch_labels, sums, examples=None) ->
  (state, sums): one step on a uint8 batch (the streaming pipeline's, or one gathered on
  device; `examples`, augment.Examples, says which: the resident step gives it).
  `host_augmentations` were done by the input pipeline and are skipped here;
  `coarse_of_class` (num_classes,) each class's coarse class (regularize.aux_coarse).

  Per step: pixel-space augmentations; normalize; cutout;
  mixup / cutmix; (FGSM) adversarial inputs; input noise; then the loss
  (train.loss on label-smoothed targets) + L2 + L1 + activation L1 + tying penalties
  on a forward pass with DropConnect / weight noise on the kernels and dropout,
  hidden noise and stochastic depth inside the model; the multitask heads'
  losses (regularize.aux_rotation: a second forward pass of the inputs, each
  rotated by k * 90 degrees, k drawn per example from the step's 'rotation'
  stream, its batch statistics discarded; regularize.aux_coarse: the class
  targets, mixed and smoothed, summed per coarse class); after the update, the
  moving average of the weights (train.ema_decay).
  """
  aug, reg = config.augment, config.regularize
  on = lambda field: factors.on(config, f'regularize.{field}')
  param_transforms = regularize.active(config, 'params')
  penalties = regularize.active(config, 'loss')
  loss_name = config.train.loss
  ema, ema_warmup = state_lib.has_ema(config), config.train.ema_warmup
  tie = state_lib.has_anchor(config)
  rotation, coarse = on('aux_rotation'), on('aux_coarse')
  if coarse:
    coarse_targets = jnp.asarray(jax.nn.one_hot(coarse_matrix_rows(coarse_of_class, config),
                                                int(np.max(coarse_of_class)) + 1))
  decay = lambda params: optim.decay_mask(params, reg.decay_all_params)
  batch_sharding = sharding.sharded_along(mesh, 4)
  lo, hi = (0.0 - mean) / std, (1.0 - mean) / std   # the pixel range, normalized

  def batch_step(state, hp, batch_images, y, sums, examples=None):
    x = batch_images.astype(jnp.float32) / 255.0
    x = jax.lax.with_sharding_constraint(x, batch_sharding)
    key = jax.random.fold_in(state.rng, state.step)
    x = augment.apply(stream(key, 'augment'), x, aug, hp, 'pixel', skip=host_augmentations,
                      examples=examples)
    x = (x - mean) / std
    x = augment.apply(stream(key, 'augment'), x, aug, hp, 'normalized', skip=host_augmentations)
    targets = jax.nn.one_hot(y, num_classes)
    x, targets = augment.mix(stream(key, 'mix'), x, targets, aug, hp)
    if on('label_smoothing'):
      targets = losses.smooth(targets, hp['label_smoothing'])
    rngs = {name: stream(key, name) for name in ('dropout', 'noise', 'drop_path')}
    if config.model.pool == 'fractional':   # the pooling regions of this step
      rngs['fmp'] = stream(key, 'fmp')
    mutable = ['batch_stats'] + (['losses'] if on('activation_l1') else []) + (
        ['aux'] if coarse else [])

    def forward(params, inputs):
      for t in param_transforms:   # weight noise, then DropConnect, ...
        params = t.fn(stream(key, t.name), params, hp)
      logits, new_vars = model.apply(
          {'params': params, 'batch_stats': state.batch_stats}, inputs, train=True, hp=hp,
          rngs=rngs, mutable=mutable)
      data_loss = losses.loss(loss_name, logits, targets).mean()
      return data_loss, (logits, new_vars)

    if on('adversarial_eps'):
      x = regularize.fgsm(lambda inputs: forward(state.params, inputs)[0], x,
                          hp['adversarial_eps'], std, lo, hi)
    if on('noise_input'):
      x = x + hp['noise_input'] * jax.random.normal(stream(key, 'noise_input'), x.shape)

    if rotation:   # each example's copy, turned by k quarter turns (k its label)
      x_rotated, turns = rotation_task(stream(key, 'rotation'), x)
      rotated_rngs = {name: stream(key, f'{name}_rotated') for name in rngs}

    def loss_fn(params):
      data_loss, (logits, new_vars) = forward(params, x)
      penalty = None
      for t in penalties:   # L2 (always), L1, activation L1, ...
        term = t.fn(params, decay(params), new_vars, hp)
        penalty = term if penalty is None else penalty + term
      if tie:   # to the reference in the state (regularize.tie_to)
        penalty = penalty + hp['tie_l2'] * regularize.tie_penalty(params, state.anchor,
                                                                  decay(params))
      if coarse:   # the multitask heads' weighted losses
        penalty = penalty + hp['aux_coarse'] * losses.loss(
            'cross_entropy', new_vars['aux']['coarse'][0], targets @ coarse_targets).mean()
      if rotation:   # the shared trunk on the rotated copies; their batch statistics dropped
        transformed = params
        for t in param_transforms:
          transformed = t.fn(stream(key, t.name), transformed, hp)
        _, rotated_vars = model.apply(
            {'params': transformed, 'batch_stats': state.batch_stats}, x_rotated, train=True,
            hp=hp, rngs=rotated_rngs, mutable=['batch_stats', 'aux'])
        penalty = penalty + hp['aux_rotation'] * losses.loss(
            'cross_entropy', rotated_vars['aux']['rotation'][0], jax.nn.one_hot(turns, 4)).mean()
      return data_loss + penalty, (data_loss, logits, new_vars.get('batch_stats', {}))

    (total, (data_loss, logits, batch_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx_build(hp).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                              opt_state=opt_state)
    if ema:   # Polyak averaging of the new weights (the average is never trained)
      d = state_lib.ema_decay(hp['ema_decay'], ema_warmup, state.step + 1)
      new_state = new_state.replace(ema=state_lib.update_ema(state.ema, params, batch_stats, d))
    # Weights that overflow while the loss is still finite are caught at the next
    # evaluation (a non-finite val_loss stops the run before any checkpoint).
    bad = ~jnp.isfinite(total)
    first = sums['first_nonfinite_step']
    sums = {
        'loss': sums['loss'] + data_loss,
        # float32, so XLA merges this sum into the gradient all-reduce (one
        # collective per step instead of two).
        'correct': sums['correct'] + jnp.sum((jnp.argmax(logits, -1) == y).astype(jnp.float32)),
        'examples': sums['examples'] + y.shape[0],
        'steps': sums['steps'] + 1,
        # Counted like checkpoints: the number of steps done when it happened.
        'first_nonfinite_step': jnp.where(bad & (first < 0), state.step + 1, first),
    }
    return new_state, sums

  return batch_step
