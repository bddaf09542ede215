"""experiments/imagenet_resnet.py: the Goyal et al. (2017) recipe as config values, each
variant checked by resolve (the local variant's data source aside: it is being added on
another branch), its model built without compute and its schedule evaluated."""
import jax
import jax.numpy as jnp
import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from experiments import imagenet_resnet
from lib.model import models
from lib.training import optim
from lib.training.resolve import resolve

TRAIN_IMAGES = 1_281_167


def resolved(arg=None):
  c = imagenet_resnet.get_config(arg)
  if c.data.source == 'synthetic_jpeg':   # not a source on this branch yet: check the rest
    c = ml_collections.ConfigDict(c.to_dict())
    c.data.source = 'tfds'
  return resolve(c)


def multiplier(c, steps_per_epoch):
  return optim.schedule(c.schedule, c.train.epochs * steps_per_epoch, steps_per_epoch)


def param_count(c, image_size):
  model = models.build(c.model, 1000)
  v = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                        jnp.zeros((1, image_size, image_size, 3))))
  return sum(x.size for x in jax.tree.leaves(v['params']))


@pytest.mark.parametrize('arg', [None, 'step', 'ls', 'nesterov', 'step,ls,nesterov'])
def test_full_recipe_resolves_with_goyal_et_al_values(arg):
  c = resolved(arg)
  assert (c.data.source, c.data.name) == ('tfds', 'imagenet2012')
  assert (c.data.pipeline, c.data.image_size, c.data.workers) == ('stream', 224, 8)
  assert (c.model.name, c.model.dtype, c.model.norm) == ('resnet50', 'bfloat16', 'batch')
  assert c.model.zero_init_residual and c.model.stem == 'auto'
  assert c.optim.name == ('nesterov' if arg and 'nesterov' in arg else 'momentum')
  assert (c.optim.momentum, c.optim.lr, c.train.batch_size) == (0.9, 0.1, 256)
  assert (c.regularize.l2, c.optim.weight_decay, c.regularize.decay_all_params) == (1e-4, 0, False)
  assert c.regularize.label_smoothing == (0.1 if arg and 'ls' in arg else 0.0)
  assert (c.augment.resized_crop_scale, c.augment.flip, c.augment.crop_padding) == (0.08, True, 0)
  assert (c.train.epochs, c.schedule.warmup_epochs) == (90, 5.0)
  assert c.train.eval_batch_size >= 1000
  spe = int(TRAIN_IMAGES * (1 - c.data.val_fraction)) // c.train.batch_size
  f = multiplier(c, spe)
  lr_at = lambda epoch: float(f(int(round(epoch * spe))))
  assert lr_at(2.5) == pytest.approx(0.5, abs=1e-3) and lr_at(5) == pytest.approx(1.0)
  if arg and 'step' in arg:
    assert [lr_at(e) for e in (29.9, 30, 59.9, 60, 79.9, 80, 89.9)] == pytest.approx(
        [1, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
  else:   # cosine from the end of warmup to 0
    assert lr_at(47.5) == pytest.approx(0.5, abs=1e-3) and lr_at(90) == pytest.approx(0)


def test_full_recipe_is_torchvisions_resnet50_at_224_px():
  assert param_count(resolved(), 224) == 25_557_032


def test_peak_lr_follows_the_batch_size_also_from_the_command_line():
  c = imagenet_resnet.get_config()
  c.train.batch_size = 1024
  assert resolve(c).optim.lr == pytest.approx(0.4)
  assert from_command_line('--config=experiments/imagenet_resnet.py:step',
                           '--config.train.batch_size=512').optim.lr == pytest.approx(0.2)
  assert from_command_line('--config=experiments/imagenet_resnet.py',
                           '--config.optim.lr=0.05').optim.lr == 0.05   # an explicit rate wins


def from_command_line(*args):
  """The resolved config that launch.train's --config flag gives for `args`."""
  argv = ['launch'] + list(args)
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=fv, sys_argv=argv)
  fv(argv)
  return resolve(fv.config)


@pytest.mark.parametrize('arg', ['local', 'local,step', 'local,ls'])
def test_local_variant_is_a_narrow_resnet18_at_64_px(arg):
  c = resolved(arg)
  assert imagenet_resnet.get_config(arg).data.source == 'synthetic_jpeg'
  assert (c.data.image_size, c.data.workers, c.data.pipeline) == (64, 2, 'stream')
  assert (c.model.name, c.model.width, c.model.stem, c.model.dtype) == (
      'resnet18', 16, 'imagenet', 'float32')
  assert (c.train.batch_size, c.train.epochs, c.optim.lr) == (32, 2, 0.1 * 32 / 256)
  assert param_count(c, 64) < 1_000_000   # (16/64)^2 of ResNet-18's convs, and the 7x7 stem
  spe = 25
  f = multiplier(c, spe)
  if 'step' in arg:   # 30/60/80 of 90 epochs at the same fractions of 2: steps 17, 33, 44
    assert [float(f(s)) for s in (16, 17, 32, 33, 43, 44)] == pytest.approx(
        [1, 0.1, 0.1, 0.01, 0.01, 0.001])
  assert float(f(spe // 2)) == pytest.approx(1.0)   # after half an epoch of warmup


def test_unknown_variant_names_the_valid_ones():
  with pytest.raises(ValueError, match='valid: local, step, ls, nesterov'):
    imagenet_resnet.get_config('cosine')
