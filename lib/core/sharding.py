"""The device mesh and how host arrays become global jax.Arrays on it.

One mesh axis, `data`, over every device of every process (AxisType.Auto, so
Linen's dropout and BatchNorm work unchanged): the batch is split along it and
the train state is replicated. Under jit the BatchNorm batch mean is a global
reduction, so its statistics are over the whole global batch.
"""
import os
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA = 'data'
ARMS = 'arms'   # the arm axis of a vectorized sweep (lib/training/vector_engine.py)


_INITIALIZED = False


def initialize_distributed(mode: str = 'auto') -> None:
  """Calls jax.distributed.initialize() under a multi-process launcher.

  'auto' does so when SLURM / Open MPI report several tasks or a coordinator
  address is set (JAX then reads the cluster from the environment).
  """
  global _INITIALIZED
  if mode == 'off' or _INITIALIZED:
    return
  many = any(int(os.environ.get(k, '1')) > 1 for k in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'))
  if mode == 'on' or many or os.environ.get('JAX_COORDINATOR_ADDRESS'):
    jax.distributed.initialize()
    _INITIALIZED = True


def is_primary() -> bool:
  """Process 0 of a multi-process job (or the only process). Does not start the
  accelerator backend unless jax.distributed was initialized."""
  return jax.process_index() == 0 if _INITIALIZED else True


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
  devices = list(devices if devices is not None else jax.devices())
  return jax.make_mesh((len(devices),), (DATA,), axis_types=(AxisType.Auto,), devices=devices)


def make_arm_mesh(devices: Sequence[jax.Device], arms: int) -> jax.sharding.Mesh:
  """(arms, data) mesh: `arms` groups of devices, each splitting the batch of its arms."""
  devices = list(devices)
  return jax.make_mesh((arms, len(devices) // arms), (ARMS, DATA),
                       axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def sharded_along(mesh, ndim: int, axis: int = 0) -> NamedSharding:
  spec = [None] * ndim
  spec[axis] = DATA
  return NamedSharding(mesh, P(*spec))


def to_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """Every process holds the same global `x`; each feeds only its own slice
  via make_array_from_process_local_data (multi-host ready)."""
  x = np.asarray(x)
  index_map = sharding.addressable_devices_indices_map(x.shape)
  local = []
  for dim in range(x.ndim):
    starts = [idx[dim].start or 0 for idx in index_map.values()]
    stops = [x.shape[dim] if idx[dim].stop is None else idx[dim].stop for idx in index_map.values()]
    local.append(slice(min(starts), max(stops)))
  return jax.make_array_from_process_local_data(sharding, x[tuple(local)], x.shape)


def check_batch(batch_size: int, mesh, what: str = 'train.batch_size') -> None:
  from lib.core.errors import UserError
  n = mesh.shape[DATA]
  if batch_size % n:
    raise UserError(f'{what}={batch_size} is not divisible by the {n} devices it is split '
                    f'over; use a multiple of {n}')
