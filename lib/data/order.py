"""The order training reads a split: a fresh shuffle every epoch, a function of
(seed, epoch) alone, so a resumed run reads the same batches on any number of
devices or processes, whichever input pipeline feeds it. numpy only (grain
workers import it).

With `data.bootstrap` (bagging) a run reads its own bootstrap resample of the
training split instead of the split itself: n indices drawn with replacement,
a function of the seed alone (the same in every epoch), and each epoch's shuffle
permutes the positions of that resample."""
import numpy as np

# The bootstrap's random stream: entropy (seed, BOOTSTRAP_STREAM, 1), three words no
# epoch's (seed, epoch) reaches (numpy's SeedSequence pads a short entropy with zeros).
BOOTSTRAP_STREAM = 0x626F6F74   # 'boot'


def bootstrap_sample(seed: int, n: int) -> np.ndarray:
  """(n,) indices of [0, n) drawn uniformly with replacement: the resample a run of
  this seed trains on (about 1 - 1/e = 63.2% of the examples appear in it)."""
  return np.random.default_rng([seed, BOOTSTRAP_STREAM, 1]).integers(0, n, n)


def epoch_permutation(seed: int, epoch: int, n: int, steps_per_epoch: int, batch_size: int,
                      bootstrap: bool = False):
  """(steps_per_epoch, batch_size) example indices: a fresh shuffle every epoch,
  a function of (seed, epoch) only (the remainder of n is dropped); with
  `bootstrap`, the shuffle of the seed's bootstrap resample (`bootstrap_sample`)."""
  perm = np.random.default_rng([seed, epoch]).permutation(n)
  if bootstrap:
    perm = bootstrap_sample(seed, n)[perm]
  return perm[:steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size).astype(np.int32)
