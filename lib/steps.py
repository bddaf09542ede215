"""The train state and the compiled train / eval steps.

The state is one pytree. Per step: key = fold_in(state.rng, state.step), then
one named fold_in per consumer (augment, dropout), so every random draw is a
function of (seed, step) alone, not of the number of devices. The batch is
gathered on device from the resident dataset by this epoch's permutation.
"""
from typing import Any, Callable, Dict

import flax
import jax
import jax.numpy as jnp
import optax

from lib import augment, optim, sharding

# Named streams split off each step's key; add new consumers at the end.
RNG_STREAMS = {'augment': 0, 'dropout': 1}


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # raw uint32[2] key: the run's root for per-step randomness


def stream(key, name: str):
  return jax.random.fold_in(key, RNG_STREAMS[name])


def init_state(model, tx_build, hparams, seed: int, image_shape) -> TrainState:
  root = jax.random.PRNGKey(seed)
  init_key, train_key = jax.random.split(root)
  variables = model.init(init_key, jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False)
  params = variables['params']
  tx = tx_build(hparams)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}),
                    opt_state=tx.init(params), rng=train_key)


def normalize(images_uint8, mean, std):
  return (images_uint8.astype(jnp.float32) / 255.0 - mean) / std


def zero_sums() -> Dict[str, jax.Array]:
  """Running train metrics, kept on device between evaluations (no host sync)."""
  return {'loss': jnp.zeros((), jnp.float32), 'correct': jnp.zeros((), jnp.float32),
          'examples': jnp.zeros((), jnp.float32), 'steps': jnp.zeros((), jnp.float32),
          'first_nonfinite_step': jnp.full((), -1, jnp.int32)}


def make_train_step(model, tx_build, config, mesh, mean, std, num_classes: int,
                    steps_per_epoch: int) -> Callable:
  """train_step(state, hparams, images, labels, epoch_indices, sums) -> (state, sums)."""
  aug_config = config.augment
  decay_all = config.regularize.decay_all_params
  batch_sharding = sharding.sharded_along(mesh, 4)

  def train_step(state, hp, images, labels, epoch_indices, sums):
    idx = jax.lax.dynamic_index_in_dim(epoch_indices, state.step % steps_per_epoch, keepdims=False)
    x = images[idx].astype(jnp.float32) / 255.0
    x = jax.lax.with_sharding_constraint(x, batch_sharding)
    y = labels[idx]
    key = jax.random.fold_in(state.rng, state.step)
    x = augment.apply(stream(key, 'augment'), x, aug_config)
    x = (x - mean) / std
    targets = jax.nn.one_hot(y, num_classes)

    def loss_fn(params):
      logits, new_vars = model.apply(
          {'params': params, 'batch_stats': state.batch_stats}, x, train=True,
          rngs={'dropout': stream(key, 'dropout')}, mutable=['batch_stats'])
      data_loss = optax.softmax_cross_entropy(logits, targets).mean()
      penalty = hp['l2'] * optim.l2_penalty(params, optim.decay_mask(params, decay_all))
      return data_loss + penalty, (data_loss, logits, new_vars.get('batch_stats', {}))

    (total, (data_loss, logits, batch_stats)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx_build(hp).update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                              batch_stats=batch_stats, opt_state=opt_state)
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

  return train_step


def make_eval_step(model, mean, std, tta: str = 'none') -> Callable:
  """eval_step(state, images, labels, idx, mask) -> sums of loss, correct, count.

  tta='flip' averages the softmax of each image and its mirror image.
  """
  def predict(state, x):
    return model.apply({'params': state.params, 'batch_stats': state.batch_stats}, x, train=False)

  def eval_step(state, images, labels, idx, mask):
    x = normalize(images[idx], mean, std)
    y = labels[idx]
    logits = predict(state, x)
    if tta == 'flip':
      probs = 0.5 * (jax.nn.softmax(logits) + jax.nn.softmax(predict(state, x[:, :, ::-1, :])))
      log_probs = jnp.log(jnp.maximum(probs, 1e-30))
    else:
      log_probs = jax.nn.log_softmax(logits)
    loss = -jnp.take_along_axis(log_probs, y[:, None], axis=-1)[:, 0]
    correct = jnp.argmax(log_probs, -1) == y
    m = mask.astype(jnp.float32)
    return {'loss': jnp.sum(loss * m), 'correct': jnp.sum(correct * m), 'count': jnp.sum(m)}

  return eval_step
