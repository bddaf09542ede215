"""Learning-rate schedules, with and without linear warmup, on a CIFAR ResNet.

  python -m launch.sweep --config=experiments/schedules.py:local --workdir=runs/sched_local
  python -m launch.sweep --config=experiments/schedules.py --workdir=runs/sched      # GPU/TPU

Tests: constant, step (x0.1 at 50% and 75% of training), cosine, linear (to 0) and
inverse square root, each without and with 5% of training as linear warmup (10 arms);
SGD + momentum, peak lr 0.1. Full size: ResNet-20, 160 epochs; local: 10 epochs on the
CIFAR-10 subset.
Time scales: step's milestones are fractions of all training (warmup included); cosine
and linear decay over all training after the warmup; inverse_sqrt is sqrt(tau / (t + tau))
with t counted from the end of warmup and tau the warmup length (8 epochs at full size,
0.5 local), or one epoch in the arm without warmup (so it halves after 3 epochs, instead of
1/sqrt(t+1) per step, 0.05 of the peak after one CIFAR epoch); constant has none.
Literature: He et al. (2016) trained CIFAR ResNets with step decay (0.1, /10 at 32k and 48k
of 64k iterations); Loshchilov & Hutter (2017, SGDR) found cosine decay as good or better.
SGD + momentum needs some decay: a constant rate ends noticeably worse. Warmup matters
mostly for large batches (Goyal et al. 2017) and for very deep nets (He et al. used
0.01 warmup for ResNet-110).
"""
from experiments import common


def get_config(arg=None):
  c, _ = common.cifar(arg)
  return c


def get_sweep(arg=None):
  epochs = get_config(arg).train.epochs
  arms = {}
  for name in ('cosine', 'constant', 'step', 'linear', 'inverse_sqrt'):
    arms[name] = {'schedule.name': name}
    arms[f'{name}+warmup'] = {'schedule.name': name, 'schedule.warmup_epochs': 0.05 * epochs}
  return {'arms': arms, 'baseline': 'cosine', 'seeds': common.seeds(arg)}
