"""Multitask learning as a regularizer: auxiliary heads on the shared features.

  python -m launch.sweep --config=experiments/multitask.py:local --workdir=runs/multitask_local
  python -m launch.sweep --config=experiments/multitask.py --workdir=runs/multitask     # GPU/TPU
  python -m launch.sweep --config=experiments/multitask.py:cifar100 --workdir=runs/multitask100

Tests: no auxiliary task (the baseline) against a self-supervised head that predicts the
rotation (0/90/180/270 degrees) of a rotated copy of each batch, weights 0.5 and 1.0; with
`cifar100` (TFDS cifar100, which carries the 20 superclasses) also a second supervised
head that predicts the superclass, weight 0.5, and both. The heads share the whole trunk;
evaluation uses the main head alone. Full size: ResNet-20, 160 epochs (the rotated copy
doubles the forward and backward work); local: ResNet-20, 10 epochs on the CIFAR-10 subset.
Literature: Caruana (1997), "Multitask learning": tasks learned together with a shared
representation can improve generalization, the other tasks acting as an inductive bias;
Goodfellow et al., Deep Learning (2016), 7.7, multitask learning as a regularizer of the
shared parameters. Gidaris et al. (2018) learn features by predicting image rotations
(RotNet); Hendrycks et al. (2019) add rotation prediction as an auxiliary loss to supervised
training and report gains in robustness and uncertainty estimates more than in clean accuracy.
"""
from experiments import common


def get_config(arg=None):
  c, w = common.cifar(arg, allowed=('cifar100',))
  if 'cifar100' in w:
    c.data.source, c.data.name, c.data.path = 'tfds', 'cifar100', ''
  return c


def get_sweep(arg=None):
  arms = {'none': {},
          'rotation_0.5': {'regularize.aux_rotation': 0.5},
          'rotation_1': {'regularize.aux_rotation': 1.0}}
  if 'cifar100' in common.words(arg, ('cifar100',)):
    arms.update({'coarse_0.5': {'regularize.aux_coarse': 0.5},
                 'both': {'regularize.aux_rotation': 0.5, 'regularize.aux_coarse': 0.5}})
  return {'arms': arms, 'baseline': 'none', 'seeds': common.seeds(arg, ('cifar100',))}
