"""bfloat16 compute against float32: what mixed precision costs in accuracy, and gains in speed.

  python -m launch.sweep --config=experiments/precision.py:local --workdir=runs/precision_local
  python -m launch.sweep --config=experiments/precision.py --workdir=runs/precision   # GPU/TPU

Arms: `model.dtype=float32` (the baseline) and `bfloat16`: convolutions and matmuls in
bfloat16, parameters, optimizer state, BN statistics, softmax and loss in float32 (checked
op by op by tests/test_models.py). Full size: ResNet-20, 160 epochs; local: ResNet-20, 10
epochs on the CIFAR-10 subset, 2 seeds. Step time: `python -m launch.benchmark
--models=resnet20 --dtype=bfloat16` (and `--suite=accelerator`, both dtypes).
Literature: Micikevicius et al. (2018) train image classifiers in half precision with
float32 master weights at float32 accuracy; bfloat16's float32 exponent range needs no
loss scaling (Kalamkar et al. 2019).
"""
from experiments import common


def get_config(arg=None):
  c, _ = common.cifar(arg)
  return c


def get_sweep(arg=None):
  return {'arms': {'float32': {}, 'bfloat16': {'model.dtype': 'bfloat16'}},
          'baseline': 'float32', 'seeds': common.seeds(arg)}
