"""EMA (Polyak averaging) of the weights: its decay, and timm's decay warmup.

  python -m launch.sweep --config=experiments/ema.py:local --workdir=runs/ema_local
  python -m launch.sweep --config=experiments/ema.py --workdir=runs/ema          # GPU/TPU

Tests: no average (the baseline) against an EMA of the weights and batch statistics with
decay 0.99 and 0.999 (horizons of about 100 and 1000 steps), and 0.999 with `timm`'s decay
warmup (min(d, 1 - u^(-2/3)) at update u, so the first updates are not dominated by the
initial weights). Every EMA arm's best checkpoint and reported accuracy are its average's
(train.select_by=ema); its metrics.jsonl also holds the raw weights' val accuracy, the
same as the baseline's run of that seed (EMA never changes the training itself). Full size:
ResNet-20, 160 epochs; local: ResNet-20, 10 epochs on the CIFAR-10 subset (280 steps, so
0.999 averages over more steps than the run has: the warmup arm shows what it recovers).
Literature: Polyak & Juditsky (1992) average the iterates of stochastic approximation;
an exponential moving average of the weights is standard in modern image-classification
recipes (e.g. Tan & Le 2019, EfficientNet, decay 0.9999; timm's ModelEmaV3). Its gain is
largest with a high final learning rate; a schedule that anneals to zero already averages
much of the noise away.
"""
from experiments import common


def get_config(arg=None):
  c, _ = common.cifar(arg)
  return c


def get_sweep(arg=None):
  return {'arms': {'none': {},
                   'ema_0.99': {'train.ema_decay': 0.99},
                   'ema_0.999': {'train.ema_decay': 0.999},
                   'ema_0.999_warmup': {'train.ema_decay': 0.999, 'train.ema_warmup': 'timm'}},
          'baseline': 'none', 'seeds': common.seeds(arg)}
