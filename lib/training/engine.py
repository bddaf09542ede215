"""One config compiled on one mesh: its train and eval programs over the dataset's
splits, fed by either input pipeline (lib/data/device.py: resident or stream),
the state they run on, evaluation.

Shared by the training loop, launch.eval and launch.benchmark, so all three
run exactly the same compiled code.
"""
from typing import Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lib.core import factors, sharding
from lib.core.errors import UserError
from lib.data import device, stream
from lib.data.device import TRAIN_EVAL, steps_per_epoch  # noqa: F401 - TRAIN_EVAL for callers
from lib.model import models, whitening
from lib.training import optim, steps
from lib.training import eval_step as eval_lib
from lib.training import state as state_lib

class Engine:
  """Compiled train/eval steps of `config` over `mesh`, with `dataset` on device.

  mean/std default to the dataset's training statistics; evaluation of a
  restored run passes the statistics recorded with its checkpoint (eval_only).
  With model.whiten_init=patch the whitening filters of the first layer are computed
  from the training images here (`whitening_filters`), once, when an initial state is first
  built; a run restored from a checkpoint (a resume, a repacked program, eval_only)
  has them in its state and never computes them.
  `log` gets the streaming pipeline's warnings (bad records; default stderr).
  """

  def __init__(self, config, dataset, mesh, mean=None, std=None, eval_only=False, log=None):
    self.config, self.dataset, self.mesh = config, dataset, mesh
    self.rep = sharding.replicated(mesh)
    self.mean = np.asarray(dataset.mean if mean is None else mean, np.float32)
    self.std = np.asarray(dataset.std if std is None else std, np.float32)
    self.coarse_of_class = multitask_data(config, dataset)
    self.model = models.build(config.model, dataset.num_classes, config.regularize,
                              num_coarse=0 if self.coarse_of_class is None
                              else int(np.max(self.coarse_of_class)) + 1)
    if eval_only:   # the training batch need not fit this data or these devices
      self.steps_per_epoch = max(dataset.num_examples('train') // config.train.batch_size, 1)
    else:
      sharding.check_batch(config.train.batch_size, mesh)
      self.steps_per_epoch = steps_per_epoch(config, dataset)
    self.total_steps = config.train.epochs * self.steps_per_epoch
    self.tx_build, self.lr_multiplier = optim.make(config, self.total_steps, self.steps_per_epoch)
    self.hparams = {k: sharding.to_global(v, self.rep) for k, v in steps.hparams(config).items()}
    # Per-engine caches (never functools.lru_cache on a method: its cache would keep
    # every engine alive, with its data on device and its compiled programs).
    self.pipeline, self.pipeline_reason = stream.choose(
        config.data.pipeline, dataset, device.memory_budget(list(mesh.devices.flat)))
    if self.pipeline == 'stream' and config.augment.flip and \
        config.augment.flip_mode == 'alternate':
      raise UserError('augment.flip_mode=alternate needs the resident pipeline (the step '
                      f'reads each example\'s index); this data is streamed '
                      f'({self.pipeline_reason}): use augment.flip_mode=random')
    self.eval_only = eval_only
    self._eval_programs: Dict[str, object] = {}
    self._epoch = (None, None)   # the resident path's current (epoch, indices)
    if self.pipeline == 'stream':
      self.data = device.StreamSplits(dataset, mesh, config, self.steps_per_epoch, log)
      host = stream.HOST_AUGMENTATIONS if config.data.image_size else ()
      batch_step = steps.make_batch_step(self.model, self.tx_build, config, mesh, self.mean,
                                         self.std, dataset.num_classes, host,
                                         coarse_of_class=self.coarse_of_class)
      self._train_step = jax.jit(batch_step, donate_argnums=(0, 4))
    else:
      self.data = device.DeviceSplits(dataset, mesh, config.train.eval_batch_size)
      train_step = steps.make_train_step(self.model, self.tx_build, config, mesh, self.mean,
                                         self.std, dataset.num_classes, self.steps_per_epoch,
                                         coarse_of_class=self.coarse_of_class)
      self._train_step = jax.jit(train_step, donate_argnums=(0, 5))
    # Several simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count)
    # share one thread pool: with launches queued behind each other, a device's
    # part can starve and its all-reduce deadlock. There, keep one launch in flight.
    # Real accelerators keep asynchronous dispatch.
    self._serialize = mesh.devices.size > 1 and mesh.devices.flat[0].platform == 'cpu'
    self._zero_sums = jax.jit(state_lib.zero_sums, out_shardings=self.rep)
    self.eval_batch = self.data.eval_batch

  # ----- state -----
  def whitening_filters(self) -> Optional[np.ndarray]:
    """The first layer's whitening filters (model.whiten_init=patch), or None; computed
    on first use and kept by this engine (not on resume or repack, which build no state)."""
    if self.eval_only:
      return None
    if not hasattr(self, '_whitening'):
      self._whitening = whitening_kernel(self.config, self.dataset, self.mean, self.std)
    return self._whitening

  def _init(self, hparams, reference=None):
    return state_lib.init_state(self.model, self.tx_build, hparams, self.config.seed,
                                self.dataset.image_shape, ema=state_lib.has_ema(self.config),
                                tie=state_lib.has_anchor(self.config), reference=reference,
                                whitening=self.whitening_filters())

  def init_state(self, reference=None) -> state_lib.TrainState:
    """The state at step 0; `reference`: the params regularize.tie_l2 ties the weights
    to when they are another run's (lib/runs/tying.py)."""
    return jax.jit(self._init, out_shardings=self.rep)(self.hparams, reference)

  def owned(self, tree):
    """A copy in XLA-owned buffers (safe to donate; a restored array may alias host memory)."""
    return jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=self.rep)(tree)

  def abstract_state(self) -> state_lib.TrainState:
    """Shapes, dtypes and the current (replicated) sharding: a restore target."""
    shapes = jax.eval_shape(self._init, self.hparams)
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=self.rep), shapes)

  # ----- data on device -----
  def split_on_device(self, name: str):
    return self.data.split(name)

  def epoch_indices(self, epoch: int) -> jax.Array:
    return self.data.epoch_indices(self.config.seed, epoch, self.steps_per_epoch,
                                   self.config.train.batch_size, bool(self.config.data.bootstrap))

  def zero_sums(self):
    # Made by XLA, not from host numpy: these buffers are donated to the step,
    # and a CPU array built from numpy may alias host memory.
    return self._zero_sums()

  def step_inputs(self, step: int):
    """What `train_step` needs for step `step`: this epoch's indices into the resident
    split, or the step's batch from the streaming pipeline."""
    if self.pipeline == 'stream':
      return self.data.train_batch(step, self.total_steps)
    epoch = step // self.steps_per_epoch
    if self._epoch[0] != epoch:
      self._epoch = (epoch, self.epoch_indices(epoch))
    return self._epoch[1]

  def train_step(self, state, inputs, sums):
    """One step; `inputs` from `step_inputs`."""
    if self.pipeline == 'stream':
      out = self._train_step(state, self.hparams, *inputs, sums)
    else:
      images, labels = self.split_on_device('train')
      out = self._train_step(state, self.hparams, images, labels, inputs, sums)
    return jax.block_until_ready(out) if self._serialize else out

  def close(self):
    """Stops the streaming pipeline's workers (a resident engine holds none)."""
    if self.pipeline == 'stream':
      self.data.close()

  def drop_device_data(self) -> None:
    """Frees the resident splits on the devices (uploaded again if this engine is used
    later): for an engine that is done, before another one uploads its own copy."""
    if self.pipeline != 'stream':
      self.data = device.DeviceSplits(self.dataset, self.mesh, self.config.train.eval_batch_size)
      self._epoch = (None, None)

  def learning_rate(self, step: int) -> float:
    return float(self.config.optim.lr * self.lr_multiplier(step))

  # ----- evaluation -----
  def activations(self, state, split: str = 'val', examples: int = 256):
    """[(name, values)] of every activation layer on the first `examples` images of
    `split`, in evaluation mode (for train.tb_histograms)."""
    if not hasattr(self, '_capture'):
      names = []

      def capture(state, images):
        x = (images.astype(jnp.float32) / 255.0 - self.mean) / self.std
        acts = models.activations(self.model, {'params': state.params,
                                               'batch_stats': state.batch_stats}, x, train=False)
        names[:] = [n for n, _ in acts]
        return [a for _, a in acts]
      self._capture = (jax.jit(capture), names)
    fn, names = self._capture
    if self.pipeline == 'stream':
      images = self.data.first_images(split, examples)
    else:
      images = self.dataset.split(split)[0][:examples]
    values = jax.device_get(fn(state, images))
    return list(zip(names, values))

  def _eval_split(self, tta: str):
    """One compiled program for a whole split: a scan over fixed padded batches.

    One launch per evaluation (not one per batch) is also what keeps simulated
    multi-device CPU runs safe: independent launches that each hold collectives
    can deadlock XLA:CPU's shared thread pool.
    """
    if tta not in self._eval_programs:
      self._eval_programs[tta] = jax.jit(self.eval_split_fn(tta))
    return self._eval_programs[tta]

  def eval_split_fn(self, tta: str):
    """run(state, images, labels, idx, mask) -> sums of loss, correct, count, and
    correct5 above 10 classes (eval_step.reports_top5) (not jitted)."""
    eval_step, zeros = self._eval_step(tta)

    def run(state, images, labels, idx, mask):
      def body(totals, batch):
        out = eval_step(state, images, labels, *batch)
        return jax.tree.map(jnp.add, totals, out), None
      return jax.lax.scan(body, zeros(), (idx, mask))[0]

    return run

  @property
  def eval_draws(self) -> int:
    """Fixed draws of the fractional pooling regions an evaluation averages over."""
    return self.config.train.fmp_eval_draws if self.config.model.pool == 'fractional' else 1

  def _eval_step(self, tta: str):
    """(eval_step, zeros): the step that sums one batch's loss, correct, count (and
    correct5 above 10 classes), and a function giving the zero sums it adds to."""
    top5 = eval_lib.reports_top5(self.dataset.num_classes)
    eval_step = eval_lib.make_eval_step(self.model, self.mean, self.std, tta, top5=top5,
                                        draws=self.eval_draws)
    keys = ('loss', 'correct', 'count') + (('correct5',) if top5 else ())
    return eval_step, lambda: {k: jnp.zeros((), jnp.float32) for k in keys}

  def evaluate(self, state, split: str = 'val', tta: Optional[str] = None) -> Dict[str, float]:
    """Loss and accuracy (top-5 too above 10 classes) over a whole split, in fixed
    padded batches, with test-time augmentation `tta` (default: the config's
    train.eval_tta)."""
    tta = self.check_tta(tta)
    if self.pipeline == 'stream':
      return eval_result(jax.device_get(self._eval_streamed(state, split, tta)))
    totals = jax.device_get(self._eval_split(tta)(state, *self.eval_inputs(split)))
    return eval_result(totals)

  def _eval_streamed(self, state, split: str, tta: str):
    """The sums of the streaming pipeline's evaluation batches of a split, added in
    order on the devices (as the resident scan adds them)."""
    key = ('batch', tta)
    if key not in self._eval_programs:
      eval_step, zeros = self._eval_step(tta)

      def add(totals, state, images, labels, idx, mask):
        return jax.tree.map(jnp.add, totals, eval_step(state, images, labels, idx, mask))
      self._eval_programs[key] = (jax.jit(add, donate_argnums=(0,), out_shardings=self.rep),
                                  jax.jit(zeros, out_shardings=self.rep))
    fn, zeros = self._eval_programs[key]
    totals = zeros()
    for inputs in self.data.eval_batches(split):
      totals = fn(totals, state, *inputs)
      if self._serialize:
        jax.block_until_ready(totals)
    return totals

  def check_tta(self, tta: Optional[str]) -> str:
    tta = self.config.train.eval_tta if tta is None else tta
    if tta not in eval_lib.TTA:
      raise UserError(f'unknown tta {tta!r}; valid: {", ".join(eval_lib.TTA)}')
    return tta

  def eval_inputs(self, split: str):
    """(images, labels, idx, mask) of a split (lib/data/device.py)."""
    return self.data.eval_inputs(split)


