"""Quickstart ablation: does dropout help the quickstart MLP on scikit-learn's 8x8 digits?

  python -m launch.sweep --config=experiments/quickstart_sweep.py --workdir=runs/quickstart_sweep

Arms: no dropout (baseline), inverted dropout 0.2 and 0.5 after every hidden layer of the
2x512 MLP, 3 seeds each: 9 runs of 20 epochs, no download. The 9 runs share one program
(they differ only in seed and dropout rate), so `train.vectorize` trains them together as
arms of one compiled program (under 20 s on 2 CPU cores; --novectorize: one by one).
Literature: Srivastava et al. (2014) report dropout helping large fully connected nets
(MNIST error 1.60% -> 1.25% for 3x1024 ReLU nets with p = 0.5, input p = 0.2). On 1617
tiny images a 512-wide net is not short of data for its size, so expect a small effect
of either sign; the report's paired CIs say whether it is real.
"""
from experiments import quickstart


def get_config(arg=None):
  c = quickstart.get_config(arg)
  c.regularize.dropout_at = 'hidden'
  c.train.log_every = 1000
  c.train.vectorize = True
  return c


def get_sweep(arg=None):
  return {'arms': {'no_dropout': {},
                   'dropout_0.2': {'regularize.dropout': 0.2},
                   'dropout_0.5': {'regularize.dropout': 0.5}},
          'baseline': 'no_dropout', 'seeds': 3}
