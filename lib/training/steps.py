"""The train state and the compiled train / eval steps.

The state is one pytree. Per step: key = fold_in(state.rng, state.step), then
one named fold_in per consumer (augment, dropout), so every random draw is a
function of (seed, step) alone, not of the number of devices. The batch is
gathered on device from the resident dataset by this epoch's permutation.
"""
import zlib
from typing import Any, Callable, Dict

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lib.core import factors, sharding
from lib.training import augment, losses, optim, regularize

# Named streams split off each step's key; add new consumers at the end.
RNG_STREAMS = {'augment': 0, 'dropout': 1, 'noise': 2, 'drop_path': 3, 'mix': 4,
               'noise_input': 5, 'dropconnect': 6, 'noise_weight': 7}


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # raw uint32[2] key: the run's root for per-step randomness


def stream(key, name: str):
  """The step key's stream `name`. A name not in RNG_STREAMS (a regularizer
  registered later) gets a number from its name, so it leaves the others alone."""
  number = RNG_STREAMS.get(name)
  if number is None:
    number = 1000 + zlib.crc32(name.encode()) % (1 << 20)
  return jax.random.fold_in(key, number)


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


def hparams(config) -> Dict[str, np.ndarray]:
  """Every continuous strength of `config` (the traced factors of lib/core/factors.py:
  optimizer, regularizers, augmentations) as a float32 scalar: the compiled step
  takes them as arrays."""
  return factors.hparams(config)


def hparam_config_keys() -> Dict[str, str]:
  """hparams name -> the config key it comes from (e.g. 'dropout' -> 'regularize.dropout')."""
  return factors.hparam_keys()


def make_train_step(model, tx_build, config, mesh, mean, std, num_classes: int,
                    steps_per_epoch: int) -> Callable:
  """train_step(state, hparams, images, labels, epoch_indices, sums) -> (state, sums).

  Per step: gather the batch; pixel-space augmentations; normalize; cutout;
  mixup / cutmix; (FGSM) adversarial inputs; input noise; then the loss
  (train.loss on label-smoothed targets) + L2 + L1 + activation L1 penalties
  on a forward pass with DropConnect / weight noise on the kernels and dropout,
  hidden noise and stochastic depth inside the model.
  """
  aug, reg = config.augment, config.regularize
  on = lambda field: factors.on(config, f'regularize.{field}')
  param_transforms = regularize.active(config, 'params')
  penalties = regularize.active(config, 'loss')
  loss_name = config.train.loss
  decay = lambda params: optim.decay_mask(params, reg.decay_all_params)
  batch_sharding = sharding.sharded_along(mesh, 4)
  lo, hi = (0.0 - mean) / std, (1.0 - mean) / std   # the pixel range, normalized

  def train_step(state, hp, images, labels, epoch_indices, sums):
    idx = jax.lax.dynamic_index_in_dim(epoch_indices, state.step % steps_per_epoch, keepdims=False)
    x = images[idx].astype(jnp.float32) / 255.0
    x = jax.lax.with_sharding_constraint(x, batch_sharding)
    y = labels[idx]
    key = jax.random.fold_in(state.rng, state.step)
    x = augment.apply(stream(key, 'augment'), x, aug, hp, 'pixel')
    x = (x - mean) / std
    x = augment.apply(stream(key, 'augment'), x, aug, hp, 'normalized')
    targets = jax.nn.one_hot(y, num_classes)
    x, targets = augment.mix(stream(key, 'mix'), x, targets, aug, hp)
    if on('label_smoothing'):
      targets = losses.smooth(targets, hp['label_smoothing'])
    rngs = {name: stream(key, name) for name in ('dropout', 'noise', 'drop_path')}
    mutable = ['batch_stats'] + (['losses'] if on('activation_l1') else [])

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

    def loss_fn(params):
      data_loss, (logits, new_vars) = forward(params, x)
      penalty = None
      for t in penalties:   # L2 (always), L1, activation L1, ...
        term = t.fn(params, decay(params), new_vars, hp)
        penalty = term if penalty is None else penalty + term
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
