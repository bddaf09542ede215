"""Mixup strength alpha (lam ~ Beta(alpha, alpha), per example) on a CIFAR ResNet.

  python -m launch.sweep --config=experiments/mixup.py:local --workdir=runs/mixup_local
  python -m launch.sweep --config=experiments/mixup.py --workdir=runs/mixup         # GPU/TPU
  python -m launch.sweep --config=experiments/mixup.py:local,fast --workdir=runs/mixup_fast_local --vectorize
    (on the fast baseline, experiments/fast_cifar.py: its local form for 6 epochs, 5 seeds;
    `:fast` is the full recipe, 10 seeds)

Tests: alpha 0 (off), 0.2, 0.4, 1.0 on top of crop + flip and L2 5e-4. Full size:
PreAct ResNet-18, 200 epochs, lr 0.1 (as in the paper); local: ResNet-20, 10 epochs on the
CIFAR-10 subset.
Literature: Zhang et al. (2018), CIFAR-10 test error PreAct ResNet-18 5.6% -> 4.2% with
alpha = 1, WRN-28-10 3.8% -> 2.7%. Mixup regularizes: it needs long training to pay off,
and costs accuracy in short, underfit runs.
"""
from experiments import common


def get_config(arg=None):
  c, w = common.cifar(arg, allowed=('fast',), epochs=200)
  if 'local' not in w and 'fast' not in w:
    c.model.name = 'preact_resnet18'
  return c


def get_sweep(arg=None):
  return {'arms': {'none': {}, **{f'alpha_{a}': {'augment.mixup_alpha': a}
                                  for a in (0.2, 0.4, 1.0)}},
          'baseline': 'none', 'seeds': common.seeds(arg, ('fast',))}
