"""Bagging vs an ensemble of seeds vs dropout ("dropout is cheap bagging").

  python -m launch.sweep --config=experiments/bagging.py:local --workdir=runs/bagging_local
  python -m launch.sweep --config=experiments/bagging.py --workdir=runs/bagging       # GPU/TPU

Arms, on the network of experiments/dropout.py (large fully connected layers, no
normalization; full size: VGG-16, 100 epochs; local: the plain CNN with a dense head of
256, 15 epochs on the CIFAR-10 subset), 5 seeds (3 local):
  single     every seed on the whole training split;
  bootstrap  `data.bootstrap`: each seed on its own bootstrap resample of the training
             split (n draws with replacement, about 63.2% distinct examples);
  dropout    inverted dropout 0.5 after the hidden FC layers, one network.
The ranked table compares single networks (a bootstrapped one sees fewer distinct
examples). The report's ensemble table holds the comparison of ensembles: the
`bootstrap` arm's seed ensemble is bagging; the `single` arm's is an ensemble of the
same data from different initializations and orders; `dropout` is one network. Any arm's
ensemble: `python -m launch.eval --ensemble=W/<arm>`.
Literature: Breiman (1996), "Bagging predictors": predictors fitted to bootstrap
replicates of the learning set, averaged (or voted); it helps when the procedure is
unstable (a perturbed learning set changes the predictor much) and can slightly hurt a
stable one. Goodfellow, Bengio & Courville, Deep Learning (2016), 7.11: neural networks
trained on the same data often gain from model averaging too, as random initialization,
minibatch order and hyperparameters make their errors partly independent; 7.12: dropout
"can be thought of as a method of making bagging practical for ensembles of very many
large neural networks", differing from bagging in that the sub-networks share parameters
and most are never trained explicitly, and its weight-scaling rule at test time
approximates the ensemble's (geometric-mean) prediction. Srivastava et al. (2014)
describe dropout as training exponentially many thinned networks with shared weights
and approximating the average of their predictions with one unthinned network of
scaled weights.
"""
from experiments import common, dropout


def get_config(arg=None):
  return dropout.get_config(arg)


def get_sweep(arg=None):
  return {'arms': {'single': {},
                   'bootstrap': {'data.bootstrap': True},
                   'dropout': {'regularize.dropout': 0.5}},
          'baseline': 'single', 'seeds': 3 if 'local' in common.words(arg) else 5}
