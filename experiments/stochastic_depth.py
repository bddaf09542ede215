"""Stochastic depth: survival probability of the last block p_L on a deep ResNet.

  python -m launch.sweep --config=experiments/stochastic_depth.py:local --workdir=runs/sd_local
  python -m launch.sweep --config=experiments/stochastic_depth.py --workdir=runs/sd  # GPU/TPU

Tests: p_L = 1 (off), 0.8, 0.5; block l of L survives with 1 - (l/L)(1 - p_L), per example,
and every block runs at test time. Full size: ResNet-110, 300 epochs; local: ResNet-32,
10 epochs on the CIFAR-10 subset.
Literature: Huang et al. (2016), ResNet-110 on CIFAR-10 (with augmentation): 6.41% test
error with constant depth, 5.25% with stochastic depth, p_L = 0.5; it also trains about 25%
faster. The gain grows with depth (ResNet-1202: 4.91%).
"""
from experiments import common


def get_config(arg=None):
  c, w = common.cifar(arg, epochs=300)
  c.model.name = 'resnet32' if 'local' in w else 'resnet110'
  return c


def get_sweep(arg=None):
  return {'arms': {'off': {}, 'pL_0.8': {'regularize.survival_last': 0.8},
                   'pL_0.5': {'regularize.survival_last': 0.5}},
          'baseline': 'off', 'seeds': common.seeds(arg)}
