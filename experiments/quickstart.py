"""Quickstart: a 2-layer MLP on scikit-learn's bundled 8x8 digits (no download).

  python -m launch.train --config=experiments/quickstart.py --workdir=runs/quickstart

Expected: val_accuracy about 0.98 after 20 epochs (measured 2-core CPU: see README).
"""
from lib.core.config import base_config


def get_config(arg=None):
  c = base_config()
  c.data.source = 'digits'
  c.model.name = 'mlp'
  c.model.depth = 2
  c.model.width = 512
  c.model.norm = 'none'
  c.optim.name = 'momentum'
  c.optim.lr = 0.05
  c.schedule.name = 'cosine'
  c.regularize.l2 = 1e-3
  c.train.epochs = 20
  c.train.batch_size = 32
  c.train.log_every = 100
  return c
