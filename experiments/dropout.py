"""Dropout rate on a network with a large fully connected head.

  python -m launch.sweep --config=experiments/dropout.py:local --workdir=runs/dropout_local
  python -m launch.sweep --config=experiments/dropout.py --workdir=runs/dropout      # GPU/TPU

Tests: inverted dropout after the hidden FC layers (dropout_at=hidden) at 0, 0.3, 0.5, and
0.5 in the conv layers too (dropout_at=all, 0.2 there would be the paper's choice; one rate
is shared here). Full size: VGG-16 without batch norm (two FC layers of 4096), no weight
decay, 100 epochs; local: the plain CNN (3 conv-pool stages of 32/64/128 channels, dense
head of 256), 15 epochs on the CIFAR-10 subset.
Literature: Srivastava et al. (2014), CIFAR-10 conv net: 15.60% error without dropout,
14.32% with dropout in the FC layers, 12.61% with dropout in all layers. Dropout matters
for large FC layers (AlexNet, VGG use 0.5) and much less for all-conv ResNets.
"""
from experiments import common


def get_config(arg=None):
  c, w = common.cifar(arg)
  c.regularize.dropout_at = 'hidden'
  c.regularize.l2 = 0.0
  c.model.norm = 'none'
  c.optim.lr = 0.01
  if 'local' in w:
    c.model.name = 'cnn'
    c.model.depth = 3
    c.model.width = 32
    c.optim.lr = 0.02
    c.train.epochs = 15
  else:
    c.model.name = 'vgg16'
    c.train.epochs = 100
  return c


def get_sweep(arg=None):
  return {'arms': {'none': {},
                   'fc_0.3': {'regularize.dropout': 0.3},
                   'fc_0.5': {'regularize.dropout': 0.5},
                   'all_0.5': {'regularize.dropout': 0.5, 'regularize.dropout_at': 'all'}},
          'baseline': 'none', 'seeds': common.seeds(arg)}
