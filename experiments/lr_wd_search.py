"""Random search over learning rate x weight decay, then a coarse-to-fine second stage.

  python -m launch.sweep --config=experiments/lr_wd_search.py:local --workdir=runs/search_local
  python -m launch.sweep --config=experiments/lr_wd_search.py --workdir=runs/search  # GPU/TPU

Tests: the lectures' steps 4 and 5. Stage 1 draws 16 trials log-uniformly from lr in
[1e-3, 1] and decoupled weight decay in [1e-5, 1e-2] (an AlgoPerf-style search space,
reproducible from search_seed). Stage 2 narrows both ranges to the span of the 4 best
stage-1 trials by mean val accuracy (plus a 25% margin, in log space) and draws 8 more
(`fine_*`). Short runs for the search (full size: ResNet-20, 30 epochs; local: 5 epochs on
the CIFAR-10 subset, 1 seed); train the winner longer afterwards. The report ranks by best
val accuracy and plots the (log lr, log wd) scatter.
Literature: Bergstra & Bengio (2012): random search finds as good settings as a grid with
far fewer trials, because few hyperparameters matter; lr and weight decay interact (the
good region is a diagonal band in log lr x log wd).
"""
from experiments import common


def get_config(arg=None):
  c, w = common.cifar(arg)
  c.regularize.l2 = 0.0
  c.train.epochs = 5 if 'local' in w else 30
  return c


def get_sweep(arg=None):
  return {'search_space': {
              'optim.lr': {'min': 1e-3, 'max': 1.0, 'scaling': 'log'},
              'optim.weight_decay': {'min': 1e-5, 'max': 1e-2, 'scaling': 'log'}},
          'trials': 16, 'search_seed': 0, 'seeds': 1,
          'refine': {'top_k': 4, 'trials': 8, 'margin': 0.25}}