def whitening_kernel(config, dataset, mean, std) -> Optional[np.ndarray]:
  """The first layer's whitening filters (model.whiten_init=patch; lib/model/whitening.py)
  from the first training images, normalized by mean/std; None when off."""
  if config.model.whiten_init != 'patch':
    return None
  if not getattr(dataset, 'in_memory', True):
    raise UserError('model.whiten_init=patch computes its filters from the training images in '
                    'memory; this data is read as records: use a source held in memory '
                    '(cifar_dir, npz, tfds without data.image_size) or model.whiten_init=none')
  return whitening.from_images(dataset.split('train')[0][:whitening.IMAGES], mean, std)


def multitask_data(config, dataset):
  """Each class's coarse class when regularize.aux_coarse is on (else None), after
  checking that the data has what the multitask heads need, in one line if not."""
  if factors.on(config, 'regularize.aux_rotation'):
    shape = tuple(dataset.image_shape)
    if shape[0] != shape[1]:
      raise UserError(f'regularize.aux_rotation needs square images; these are {shape[0]}x'
                      f'{shape[1]}: set data.image_size, or regularize.aux_rotation=0')
  if not factors.on(config, 'regularize.aux_coarse'):
    return None
  coarse = getattr(dataset, 'coarse_of_class', None)
  return steps.coarse_matrix_rows(coarse, config)


def eval_result(totals) -> Dict[str, float]:
  """Loss and accuracy (and top5_accuracy where the sums have correct5) from an
  evaluation's host sums."""
  count = int(totals['count'])
  out = {'loss': float(totals['loss']) / count, 'accuracy': float(totals['correct']) / count}
  if 'correct5' in totals:
    out['top5_accuracy'] = float(totals['correct5']) / count
  out['num_examples'] = count
  return out
