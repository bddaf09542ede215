"""Weight initialization schemes, on a deep plain net and on a ResNet.

  python -m launch.sweep --config=experiments/init.py:resnet,local --workdir=runs/init_resnet_local
  python -m launch.sweep --config=experiments/init.py:plain,local --workdir=runs/init_plain_local
  python -m launch.sweep --config=experiments/init.py:resnet --workdir=runs/init_resnet  # GPU/TPU

Tests the kernel initializer of every layer: zeros, normal std 0.01, normal std 0.05,
Xavier (std 1/sqrt(fan_in), the lectures' form), Kaiming (sqrt(2/fan_in)) and, on the
ResNet, Kaiming + zero-init of the last BN scale of each residual block.
`plain`: a deep plain network without normalization (the setting where init decides
everything): full size VGG-16 without batch norm (16 layers); local a 10-layer MLP of
256 ReLU units on the CIFAR-10 subset. `resnet` (default): ResNet-56 with batch norm,
160 epochs; local ResNet-20, 10 epochs.
Literature: zeros (or any constant) never breaks symmetry and stays at chance (10%).
He et al. (2015): a 30-layer plain ReLU net does not train with Xavier init and trains
with Kaiming init; Simonyan & Zisserman needed staged training for VGG before such inits.
With batch norm the scale of the init matters much less. Goyal et al. (2017) and He et al.
(2019, "bag of tricks") zero-init the last BN scale of each block: +0.2-0.3% top-1 on
ImageNet, mainly a help for large batches.
"""
from experiments import common


def get_config(arg=None):
  c, w = common.cifar(arg, allowed=('plain', 'resnet'))
  if 'plain' in w:
    c.model.norm = 'none'
    c.regularize.l2 = 0.0
    c.optim.lr = 0.01
    if 'local' in w:
      c.model.name, c.model.depth, c.model.width = 'mlp', 10, 256
      c.augment.crop_padding, c.augment.flip = 0, False
    else:
      c.model.name = 'vgg16'
      c.train.epochs = 100
  elif 'local' not in w:
    c.model.name = 'resnet56'
  return c


def get_sweep(arg=None):
  w = common.words(arg, allowed=('plain', 'resnet'))
  arms = {'kaiming': {'model.init': 'kaiming_normal'},
          'zeros': {'model.init': 'zeros'},
          'normal_0.01': {'model.init': 'normal', 'model.init_scale': 0.01},
          'normal_0.05': {'model.init': 'normal', 'model.init_scale': 0.05},
          'xavier': {'model.init': 'xavier_normal', 'model.init_fan': 'fan_in'}}
  if 'plain' not in w:
    arms['kaiming_zero_residual'] = {'model.init': 'kaiming_normal',
                                     'model.zero_init_residual': True}
  return {'arms': arms, 'baseline': 'kaiming', 'seeds': common.seeds(arg, ('plain', 'resnet'))}
