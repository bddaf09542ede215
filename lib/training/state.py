"""The train state and its randomness.

The state is one pytree (`TrainState`): step, params, batch_stats, opt_state and
the run's root key. Per step: key = fold_in(state.rng, state.step), then one
named fold_in per consumer (`stream`: augment, dropout, ...), so every random
draw is a function of (seed, step) alone, not of the number of devices.
"""
import zlib
from typing import Any, Dict

import flax
import jax
import jax.numpy as jnp

# Named streams split off each step's key; add new consumers at the end.
RNG_STREAMS = {'augment': 0, 'dropout': 1, 'noise': 2, 'drop_path': 3, 'mix': 4,
               'noise_input': 5, 'dropconnect': 6, 'noise_weight': 7, 'fmp': 8}


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


def zero_sums() -> Dict[str, jax.Array]:
  """Running train metrics, kept on device between evaluations (no host sync)."""
  return {'loss': jnp.zeros((), jnp.float32), 'correct': jnp.zeros((), jnp.float32),
          'examples': jnp.zeros((), jnp.float32), 'steps': jnp.zeros((), jnp.float32),
          'first_nonfinite_step': jnp.full((), -1, jnp.int32)}
