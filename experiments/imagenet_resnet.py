"""ImageNet, ResNet-50: the standard 90-epoch recipe (Goyal et al. 2017, "Accurate, Large
Minibatch SGD: Training ImageNet in 1 Hour").

Recipe: ResNet-50 (torchvision's v1.5: stride on the 3x3 conv; 25,557,032 params), 224 px,
zero-init of each residual branch's last BN scale, bfloat16 compute (float32 params);
SGD + momentum 0.9, batch 256 and peak lr 0.1 x batch / 256 (the linear scaling rule:
`--config.train.batch_size=1024` gives 0.4), 5 epochs of linear warmup from 0, then cosine
decay to 0 over the remaining 85 (`:step`: x0.1 at epochs 30, 60 and 80, the paper's);
L2 1e-4 on conv/dense kernels (not on BN parameters or biases, as in the paper; all of
them with `--config.regularize.decay_all_params=True`); random resized crop (8-100% of
the area) + flip. ImageNet's train split from TFDS (`imagenet2012`, prepared once as
ArrayRecord: see README) streamed through host workers (`data.pipeline=stream`, decoded
and resized on host); 1% of it is held out as val (best checkpoint, metrics.jsonl with
val_top5_accuracy). `launch.eval --split=test` evaluates the data source's test split,
which for imagenet2012 has to be TFDS's `validation` (50,000 labelled images; the
ImageNet test set's labels were never published).

  python -m launch.train --config=experiments/imagenet_resnet.py --workdir=runs/in1k_r50
  python -m launch.train --config=experiments/imagenet_resnet.py:step --workdir=runs/in1k_r50_step
  python -m launch.eval --workdir=runs/in1k_r50 --split=test

Expected: about 76% top-1 accuracy on ImageNet's validation images (Goyal et al. 2017
report 23.6% top-1 error for ResNet-50 after 90 epochs at batch 256, with step decay);
not yet measured with this code (no GPU/TPU and no ImageNet in this session).

Variants (comma-separated after ':'):
  step      step decay x0.1 at epochs 30, 60, 80 (at the same fractions of a shorter run)
  ls        label smoothing 0.1
  nesterov  Nesterov momentum
  local     sized for 2 CPU cores (about a minute): ResNet-18 at width 16 with the ImageNet
            stem, 64 px, batch 32, 2 epochs, float32, on the generated variable-size JPEG
            ArrayRecord dataset (`data.source=synthetic_jpeg`), 2 host workers
  python -m launch.train --config=experiments/imagenet_resnet.py:local --workdir=runs/in1k_local
"""
from experiments import common
from lib.core.config import base_config

VARIANTS = ('step', 'ls', 'nesterov')
EPOCHS, WARMUP_EPOCHS, STEP_EPOCHS = 90, 5, (30, 60, 80)


def get_config(arg=None):
  w = common.words(arg, VARIANTS)
  c = base_config()
  c.data.source = 'tfds'
  c.data.name = 'imagenet2012'
  c.data.path = ''                  # tfds data_dir; '' = ~/tensorflow_datasets
  c.data.val_fraction = 0.01        # 12,812 of the 1,281,167 training images
  # --- streaming pipeline (lib/data, being added on another branch) ---
  c.data.pipeline = 'stream'
  c.data.image_size = 224           # model input size; records decoded and resized on host
  c.data.workers = 8                # host worker processes
  # ---
  c.model.name = 'resnet50'
  c.model.norm = 'batch'
  c.model.dtype = 'bfloat16'
  c.model.zero_init_residual = True
  c.optim.name = 'nesterov' if 'nesterov' in w else 'momentum'
  c.optim.momentum = 0.9
  c.train.batch_size = 256
  # The linear scaling rule, following any --config.train.batch_size override.
  c.optim.lr = c.train.get_ref('batch_size').to_float() * (0.1 / 256)
  c.regularize.l2 = 1e-4
  c.regularize.label_smoothing = 0.1 if 'ls' in w else 0.0
  c.schedule.name = 'cosine'
  c.schedule.warmup_epochs = float(WARMUP_EPOCHS)
  c.augment.resized_crop_scale = 0.08
  c.augment.flip = True
  c.train.epochs = EPOCHS
  c.train.eval_batch_size = 1024
  c.train.log_every = 100
  if 'local' in w:
    c.data.source = 'synthetic_jpeg'
    c.data.name = ''
    c.data.val_fraction = 0.1
    c.data.image_size = 64
    c.data.workers = 2
    c.model.name = 'resnet18'
    c.model.width = 16
    c.model.stem = 'imagenet'         # a 64-px input would otherwise get the CIFAR stem
    c.model.dtype = 'float32'
    c.train.batch_size = 32
    c.train.epochs = 2
    c.schedule.warmup_epochs = 0.5
    c.train.eval_batch_size = 256
    c.train.log_every = 10
  if 'step' in w:
    c.schedule.name = 'step'
    c.schedule.factor = 0.1
    c.schedule.milestone_epochs = tuple(e * c.train.epochs / EPOCHS for e in STEP_EPOCHS)
  return c
