"""The order training reads a split: a fresh shuffle every epoch, a function of
(seed, epoch) alone, so a resumed run reads the same batches on any number of
devices or processes, whichever input pipeline feeds it. numpy only (grain
workers import it)."""
import numpy as np


def epoch_permutation(seed: int, epoch: int, n: int, steps_per_epoch: int, batch_size: int):
  """(steps_per_epoch, batch_size) example indices: a fresh shuffle every epoch,
  a function of (seed, epoch) only (the remainder of n is dropped)."""
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  return perm[:steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size).astype(np.int32)
