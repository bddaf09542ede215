"""Config pieces the ablation modules share (configs only, no logic beyond parsing `arg`).

Every ablation module takes `arg` = comma-separated words: `local` sizes it for 2 CPU
cores on the CIFAR-10 subset kept beside the repo (../shared/data); without it the
module is the full-size GPU/TPU experiment on TFDS cifar10. Modules that allow `fast`
(mixup, cutout) run on the fast baseline (experiments/fast_cifar.py) instead of
ResNet-20, with more seeds: cheap runs are what make many seeds affordable.
"""
from experiments import cifar10_resnet


def words(arg, allowed=()):
  """The words of `arg`; anything not in ('local', *allowed) fails naming the valid ones."""
  out = [w for w in (arg or '').split(',') if w]
  for w in out:
    if w not in ('local', *allowed):
      raise ValueError(f'unknown variant {w!r}; valid: {", ".join(("local", *allowed))}')
  return out


FAST_LOCAL_EPOCHS = 6   # the fast baseline's local form in an ablation (its 20 epochs take 3-4 min)


def cifar(arg, allowed=(), epochs=160):
  """(config, words): ResNet-20 on CIFAR-10 (crop + flip, momentum, cosine, L2 5e-4) for
  `epochs`; with `local`: the CIFAR-10 subset, 10 epochs (2-3 minutes per run on 2 CPU
  cores). With `fast` (where the module allows it): experiments/fast_cifar.py's recipe
  as it is (10 epochs at full size), or its local variant for FAST_LOCAL_EPOCHS epochs
  (warmup kept at 23% of training)."""
  w = words(arg, allowed)
  if 'fast' in w:
    from experiments import fast_cifar   # it imports this module
    c = fast_cifar.get_config('local' if 'local' in w else None)
    if 'local' in w:
      c.schedule.warmup_epochs = c.schedule.warmup_epochs * FAST_LOCAL_EPOCHS / c.train.epochs
      c.train.epochs = FAST_LOCAL_EPOCHS
    return c, w
  c = cifar10_resnet.get_config('local' if 'local' in w else None)
  c.train.epochs = 10 if 'local' in w else epochs
  if 'local' in w:
    c.train.log_every = 100
  return c, w


def seeds(arg, allowed=()):
  """2 seeds for a local run, 3 at full size; on the fast baseline 5 and 10."""
  w = words(arg, allowed)
  if 'fast' in w:
    return 5 if 'local' in w else 10
  return 2 if 'local' in w else 3
