"""The augmentation set, built up one transform at a time, on a CIFAR ResNet.

  python -m launch.sweep --config=experiments/augmentation.py:local --workdir=runs/aug_local
  python -m launch.sweep --config=experiments/augmentation.py --workdir=runs/aug     # GPU/TPU

Tests: none; flip; crop (pad 4); crop + flip (the standard CIFAR set); + colour jitter
(brightness, contrast, saturation 0.4); random resized crop (scale 0.35) + flip instead of
pad-and-crop; crop + flip + cutout 16. Full size: ResNet-20, 160 epochs; local: 10 epochs
on the CIFAR-10 subset.
Literature: crop + flip is the standard CIFAR augmentation (He et al. 2016: ResNet-110
6.43% error with it); without augmentation the same networks overfit badly (ResNets and
DenseNets roughly double their CIFAR-10 error, Huang et al. 2017). Colour jitter and
resized crops are ImageNet-style and help less on 32x32 images.
"""
from experiments import common


def get_config(arg=None):
  c, _ = common.cifar(arg)
  return c


def get_sweep(arg=None):
  off = {'augment.crop_padding': 0, 'augment.flip': False}
  return {'arms': {
      'crop+flip': {},
      'none': off,
      'flip': {**off, 'augment.flip': True},
      'crop': {'augment.flip': False},
      'crop+flip+jitter': {'augment.brightness': 0.4, 'augment.contrast': 0.4,
                           'augment.saturation': 0.4},
      'resized_crop+flip': {'augment.crop_padding': 0, 'augment.resized_crop_scale': 0.35},
      'crop+flip+cutout': {'augment.cutout_size': 16}},
      'baseline': 'crop+flip', 'seeds': common.seeds(arg)}
