"""A config checked against every registry and factor, model defaults filled in.

`resolve` is the one place a config is validated: unknown keys, names that no
registry knows, factor values outside their range (lib/core/factors.py) and
combinations that make no sense (stochastic depth without residual blocks).
Model depth/width of -1 become the model's defaults, so `config.json` records
what really ran.
"""
import difflib
import json

import ml_collections

from lib.core import factors, profiling
from lib.core.config import _mark_resolved, base_config, flatten, is_resolved
from lib.core.errors import UserError
from lib.data import datasets as data
from lib.data import stream
from lib.model import inits, models
from lib.training import losses, optim

VECTORIZE_MODES = ('auto', 'vmap', 'unroll')


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Validates names and fills model defaults; returns a new locked config, marked as
  resolved together with its JSON dict (see `is_resolved`). A config that is already
  resolved is returned as it is, so a run resolves its config once however many
  layers (sweep plan, runner, RunBook, program config) pass it on."""
  if is_resolved(config):
    return config
  known = set(flatten(base_config().to_dict()))
  for key in sorted(set(flatten(config.to_dict())) - known):
    close = difflib.get_close_matches(key, known, n=1)
    hint = f'; did you mean {close[0]}?' if close else ''
    raise UserError(f'unknown config key {key}{hint} (experiment files may only set the keys '
                    'of lib/core/config.py:base_config)')
  config = ml_collections.ConfigDict(config.to_dict())
  data.SOURCES.get(config.data.source)
  entry = models.MODELS.get(config.model.name)
  for key in ('depth', 'width'):
    if config.model[key] == -1:
      config.model[key] = entry.defaults[key]
  if 'fixed_depth' in entry.defaults and config.model.depth != entry.defaults['fixed_depth']:
    raise UserError(
        f'model.name={config.model.name} has depth {entry.defaults["fixed_depth"]}, '
        f'not model.depth={config.model.depth}; leave model.depth=-1 or pick a model whose depth '
        'is free (mlp, cnn, resnet_cifar, preact_resnet_cifar, resnext_cifar, wide_resnet)')
  models.ACTIVATIONS.get(config.model.activation)
  if models.NORMS.get(config.model.norm).defaults.get('needs_spatial') and \
      config.model.name == 'mlp':
    raise UserError(f'model.norm={config.model.norm} normalizes '
                    f'{models.NORMS.get(config.model.norm).defaults["doc"]}, which needs the '
                    'image positions that model.name=mlp does not have; use batch, layer or group')
  inits.check(config.model)
  factors.check(config)   # every factor's range (lib/core/factors.py)
  if not entry.defaults.get('residual'):
    for key in ('regularize.survival_last', 'model.zero_init_residual'):
      if factors.on(config, key):
        raise UserError(f'{key} needs residual blocks, which model.name={config.model.name} '
                        'does not have (residual models: '
                        f'{", ".join(n for n in models.MODELS.names() if models.MODELS.get(n).defaults.get("residual"))})')
  if config.model.pool != 'max' and not entry.defaults.get('pooling'):
    pooling = [n for n in models.MODELS.names() if models.MODELS.get(n).defaults.get('pooling')]
    raise UserError(f'model.pool={config.model.pool} sets the pooling layers of '
                    f'{", ".join(pooling)}; model.name={config.model.name} has none '
                    '(leave model.pool=max)')
  if config.model.whiten_init != 'none' and not entry.defaults.get('whitening'):
    whitened = [n for n in models.MODELS.names() if models.MODELS.get(n).defaults.get('whitening')]
    raise UserError(f'model.whiten_init={config.model.whiten_init} sets the first layer of '
                    f'{", ".join(whitened)}; model.name={config.model.name} has none '
                    '(leave model.whiten_init=none)')
  if config.augment.flip and config.augment.flip_mode == 'alternate' and (
      config.data.pipeline == 'stream' or config.data.image_size):
    raise UserError('augment.flip_mode=alternate needs the resident pipeline (the step reads '
                    'each example\'s index): leave data.pipeline at auto or resident and '
                    'data.image_size=0, or use augment.flip_mode=random')
  if config.model.stem not in models.STEMS:
    raise UserError(f'unknown model.stem={config.model.stem!r}; valid: {", ".join(models.STEMS)}')
  if config.model.stem != 'auto' and not entry.defaults.get('residual'):
    raise UserError(f'model.stem={config.model.stem} sets the stem of the residual models; '
                    f'model.name={config.model.name} has none (leave model.stem=auto)')
  losses.LOSSES.get(config.train.loss)
  if config.model.dtype not in ('float32', 'bfloat16'):
    raise UserError(f'model.dtype={config.model.dtype!r}; valid: bfloat16, float32')
  optim.OPTIMIZERS.get(config.optim.name)
  optim.SCHEDULES.get(config.schedule.name)
  if not 0.0 < config.data.val_fraction < 1.0:
    raise UserError(f'data.val_fraction={config.data.val_fraction} must be in (0, 1): '
                    'the validation split drives evaluation and the best checkpoint')
  if config.data.pipeline not in stream.PIPELINES:
    raise UserError(f'unknown data.pipeline={config.data.pipeline!r}; valid: '
                    f'{", ".join(stream.PIPELINES)}')
  for key in ('image_size', 'workers', 'prefetch', 'max_bad_records'):
    if config.data[key] < 0:
      raise UserError(f'data.{key}={config.data[key]} must be >= 0')
  if config.data.image_size and config.data.pipeline == 'resident':
    raise UserError(f'data.image_size={config.data.image_size} resizes images on the host, '
                    'which only the stream pipeline does; use --config.data.pipeline=stream '
                    '(or auto), or data.image_size=0')
  if config.train.eval_every < 0:
    raise UserError(f'train.eval_every={config.train.eval_every} must be >= 0 (0 = every epoch)')
  if config.train.vectorize_mode not in VECTORIZE_MODES:
    raise UserError(f'unknown train.vectorize_mode={config.train.vectorize_mode!r}; valid: '
                    f'{", ".join(VECTORIZE_MODES)}')
  profiling.parse_steps(config.train.profile_steps)   # one line if malformed
  if not config.train.checkpoint_every_s >= 0:   # NaN too
    raise UserError(f'train.checkpoint_every_s={config.train.checkpoint_every_s} must be >= 0 '
                    '(0 = a checkpoint at every evaluation)')
  if config.train.max_arms < 0:
    raise UserError(f'train.max_arms={config.train.max_arms} must be >= 0 (0 = as many as fit)')
  for key in ('epochs', 'batch_size', 'eval_batch_size', 'log_every'):
    if config.train[key] <= 0:
      raise UserError(f'train.{key}={config.train[key]} must be positive')
  config.lock()
  return _mark_resolved(config, json.loads(json.dumps(config.to_dict(), default=list)))
