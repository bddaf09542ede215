"""Optimizers, each at its conventional learning rate, on a CIFAR ResNet.

  python -m launch.sweep --config=experiments/optimizers.py:local --workdir=runs/optim_local
  python -m launch.sweep --config=experiments/optimizers.py --workdir=runs/optim     # GPU/TPU

Tests: SGD (lr 0.1), SGD + momentum 0.9 (0.1), AdaGrad (0.05), RMSProp (1e-3), Adam (1e-3)
with L2 5e-4, and AdamW (1e-3, decoupled decay 0.05 instead of L2); cosine decay and 2
warmup epochs for all (fair to the adaptive ones). Full size: ResNet-20, 160 epochs; local:
10 epochs on the CIFAR-10 subset. The learning rate is not retuned per optimizer: pair
this with experiments/lr_wd_search.py for a tuned comparison.
Literature: Wilson et al. (2017) found adaptive methods (AdaGrad, RMSProp, Adam) generalize
worse than tuned SGD with momentum on CIFAR-10; Loshchilov & Hutter (2019) show decoupled
weight decay (AdamW) closes most of Adam's gap.
"""
from experiments import common


def get_config(arg=None):
  c, _ = common.cifar(arg)
  c.schedule.warmup_epochs = 2.0
  return c


def get_sweep(arg=None):
  return {'arms': {'momentum': {'optim.name': 'momentum', 'optim.lr': 0.1},
                   'sgd': {'optim.name': 'sgd', 'optim.lr': 0.1},
                   'adagrad': {'optim.name': 'adagrad', 'optim.lr': 0.05},
                   'rmsprop': {'optim.name': 'rmsprop', 'optim.lr': 1e-3},
                   'adam': {'optim.name': 'adam', 'optim.lr': 1e-3},
                   'adamw': {'optim.name': 'adamw', 'optim.lr': 1e-3, 'regularize.l2': 0.0,
                             'optim.weight_decay': 0.05}},
          'baseline': 'momentum', 'seeds': common.seeds(arg)}
