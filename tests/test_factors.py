"""Every ablation factor runs end to end on 4 CPU devices; early stopping; TTA."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import quickstart
from lib.core import sharding
from lib.core.config import base_config
from lib.model import models
from lib.runs.rundir import RunDir
from lib.runs.train import train_and_evaluate
from lib.training import steps
from lib.training.resolve import resolve

quiet = lambda message: None


def tiny(**overrides):
  """The quickstart on 8x8 digits, cut to one epoch of 22 steps on half the images (the
  other half is val, and the train_eval subset is as large: it shares val's compiled
  evaluation)."""
  c = quickstart.get_config()
  c.data.val_fraction = 0.5
  c.model.depth, c.model.width = -1, -1
  c.train.epochs, c.train.batch_size, c.train.log_every = 1, 32, 1000
  for key, value in overrides.items():
    group, name = key.split('.')
    c[group][name] = value
  return c


FACTORS = {
    'l1': {'regularize.l1': 1e-4},
    'activation_l1': {'regularize.activation_l1': 1e-5},
    'dropout_hidden': {'regularize.dropout': 0.5, 'regularize.dropout_at': 'hidden'},
    'dropconnect': {'regularize.dropconnect': 0.3},
    'noise_input': {'regularize.noise_input': 0.1},
    'noise_hidden': {'regularize.noise_hidden': 0.1},
    'noise_weight': {'regularize.noise_weight': 0.01},
    'label_smoothing': {'regularize.label_smoothing': 0.1},
    'fgsm': {'regularize.adversarial_eps': 0.03},
    'decoupled_decay': {'optim.name': 'adamw', 'optim.lr': 1e-3, 'optim.weight_decay': 0.05},
    'crop_flip': {'augment.crop_padding': 2, 'augment.flip': True},
    'resized_crop': {'augment.resized_crop_scale': 0.5},
    'colour_jitter': {'augment.brightness': 0.3, 'augment.contrast': 0.3,
                      'augment.saturation': 0.3},
    'cutout': {'augment.cutout_size': 3, 'augment.cutout_patches': 2},
    'mixup_and_cutmix': {'augment.mixup_alpha': 0.2, 'augment.cutmix_alpha': 1.0},
    'hinge': {'train.loss': 'hinge'},
    'squared_hinge': {'train.loss': 'squared_hinge', 'optim.lr': 0.01},
    'tta_crops': {'train.eval_tta': 'crops'},
    'init_orthogonal': {'model.init': 'orthogonal', 'model.bias_init': 0.01},
    'maxout': {'model.activation': 'maxout', 'optim.lr': 0.01},   # diverges at 0.05
    'tta_flip': {'train.eval_tta': 'flip'},
    'dropout_head': {'regularize.dropout': 0.5},
    'decay_all_params': {'regularize.l2': 1e-3, 'regularize.l1': 1e-5,
                         'optim.weight_decay': 1e-3, 'regularize.decay_all_params': True},
    'leaky_relu_xavier_fan_avg': {'model.activation': 'leaky_relu',
                                  'model.init': 'xavier_uniform', 'model.init_fan': 'fan_avg'},
    'elu_kaiming_uniform_fan_out': {'model.activation': 'elu', 'model.init': 'kaiming_uniform',
                                    'model.init_fan': 'fan_out', 'model.init_gain': 'relu'},
    'tanh_lecun': {'model.activation': 'tanh', 'model.init': 'lecun_normal'},
    'sigmoid_normal': {'model.activation': 'sigmoid', 'model.init': 'normal',
                       'model.init_scale': 0.05, 'model.norm': 'layer'},
    'gelu_uniform': {'model.activation': 'gelu', 'model.init': 'uniform', 'model.norm': 'group'},
    'zeros_init': {'model.init': 'zeros'},
    'constant_init': {'model.init': 'constant', 'model.init_scale': 0.1},
    # Convolutional models, kept narrow (4 simulated devices on 2 cores).
    'cnn_conv_dropout': {'model.name': 'cnn', 'model.width': 4, 'regularize.dropout': 0.2,
                         'regularize.dropout_at': 'all', 'model.norm': 'instance'},
    'vgg11': {'model.name': 'vgg11', 'model.width': 4, 'regularize.dropout': 0.5,
              'regularize.dropout_at': 'hidden'},
    'resnet_stochastic_depth': {'model.name': 'resnet_cifar', 'model.depth': 8,
                                'model.width': 4, 'regularize.survival_last': 0.5,
                                'model.zero_init_residual': True},
    'resnet_batch_norm_zero_init': {'model.name': 'resnet_cifar', 'model.depth': 8,
                                    'model.width': 4, 'model.norm': 'batch',
                                    'model.zero_init_residual': True,
                                    'regularize.survival_last': 0.8},
    'preact_resnet': {'model.name': 'preact_resnet_cifar', 'model.depth': 8, 'model.width': 4},
    'resnet50_bottleneck': {'model.name': 'resnet50', 'model.width': 2, 'model.norm': 'group'},
    'resnext': {'model.name': 'resnext_cifar', 'model.depth': 11, 'model.width': 1},
    'wide_resnet': {'model.name': 'wide_resnet', 'model.depth': 10, 'model.width': 1,
                    'regularize.dropout': 0.3, 'regularize.dropout_at': 'conv'},
    'mobilenet': {'model.name': 'mobilenet', 'model.width': 4, 'model.norm': 'layer'},
}


@pytest.mark.parametrize('factor', sorted(FACTORS))
def test_every_factor_trains_end_to_end_on_four_devices(factor, tmp_path, devices):
  status = train_and_evaluate(tiny(**FACTORS[factor]), str(tmp_path / 'w'),
                              mesh=sharding.make_mesh(devices), log=quiet)
  assert status['status'] == 'done', status
  rows = RunDir(str(tmp_path / 'w')).read_metrics()
  assert rows and all(np.isfinite(r['running_train_loss']) and np.isfinite(r['val_loss']) for r in rows)
  recorded = RunDir(str(tmp_path / 'w')).read_config()
  for key, value in FACTORS[factor].items():
    group, name = key.split('.')
    assert recorded[group][name] == value


def test_early_stopping_stops_keeps_the_best_and_is_final(tmp_path):
  # A learning rate too small to change any prediction: no evaluation beats the first.
  c = tiny(**{'optim.lr': 1e-12, 'train.epochs': 6, 'train.early_stop_patience': 2})
  workdir = str(tmp_path / 'w')
  status = train_and_evaluate(c, workdir, log=quiet)
  spe = RunDir(workdir).read_metrics()[0]['step']       # one evaluation per epoch
  assert status['stopped_early'] and status['status'] == 'done'
  assert status['step'] == 3 * spe < 6 * spe            # first eval, then 2 without a new best
  rows = {r['step']: r['val_accuracy'] for r in RunDir(workdir).read_metrics()}
  assert rows[status['best_step']] == max(rows.values())   # the kept, best checkpoint
  assert status['best_val_accuracy'] == rows[spe]          # nothing beat the first evaluation
  assert [r['step'] for r in RunDir(workdir).read_metrics()] == [spe, 2 * spe, 3 * spe]
  again = train_and_evaluate(c, workdir, log=quiet)      # relaunching does not train on
  assert again == RunDir(workdir).read_status() and again['step'] == 3 * spe


def test_flip_tta_on_a_mirror_symmetric_input_equals_no_tta():
  c = resolve(base_config())
  model = models.build(c.model, 10)
  half = np.random.RandomState(0).randint(0, 256, (6, 8, 4, 3)).astype(np.uint8)
  images = jnp.asarray(np.concatenate([half, half[:, :, ::-1]], axis=2))   # mirror-symmetric
  labels = jnp.arange(6) % 10
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  state = steps.TrainState(step=0, params=variables['params'],
                           batch_stats=variables['batch_stats'], opt_state=None, rng=None)
  idx, mask = jnp.arange(6), jnp.ones(6, bool)
  run = lambda tta: steps.make_eval_step(model, 0.5, 0.25, tta)(state, images, labels, idx, mask)
  plain, flip = run('none'), run('flip')
  np.testing.assert_allclose(flip['loss'], plain['loss'], rtol=1e-5)
  assert flip['correct'] == plain['correct']
  # Not vacuous: on an asymmetric input flip averaging changes the loss.
  images = jnp.asarray(np.random.RandomState(1).randint(0, 256, (6, 8, 8, 3)).astype(np.uint8))
  assert not np.isclose(run('flip')['loss'], run('none')['loss'], rtol=1e-5)


def test_ten_crop_views_are_the_corners_and_centre_with_their_flips():
  x = jnp.asarray(np.random.RandomState(0).rand(2, 8, 8, 3).astype(np.float32)) + 1
  views = steps.views(x, 'crops', pad=2)
  assert len(views) == 10 and all(v.shape == x.shape for v in views)
  np.testing.assert_array_equal(views[4], x)                       # centre
  np.testing.assert_array_equal(views[9], x[:, :, ::-1])           # its mirror image
  np.testing.assert_array_equal(views[0][:, 2:, 2:], x[:, :6, :6])  # top-left corner
  np.testing.assert_array_equal(views[0][:, :2], 0)                 # padding is black
  np.testing.assert_array_equal(views[3][:, :6, :6], x[:, 2:, 2:])  # bottom-right corner
