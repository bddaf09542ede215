"""L2 penalty versus decoupled weight decay at matched strengths, under momentum and Adam.

  python -m launch.sweep --config=experiments/weight_decay.py:local --workdir=runs/wd_local
  python -m launch.sweep --config=experiments/weight_decay.py --workdir=runs/wd      # GPU/TPU

Tests ten arms: {momentum (the config's lr 0.1, beta 0.9), adam (lr 1e-3)} x {no decay,
and for each L2 strength lambda in (1e-4, 5e-4): an L2 penalty lambda/2 sum w^2 in the
loss, and decoupled decay w -= lr * wd * w at the strength matched to it}. Arm names carry
lambda: `momentum_decoupled_5e-04` is the decoupled arm matched to `momentum_l2_5e-04`.

Matching. lib/training/optim.py adds decoupled decay after the direction, while L2's gradient
lambda * w goes through it, so one value of lambda and wd is not one strength:
  * plain SGD: the same update for wd = lambda;
  * momentum beta: the L2 gradient accumulates in the momentum buffer to
    lambda * w / (1 - beta) per step at steady state, so wd = lambda / (1 - beta)
    gives the same shrink per step (10 x lambda at beta 0.9; a zero-gradient weight
    after 500 steps at lr 0.1 keeps 0.78 under L2 5e-4 and under decoupled 5e-3, but
    0.975 under decoupled 5e-4);
  * Adam: no equivalence, since Adam rescales the L2 gradient per coordinate. Its
    decoupled arm is matched to the momentum arm's shrink per step instead:
    adam_lr * wd = momentum_lr * lambda / (1 - beta) (wd 0.5 for lambda 5e-4). The
    schedule scales both rates alike, so the match holds at every step.
The Adam L2 arms use the same lambdas. Baseline: momentum with L2 5e-4 (the config's
recipe). Full size: ResNet-20, 160 epochs; local: 10 epochs on the subset.
Literature: Loshchilov & Hutter (2019): with Adam, L2 and weight decay are not equivalent;
decoupled decay (AdamW) generalizes better and makes the best decay independent of lr.
"""
from experiments import common

L2_STRENGTHS = (1e-4, 5e-4)
ADAM_LR = 1e-3


def get_config(arg=None):
  c, _ = common.cifar(arg)
  c.regularize.l2 = 0.0
  return c


def get_sweep(arg=None):
  c = get_config(arg)
  momentum_lr, beta = c.optim.lr, c.optim.momentum
  arms = {'momentum_none': {'optim.name': 'momentum', 'optim.lr': momentum_lr},
          'adam_none': {'optim.name': 'adam', 'optim.lr': ADAM_LR}}
  for lam in L2_STRENGTHS:
    matched = lam / (1 - beta)   # decoupled decay with L2 lambda's shrink under momentum
    for opt, lr, wd in (('momentum', momentum_lr, matched),
                        ('adam', ADAM_LR, momentum_lr * matched / ADAM_LR)):
      base = {'optim.name': opt, 'optim.lr': lr}
      arms[f'{opt}_l2_{lam:.0e}'] = {**base, 'regularize.l2': lam}
      arms[f'{opt}_decoupled_{lam:.0e}'] = {**base, 'optim.weight_decay': wd}
  return {'arms': arms, 'baseline': f'momentum_l2_{5e-4:.0e}', 'seeds': common.seeds(arg)}
