"""The lectures' remaining techniques and modern recipes' EMA, side by side on one baseline.

  python -m launch.sweep --config=experiments/extras.py:local --workdir=runs/extras_local
  python -m launch.sweep --config=experiments/extras.py --workdir=runs/extras      # GPU/TPU

Tests, one change each against the same baseline (a network with pooling layers, so that
fractional max-pooling applies; batch norm, momentum 0.1 with cosine decay, crop + flip,
L2 5e-4):
  ema         EMA of the weights, decay 0.99 (about 100 steps); the best checkpoint and the
              reported accuracy are the average's;
  fmp         fractional max-pooling (ratio sqrt 2, disjoint), evaluation averaged over
              4 fixed draws;
  rotation    the self-supervised rotation head (0/90/180/270), weight 0.5;
  tie_init    L2-SP to the initial weights instead of L2 to zero (lambda 5e-4 either way);
  bootstrap   bagging: each seed on its bootstrap resample (the report's ensemble table
              holds the bagged ensemble; the baseline's seed ensemble is beside it).
Full size: VGG-16 with batch norm, 160 epochs; local: the plain CNN (3 conv-pool stages of
32/64/128 channels, dense head of 256), 15 epochs on the CIFAR-10 subset, 3 seeds.
Literature: Graham (2014), fractional max-pooling; Gidaris et al. (2018) and Hendrycks et
al. (2019), rotation prediction as a self-supervised and auxiliary task; Li et al. (2018),
L2-SP; Breiman (1996), bagging; Polyak & Juditsky (1992), iterate averaging. Each has its
own module with more arms: pooling, multitask, bagging, ema.
"""
from experiments import common


def get_config(arg=None):
  c, w = common.cifar(arg)
  if 'local' in w:
    c.model.name, c.model.depth, c.model.width = 'cnn', 3, 32
    c.train.epochs = 15
  else:
    c.model.name, c.model.width = 'vgg16', 64
  return c


def get_sweep(arg=None):
  return {'arms': {'none': {},
                   'ema': {'train.ema_decay': 0.99},
                   'fmp': {'model.pool': 'fractional', 'train.fmp_eval_draws': 4},
                   'rotation': {'regularize.aux_rotation': 0.5},
                   'tie_init': {'regularize.l2': 0.0, 'regularize.tie_l2': 5e-4},
                   'bootstrap': {'data.bootstrap': True}},
          'baseline': 'none', 'seeds': 3}
