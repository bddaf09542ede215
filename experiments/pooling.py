"""Pooling: 2x2 max vs 2x2 average vs fractional max-pooling in a plain conv net.

  python -m launch.sweep --config=experiments/pooling.py:local --workdir=runs/pooling_local
  python -m launch.sweep --config=experiments/pooling.py --workdir=runs/pooling      # GPU/TPU

Tests: model.pool = max (the baseline), avg, and fractional max-pooling at ratio sqrt(2)
with disjoint and with overlapping regions (pseudo-random, a fresh draw each step; at
evaluation the softmax averaged over 4 fixed draws). With ratio sqrt(2) a feature map
shrinks half as fast, so the same number of pooling layers leaves larger maps (and a
larger dense head) than 2x2 pooling. Full size: VGG-16 with batch norm, 100 epochs, crop +
flip; local: the plain CNN (3 convs of 32/64/128 channels, dense head of 256), 10 epochs
on the CIFAR-10 subset.
Literature: Graham (2014), "Fractional Max-Pooling" (arXiv:1412.6071), uses far deeper
FMP networks (a pooling layer after every conv); its abstract reports improving on the
state of the art for CIFAR-100 "without even using dropout", and its results tables give
lower test error when the predictions of several test draws of the pooling regions are
averaged (what train.fmp_eval_draws does).
This module is a narrower question: the pooling layer alone swapped in a fixed network.
"""
from experiments import common


def get_config(arg=None):
  c, w = common.cifar(arg, epochs=100)
  c.train.fmp_eval_draws = 4
  if 'local' in w:
    c.model.name, c.model.depth, c.model.width = 'cnn', 3, 32
    c.optim.lr = 0.02
  else:
    c.model.name = 'vgg16'
    c.optim.lr = 0.05
  return c


def get_sweep(arg=None):
  return {'arms': {'max': {},
                   'avg': {'model.pool': 'avg'},
                   'fmp': {'model.pool': 'fractional'},
                   'fmp_overlap': {'model.pool': 'fractional', 'model.fmp_overlap': True}},
          'baseline': 'max', 'seeds': common.seeds(arg)}
