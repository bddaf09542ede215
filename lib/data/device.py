"""A dataset's splits resident on a device mesh, and the order training reads them.

The train step gathers its batch on device from the whole training split, by
index: `epoch_permutation` is this epoch's shuffle, a function of (seed, epoch)
alone, so a resumed run reads the same batches on any number of devices.
Evaluation scans a split in fixed, padded batches (`DeviceSplits.eval_inputs`).
`TRAIN_EVAL` is a fixed subset of the training split, evaluated like val.

This is the in-memory input path: every split is uploaded once and stays on the
devices. Data that does not fit needs a streaming path beside it.
"""
from typing import Dict

import numpy as np

from lib.core import sharding
from lib.core.errors import UserError

# The evaluation split of a fixed training subset (Dataset.train_eval_indices), kept
# on device as a split of its own.
TRAIN_EVAL = 'train_eval'


def epoch_permutation(seed: int, epoch: int, n: int, steps_per_epoch: int, batch_size: int):
  """(steps_per_epoch, batch_size) example indices: a fresh shuffle every epoch,
  a function of (seed, epoch) only (the remainder of n is dropped)."""
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  return perm[:steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size).astype(np.int32)


def steps_per_epoch(config, dataset) -> int:
  """Full batches in an epoch (the remainder of the training split is dropped)."""
  b = config.train.batch_size
  n = len(dataset.train[1]) // b
  if n == 0:
    raise UserError(f'train.batch_size={b} exceeds the {len(dataset.train[1])} training '
                    'images; lower it')
  return n


class DeviceSplits:
  """`dataset`'s splits on `mesh` (replicated), uploaded on first use, and the
  fixed padded evaluation batches of `eval_batch_size` (rounded up to a multiple
  of the data axis). Per-object caches: dropping it frees its device arrays."""

  def __init__(self, dataset, mesh, eval_batch_size: int):
    self.dataset, self.mesh = dataset, mesh
    self.rep = sharding.replicated(mesh)
    n = mesh.shape[sharding.DATA]   # the batch is split over the data axis only
    self.eval_batch = -(-eval_batch_size // n) * n
    self._on_device: Dict[str, tuple] = {}
    self._eval_batches: Dict[str, tuple] = {}

  def split(self, name: str):
    """(images, labels) of split `name` on the devices."""
    if name not in self._on_device:
      if name == TRAIN_EVAL:   # its own copy, shaped like val: the same compiled evaluation
        images, labels = self.dataset.split('train')
        members = self.dataset.train_eval_indices()
        images, labels = images[members], labels[members]
      else:
        images, labels = self.dataset.split(name)
      self._on_device[name] = (sharding.to_global(images, self.rep),
                               sharding.to_global(labels, self.rep))
    return self._on_device[name]

  def epoch_indices(self, seed: int, epoch: int, steps: int, batch_size: int):
    """This epoch's (steps, batch) indices, each step's batch split over the data axis."""
    idx = epoch_permutation(seed, epoch, len(self.dataset.train[1]), steps, batch_size)
    return sharding.to_global(idx, sharding.sharded_along(self.mesh, 2, axis=1))

  def eval_inputs(self, split: str):
    """(images, labels, idx, mask) of a split: its images on device and its fixed
    padded batches, uploaded once. TRAIN_EVAL's subset is a split of its own on
    device, as large as val (where the training split allows): the same shapes, so
    it runs val's compiled evaluation, not one of its own."""
    images, labels = self.split(split)
    if split not in self._eval_batches:
      n = int(labels.shape[0])
      padded = np.arange(-(-n // self.eval_batch) * self.eval_batch).reshape(-1, self.eval_batch)
      mask = padded < n
      idx = np.where(mask, padded, 0).astype(np.int32)
      rows = sharding.sharded_along(self.mesh, 2, axis=1)
      self._eval_batches[split] = (sharding.to_global(idx, rows), sharding.to_global(mask, rows))
    return (images, labels) + self._eval_batches[split]
