"""Config pieces the ablation modules share (configs only, no logic beyond parsing `arg`).

Every ablation module takes `arg` = comma-separated words: `local` sizes it for 2 CPU
cores on the CIFAR-10 subset kept beside the repo (../shared/data); without it the
module is the full-size GPU/TPU experiment on TFDS cifar10.
"""
from experiments import cifar10_resnet


def words(arg, allowed=()):
  """The words of `arg`; anything not in ('local', *allowed) fails naming the valid ones."""
  out = [w for w in (arg or '').split(',') if w]
  for w in out:
    if w not in ('local', *allowed):
      raise ValueError(f'unknown variant {w!r}; valid: {", ".join(("local", *allowed))}')
  return out


def cifar(arg, allowed=(), epochs=160):
  """(config, words): ResNet-20 on CIFAR-10 (crop + flip, momentum, cosine, L2 5e-4) for
  `epochs`; with `local`: the CIFAR-10 subset, 10 epochs (2-3 minutes per run on 2 CPU
  cores)."""
  w = words(arg, allowed)
  c = cifar10_resnet.get_config('local' if 'local' in w else None)
  c.train.epochs = 10 if 'local' in w else epochs
  if 'local' in w:
    c.train.log_every = 100
  return c, w


def seeds(arg, allowed=()):
  """2 seeds for a local run, 3 at full size."""
  return 2 if 'local' in words(arg, allowed) else 3
