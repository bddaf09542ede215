"""Cutout patch size on a CIFAR ResNet.

  python -m launch.sweep --config=experiments/cutout.py:local --workdir=runs/cutout_local
  python -m launch.sweep --config=experiments/cutout.py --workdir=runs/cutout       # GPU/TPU
  python -m launch.sweep --config=experiments/cutout.py:local,fast --workdir=runs/cutout_fast_local --vectorize
    (on the fast baseline, experiments/fast_cifar.py: its local form for 6 epochs, 5 seeds;
    `:fast` is the full recipe, 10 seeds)

Tests: one zeroed square of 0 (off), 8 or 16 pixels per image (centre anywhere, clipped at
the borders), on top of crop + flip. Full size: ResNet-18 (3x3 stem), 200 epochs, L2 5e-4;
local: ResNet-20, 10 epochs on the CIFAR-10 subset.
Literature: DeVries & Taylor (2017), CIFAR-10 test error ResNet-18 4.72% -> 3.99% with a
16x16 patch, WRN-28-10 3.87% -> 3.08%; the best size on CIFAR-10 was 16.
"""
from experiments import common


def get_config(arg=None):
  c, w = common.cifar(arg, allowed=('fast',), epochs=200)
  if 'local' not in w and 'fast' not in w:
    c.model.name = 'resnet18'
  return c


def get_sweep(arg=None):
  return {'arms': {'none': {}, 'size_8': {'augment.cutout_size': 8},
                   'size_16': {'augment.cutout_size': 16}},
          'baseline': 'none', 'seeds': common.seeds(arg, ('fast',))}
