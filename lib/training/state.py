"""The train state and its randomness.

The state is one pytree (`TrainState`): step, params, batch_stats, opt_state,
the run's root key and, with train.ema_decay on, the moving average of the params
and batch statistics (`ema`), with regularize.tie_l2 on the reference the weights
are tied to (`anchor`); each None when off, so such a state is what it always was. Per step: key = fold_in(state.rng, state.step), then one
named fold_in per consumer (`stream`: augment, dropout, ...), so every random
draw is a function of (seed, step) alone, not of the number of devices.
"""
import zlib
from typing import Any, Dict

import flax
import jax
import jax.numpy as jnp
import numpy as np

from lib.model.whitening import LAYER as WHITEN_LAYER

# Named streams split off each step's key; add new consumers at the end.
RNG_STREAMS = {'augment': 0, 'dropout': 1, 'noise': 2, 'drop_path': 3, 'mix': 4,
               'noise_input': 5, 'dropconnect': 6, 'noise_weight': 7, 'fmp': 8,
               'rotation': 9}


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array  # raw uint32[2] key: the run's root for per-step randomness
  # {'params', 'batch_stats'}: their exponential moving average (train.ema_decay), or None.
  ema: Any = None
  # The params that regularize.tie_l2 ties the weights to (their reference), or None.
  anchor: Any = None


# Keys fixed for a whole run rather than drawn per step (the parity of each example's
# alternating flip): the run's key folded with a number no step reaches.
RUN_STREAMS = {'flip_parity': 0xFFFFFFFF}


def run_stream(rng, name: str):
  """The run's key `rng` (TrainState.rng) for the whole-run stream `name`."""
  return jax.random.fold_in(rng, np.uint32(RUN_STREAMS[name]))


def stream(key, name: str):
  """The step key's stream `name`. A name not in RNG_STREAMS (a regularizer
  registered later) gets a number from its name, so it leaves the others alone."""
  number = RNG_STREAMS.get(name)
  if number is None:
    number = 1000 + zlib.crc32(name.encode()) % (1 << 20)
  return jax.random.fold_in(key, number)


def init_state(model, tx_build, hparams, seed: int, image_shape, ema: bool = False,
               tie: bool = False, reference=None, whitening=None) -> TrainState:
  """The state at step 0; with `ema` its moving average starts at the initial weights;
  with `tie` its anchor is `reference` (params of the same shapes), or the initial
  weights where that is None (regularize.tie_to=init); `whitening` (model.whiten_init=patch,
  lib/model/whitening.py) replaces the kernel of the model's whitening layer."""
  root = jax.random.PRNGKey(seed)
  init_key, train_key = jax.random.split(root)
  variables = model.init(init_key, jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False)
  params = variables['params']
  if whitening is not None:
    layer = params[WHITEN_LAYER]
    if tuple(whitening.shape) != tuple(layer['kernel'].shape):
      raise ValueError(f'whitening kernel {tuple(whitening.shape)} does not fit the layer '
                       f'{tuple(layer["kernel"].shape)}')
    params = {**params, WHITEN_LAYER: {**layer, 'kernel': jnp.asarray(whitening,
                                                                      layer['kernel'].dtype)}}
  batch_stats = variables.get('batch_stats', {})
  tx = tx_build(hparams)
  average = {'params': params, 'batch_stats': batch_stats} if ema else None
  anchor = (params if reference is None else reference) if tie else None
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
                    opt_state=tx.init(params), rng=train_key, ema=average, anchor=anchor)


def has_ema(config) -> bool:
  return config.train.ema_decay > 0


def has_anchor(config) -> bool:
  return config.regularize.tie_l2 > 0


def ema_decay(decay, warmup: str, update):
  """The decay of update number `update` (1-based): `decay`, or with warmup `timm`
  (timm's ModelEmaV3, gamma 1, power 2/3) min(decay, 1 - update^(-2/3)), 0 at the first."""
  if warmup == 'none':
    return decay
  return jnp.minimum(decay, 1.0 - jnp.asarray(update, jnp.float32) ** (-2.0 / 3.0))


def update_ema(average, params, batch_stats, decay):
  """ema = decay * ema + (1 - decay) * new, for the params and the batch statistics."""
  new = {'params': params, 'batch_stats': batch_stats}
  return jax.tree.map(lambda a, w: (decay * a + (1.0 - decay) * w).astype(a.dtype), average, new)


def ema_view(state: TrainState, weights: str = 'ema') -> TrainState:
  """The state with its moving average in place of the params and batch statistics
  (`weights='raw'`: the state itself), so evaluating it evaluates the average."""
  if weights == 'raw':
    return state
  return state.replace(params=state.ema['params'], batch_stats=state.ema['batch_stats'])


def zero_sums() -> Dict[str, jax.Array]:
  """Running train metrics, kept on device between evaluations (no host sync)."""
  return {'loss': jnp.zeros((), jnp.float32), 'correct': jnp.zeros((), jnp.float32),
          'examples': jnp.zeros((), jnp.float32), 'steps': jnp.zeros((), jnp.float32),
          'first_nonfinite_step': jnp.full((), -1, jnp.int32)}
