"""Restore a run's checkpoint on whatever devices are present and evaluate it."""
import json
from typing import Any, Dict, Optional

import ml_collections

from lib.core import cache, factors, sharding
from lib.core import config as config_lib
from lib.core.errors import UserError
from lib.data import datasets as data
from lib.runs.checkpoint import Checkpoints
from lib.runs.rundir import RunDir
from lib.runs.runbook import selection_key
from lib.training import arms, engine
from lib.training import state as state_lib


def evaluate_checkpoint(workdir: str, checkpoint: str = 'best', split: str = 'val',
                        tta: Optional[str] = None, data_source: Optional[str] = None,
                        data_path: Optional[str] = None, mesh=None,
                        weights: str = 'auto') -> Dict[str, Any]:
  """Returns {"accuracy", "loss", "num_examples", "step"} for the chosen checkpoint, with
  "top5_accuracy" after "accuracy" for datasets of more than 10 classes and "weights"
  last for a run that kept a moving average of its weights.

  `weights`: `raw` (the trained weights), `ema` (their moving average, a run with
  train.ema_decay on) or `auto`, the ones that selected the run's best checkpoint
  (train.select_by: the moving average's by default where there is one).

  data_source/data_path evaluate on another dataset of the same image shape,
  normalized with the statistics of the run's own training split.
  """
  rundir = RunDir(workdir)
  config = config_lib.from_json_dict(rundir.read_config())
  weights = weights_for(config, weights, workdir)
  checkpoints = Checkpoints(rundir.checkpoint_dir, read_only=True)
  step = checkpoints.resolve(checkpoint)
  meta = checkpoints.restore_meta(step)
  config = on_data(config, data_source, data_path)
  dataset = dataset_for(config, meta)
  mesh = mesh if mesh is not None else sharding.make_mesh()
  eng = _engine(config, dataset, mesh, meta)
  state, _ = checkpoints.restore(step, eng.abstract_state())
  result = eng.evaluate(state_lib.ema_view(state, weights), split, tta)
  checkpoints.close()
  top5 = {'top5_accuracy': result['top5_accuracy']} if 'top5_accuracy' in result else {}
  return {'accuracy': result['accuracy'], **top5, 'loss': result['loss'],
          'num_examples': result['num_examples'], 'step': step,
          **({'weights': weights} if state_lib.has_ema(config) else {})}


def on_data(config, data_source: Optional[str] = None, data_path: Optional[str] = None):
  """`config` with its data source and path replaced where given (another dataset of
  the same image shape, normalized with the run's own statistics)."""
  if not (data_source or data_path):
    return config
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.source = data_source or config.data.source
  config.data.path = data_path or config.data.path
  config.lock()
  return config


def dataset_for(config, meta):
  """The data of `config`, checked against what a checkpoint's `meta` was trained on
  (image shape, classes), with the model's number of classes."""
  dataset = data.load(config.data)
  if list(dataset.image_shape) != list(meta['image_shape']):
    raise UserError(f'images of shape {dataset.image_shape} do not fit the run, which was '
                    f'trained on {tuple(meta["image_shape"])}')
  if dataset.num_classes > meta['num_classes']:
    raise UserError(f'the data has {dataset.num_classes} classes; the model has '
                    f'{meta["num_classes"]}')
  dataset.num_classes = meta['num_classes']
  return dataset


WEIGHTS = ('auto', 'ema', 'raw')


def weights_for(config, weights: str = 'auto', workdir: str = '') -> str:
  """`ema` or `raw`: what `weights` (WEIGHTS) means for this run, or one error line."""
  if weights not in WEIGHTS:
    raise UserError(f'--weights={weights!r}; valid: {", ".join(WEIGHTS)}')
  ema = state_lib.has_ema(config)
  if weights == 'auto':
    return 'ema' if selection_key(config) == 'val_accuracy_ema' else 'raw'
  if weights == 'ema' and not ema:
    raise UserError(f'--weights=ema: {workdir} kept no moving average of its weights '
                    '(train.ema_decay was 0); use --weights=raw')
  return weights


def _engine(config, dataset, mesh, meta) -> engine.Engine:
  """An evaluation engine, kept by the process cache (lib/core/cache.py) for the next call
  that needs the same program: the runs of a sweep (a vectorized group, or arms that
  differ only in seeds and strengths) share one compiled evaluation. Only the last
  one is kept, and it goes when another dataset is loaded (it holds this one's splits)."""
  # The signature leaves out the keys that depend on a factor (they do not keep arms of
  # one program apart); some shape the evaluation (model.fmp_ratio, train.fmp_eval_draws).
  flat = config_lib.flatten(config.to_dict())
  key = json.dumps([sorted(arms.signature(config.to_dict()).items()),
                    sorted((k, flat[k]) for k in factors.dependents()),
                    meta['mean'], meta['std'], meta['num_classes'], repr(mesh)])
  return cache.process_cache().engine(
      key, lambda: engine.Engine(config, dataset, mesh, mean=meta['mean'], std=meta['std'],
                                 eval_only=True))
