"""CIFAR-10, ResNet-20 (He et al. 2016): SGD + momentum, cosine decay, crop + flip.

Full run (GPU/TPU; data prepared once as ArrayRecord, see README):
  python -m launch.train --config=experiments/cifar10_resnet.py --workdir=runs/c10_r20
  Expected: about 91-92% test accuracy after 160 epochs (the paper reports 91.25%,
  8.75% error, for ResNet-20); not yet measured with this code (no GPU in this session).

Local variant, sized for 2 CPU cores, on the CIFAR-10 subset beside the repo
(4068 train images, 10% held out as val; test_batch is the test split):
  python -m launch.train --config=experiments/cifar10_resnet.py:local --workdir=runs/c10_local
  Measured (2-core CPU, 3 min 49 s, seed 0): best val_accuracy 0.531; that checkpoint
  scores 0.533 on test_batch (1017 images), 0.532 with --tta=flip.
"""
from lib.core.config import base_config


def get_config(arg=None):
  c = base_config()
  c.data.source = 'tfds'
  c.data.name = 'cifar10'
  c.data.path = ''                  # tfds data_dir; '' = ~/tensorflow_datasets
  c.model.name = 'resnet20'
  c.model.norm = 'batch'
  c.optim.name = 'momentum'
  c.optim.lr = 0.1
  c.optim.momentum = 0.9
  c.regularize.l2 = 5e-4
  c.schedule.name = 'cosine'
  c.augment.crop_padding = 4
  c.augment.flip = True
  c.train.epochs = 160
  c.train.batch_size = 128
  c.train.eval_batch_size = 1000
  c.train.log_every = 100
  if arg == 'local':
    c.data.source = 'cifar_dir'
    c.data.path = '../shared/data/cifar-10-batches-py'
    c.train.epochs = 15
    c.train.log_every = 10
  elif arg:
    raise ValueError(f'unknown variant {arg!r}; valid: local')
  return c
