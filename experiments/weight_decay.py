"""L2 penalty versus decoupled weight decay, under SGD + momentum and under Adam.

  python -m launch.sweep --config=experiments/weight_decay.py:local --workdir=runs/wd_local
  python -m launch.sweep --config=experiments/weight_decay.py --workdir=runs/wd      # GPU/TPU

Tests six arms: {momentum (lr 0.1), adam (lr 1e-3)} x {no decay, L2 penalty
lambda/2 sum w^2 in the loss, decoupled decay w -= lr * wd * w}. For plain SGD the two are
the same update (wd = lambda); with momentum nearly so; with Adam they differ, because
Adam rescales the L2 gradient per coordinate. Strengths: L2 5e-4 everywhere; decoupled
5e-4 for momentum (the matching value), 0.05 for Adam (decoupled decay is multiplied by
the small Adam lr). Full size: ResNet-20, 160 epochs; local: 10 epochs on the subset.
Literature: Loshchilov & Hutter (2019): with Adam, L2 and weight decay are not equivalent;
decoupled decay (AdamW) generalizes better and makes the best decay independent of lr.
"""
from experiments import common


def get_config(arg=None):
  c, _ = common.cifar(arg)
  c.regularize.l2 = 0.0
  return c


def get_sweep(arg=None):
  arms = {}
  for opt, lr, wd in (('momentum', 0.1, 5e-4), ('adam', 1e-3, 0.05)):
    base = {'optim.name': opt, 'optim.lr': lr}
    arms[f'{opt}_l2'] = {**base, 'regularize.l2': 5e-4}
    arms[f'{opt}_none'] = dict(base)
    arms[f'{opt}_decoupled'] = {**base, 'optim.weight_decay': wd}
  return {'arms': arms, 'baseline': 'momentum_l2',
          'seeds': common.seeds(arg)}
