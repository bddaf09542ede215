"""The device mesh and how host arrays become global jax.Arrays on it.

One mesh axis, `data`, over every device of every process (AxisType.Auto, so
Linen's dropout and BatchNorm work unchanged): the batch is split along it and
the train state is replicated. Under jit the BatchNorm batch mean is a global
reduction, so its statistics are over the whole global batch.
"""
import os
from typing import List, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA = 'data'
ARMS = 'arms'   # the arm axis of a vectorized sweep (lib/training/vector_engine.py)


_INITIALIZED = False


def initialize_distributed(mode: str = 'auto', coordinator: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """Joins this process to a multi-process job through jax.distributed.initialize().

  Explicit `coordinator` (host:port), `num_processes` and `process_id` (or those a
  `--processes=N` launcher gave its children, lib/core/distributed.py) are passed
  on; 'auto' also joins when SLURM / Open MPI report several tasks or a coordinator
  address is set (JAX then reads the cluster from the environment). 'off' never
  joins. Gloo carries the collectives of CPU devices across processes (the setting
  only concerns the CPU backend, so it is harmless on GPUs). A finite heartbeat
  timeout (lib/core/distributed.py:heartbeat_timeout_s) ends the others when one
  process dies, where no launcher of ours watches them.
  """
  global _INITIALIZED
  if mode == 'off' or _INITIALIZED:
    return
  from lib.core import distributed
  if coordinator is None and distributed.spawned():
    coordinator, num_processes, process_id = distributed.spawned()
  many = any(int(os.environ.get(k, '1')) > 1 for k in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'))
  if mode == 'on' or coordinator or many or os.environ.get('JAX_COORDINATOR_ADDRESS'):
    if jax.config.jax_cpu_collectives_implementation != 'mpi':   # gloo unless MPI was chosen
      jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    explicit = {}
    if coordinator:
      explicit = {'coordinator_address': coordinator, 'num_processes': num_processes,
                  'process_id': process_id}
    jax.distributed.initialize(heartbeat_timeout_seconds=distributed.heartbeat_timeout_s(),
                               **explicit)
    _INITIALIZED = True
    distributed.watch_launcher()


def joined() -> bool:
  """Whether this process is one of several joined by initialize_distributed."""
  return _INITIALIZED and jax.process_count() > 1


def agree(values):
  """Process 0's `values` (a list of numbers or booleans) on every process of a job
  joined by initialize_distributed; as they are otherwise, without starting the
  accelerator backend (a sweep that only spawns workers leaves the GPUs alone). For
  decisions read from the filesystem or the clock, which processes may see at
  different moments: every process must make process 0's, or they run different
  programs."""
  if not _INITIALIZED or jax.process_count() == 1:
    return values
  from jax.experimental import multihost_utils
  given = np.asarray(values)
  # Sent as 32-bit words: without jax_enable_x64 a 64-bit number would be cut to 32
  # bits on its way (a memory budget of 6 GiB arrived as -2 GiB).
  wide = given.reshape(-1).astype(np.float64 if given.dtype.kind == 'f' else np.int64)
  words = multihost_utils.broadcast_one_to_all(wide.view(np.int32))
  out = np.asarray(words, np.int32).view(wide.dtype).reshape(given.shape)
  return (out.astype(bool) if given.dtype.kind == 'b' else out).tolist()


def gather_text(text: str, limit: int = 16384) -> List[str]:
  """Every process's `text` (UTF-8, cut to `limit` bytes), in process order, on every
  process of a job joined by initialize_distributed; [text] in a single process."""
  if not _INITIALIZED or jax.process_count() == 1:
    return [text]
  from jax.experimental import multihost_utils
  data = text.encode()[:limit]
  buf = np.zeros(limit + 4, np.uint8)   # the length, then the bytes
  buf[:4] = np.frombuffer(np.uint32(len(data)).tobytes(), np.uint8)
  buf[4:4 + len(data)] = np.frombuffer(data, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(-1, limit + 4)
  out = []
  for row in rows:
    n = int(np.frombuffer(row[:4].tobytes(), np.uint32)[0])
    out.append(row[4:4 + n].tobytes().decode(errors='replace'))
  return out


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
