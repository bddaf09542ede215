"""The streaming input pipeline: batches read, decoded and transformed by host
worker processes (grain), for data that does not fit on the devices.

The resident path (lib/data/device.py) keeps every split on the devices and
gathers each batch inside the step. This path reads the same batches from a
random-access source instead: step t of a run is the batch of rows
`epoch_permutation(seed, epoch)[t % steps_per_epoch]`, exactly the resident
path's, so a run of fixed-size images trained either way sees the same data in
the same order, and its device-side augmentations draw the same numbers (they
come from the step's random streams, not from the pipeline). Nothing here
imports jax: the readers run in grain's worker processes.

- A *source* is anything with `len()` and `source[i] -> (image HWC uint8, label)`:
  in-memory arrays, ArrayRecord files of encoded images, a TFDS
  `data_source` (lib/data/records.py). `SplitView` is a split of one by index.
- `BatchReader(step)` is this process's rows of the step's global batch: each
  process reads only the rows its devices hold (a multi-process run reads its
  data once, not once per process).
- Host transforms run per example with randomness from (seed, epoch, example
  index) alone (transforms.example_rng), so they do not depend on the number of
  workers or processes. With `data.image_size` > 0 every image is decoded and
  brought to that size on the host: training by a random-resized crop
  (`augment.resized_crop_scale` its lower bound, when on) and a flip
  (`augment.flip`), evaluation by resizing the shorter side to size / 0.875 and
  a centre crop. Those two augmentations are then host work, and the step skips
  its own (`HOST_AUGMENTATIONS`); every other augmentation stays on device.
- A record that fails to decode is counted and replaced by the next example of
  the split (training) or masked out (evaluation), with a warning naming it;
  more than `data.max_bad_records` distinct bad records fail the run.
- The position of the pipeline is the step: a resumed run rebuilds it at its
  checkpoint's step (no iterator state to save).
"""
import dataclasses
from typing import Optional, Tuple

import numpy as np

from lib.core.errors import UserError
from lib.data import records, transforms
from lib.data.order import epoch_permutation

# Augmentations (lib/training/augment.py names) done on the host when images are
# brought to data.image_size there.
HOST_AUGMENTATIONS = ('resized_crop', 'flip')
PIPELINES = ('auto', 'resident', 'stream')


class BadRecord(UserError):
  """A record that cannot be read as an image (its message names it)."""


# What a reader skips (training) or masks out (evaluation), naming the record.
BAD_RECORDS = (BadRecord, records.CorruptRecord)


class SplitView:
  """The examples `indices` of `source`, as a source."""

  def __init__(self, source, indices: np.ndarray, name: str):
    self.source, self.indices, self.name = source, np.asarray(indices, np.int64), name

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int):
    return self.source[int(self.indices[i])]


@dataclasses.dataclass(frozen=True)
class HostTransform:
  """What the host does to one decoded image. size 0: nothing (images already
  have `shape`); else train: random-resized crop (scale_lo > 0; otherwise the
  eval resize) and flip; eval: shorter side to size / 0.875, centre crop."""
  size: int
  shape: Tuple[int, ...]
  train: bool = False
  scale_lo: float = 0.0
  flip: bool = False

  def __call__(self, image: np.ndarray, rng_fn, where: str) -> np.ndarray:
    if image.ndim == 2:
      image = image[..., None]
    if self.size == 0:
      if tuple(image.shape) != tuple(self.shape):
        raise UserError(f'{where} has shape {tuple(image.shape)}, not the dataset\'s '
                        f'{tuple(self.shape)}: images of several sizes need '
                        '--config.data.image_size=<model input size>')
      return image
    if self.train and self.scale_lo > 0:
      return transforms.train_transform(image, self.size, rng_fn(), self.scale_lo, self.flip)
    image = transforms.eval_transform(image, self.size)
    return transforms.flip(image, rng_fn()) if self.train and self.flip else image


class BatchReader:
  """A training step -> this process's rows of its global batch:
  {'images': (rows, H, W, C) uint8, 'labels': (rows,) int32, 'bad': [(index, message)]}.

  Rows `rows` (a (start, stop) pair) of the step's batch of
  epoch_permutation(seed, epoch, bootstrap=bootstrap). A record that fails to read is
  replaced by the next example of the split that reads (and reported in 'bad')."""

  def __init__(self, split, transform: HostTransform, seed: int, batch_size: int,
               steps_per_epoch: int, rows: Tuple[int, int], bootstrap: bool = False):
    self.split, self.transform, self.seed, self.bootstrap = split, transform, seed, bootstrap
    self.batch_size, self.steps_per_epoch, self.rows = batch_size, steps_per_epoch, rows
    self._perm = (None, None)

  def permutation(self, epoch: int) -> np.ndarray:
    if self._perm[0] != epoch:   # one epoch's order, cached in the worker
      self._perm = (epoch, epoch_permutation(self.seed, epoch, len(self.split),
                                             self.steps_per_epoch, self.batch_size,
                                             self.bootstrap))
    return self._perm[1]

  def __call__(self, step: int):
    epoch, k = divmod(int(step), self.steps_per_epoch)
    ids = self.permutation(epoch)[k, self.rows[0]:self.rows[1]]
    images, labels, bad = [], [], []
    n = len(self.split)
    for i in ids:
      for j in range(n):   # the next example that reads, in a bad record's place
        idx = (int(i) + j) % n
        try:
          image, label = self.split[idx]
          where = f'{self.split.name} example {idx}'
          image = self.transform(np.asarray(image), lambda: transforms.example_rng(self.seed, epoch, idx), where)
          break
        except BAD_RECORDS as e:
          bad.append((idx, str(e)))
      else:
        raise UserError(f'no example of {self.split.name} can be read')
      images.append(image)
      labels.append(label)
    return {'images': np.stack(images), 'labels': np.asarray(labels, np.int32), 'bad': bad}


class EvalReader:
  """Evaluation batch k -> this process's rows of the padded batch of examples
  [k * batch, (k + 1) * batch): images, labels and a mask (False: padding, or a
  record that failed to read, reported in 'bad')."""

  def __init__(self, split, transform: HostTransform, batch_size: int, rows: Tuple[int, int]):
    self.split, self.transform, self.batch_size, self.rows = split, transform, batch_size, rows

  def __call__(self, k: int):
    n = len(self.split)
    images, labels, mask, bad = [], [], [], []
    first = None
    for pos in range(k * self.batch_size + self.rows[0], k * self.batch_size + self.rows[1]):
      image, label, ok = None, 0, pos < n
      if ok:
        try:
          image, label = self.split[pos]
          image = self.transform(np.asarray(image), None, f'{self.split.name} example {pos}')
        except BAD_RECORDS as e:
          bad.append((pos, str(e)))
          image, label, ok = None, 0, False
      images.append(image)
      labels.append(label)
      mask.append(ok)
      if image is not None and first is None:
        first = image
    shape = self.transform.shape if first is None else first.shape
    images = [np.zeros(shape, np.uint8) if im is None else im for im in images]
    return {'images': np.stack(images), 'labels': np.asarray(labels, np.int32),
            'mask': np.asarray(mask), 'bad': bad}


def batches(reader, start: int, stop: int, workers: int, buffer: int = 2):
  """An iterator of reader(start), ..., reader(stop - 1), in order, read by `workers`
  grain worker processes (0: threads of this process)."""
  import grain
  _absl_flags_parsed()
  ds = grain.MapDataset.range(start, stop).map(reader)
  if workers > 0:
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers,
                                                     per_worker_buffer_size=buffer))
  else:
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=buffer))
  return iter(it)


def _absl_flags_parsed():
  """grain reads absl flags of its own; outside an absl app (tests, notebooks) they
  are not parsed yet, which grain treats as an error."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def split_bytes(dataset, name: str = 'train') -> int:
  """Bytes of a split held as uint8 at the model's input size."""
  return int(np.prod(dataset.image_shape)) * dataset.num_examples(name)


def choose(pipeline: str, dataset, budget_bytes: Optional[int], fraction: float = 0.5):
  """(pipeline, reason): 'resident' or 'stream' for data.pipeline `pipeline`.
  auto: resident when the data is held in memory and its splits (replicated on
  every device) take at most `fraction` of a device's memory budget."""
  if pipeline not in PIPELINES:
    raise UserError(f'unknown data.pipeline={pipeline!r}; valid: {", ".join(PIPELINES)}')
  held = getattr(dataset, 'in_memory', True)
  need = sum(split_bytes(dataset, s) for s in dataset.split_names())
  if pipeline == 'resident':
    if not held:
      raise UserError(f'data.pipeline=resident needs images of one size held in memory; '
                      f'data.source={dataset.source} is read as records: use '
                      '--config.data.pipeline=stream (or auto)')
    return 'resident', 'data.pipeline=resident'
  if pipeline == 'stream':
    return 'stream', 'data.pipeline=stream'
  if not held:
    return 'stream', f'data.source={dataset.source} is read as records'
  if budget_bytes is None or need <= fraction * budget_bytes:
    share = '' if not budget_bytes else f', {100 * need / budget_bytes:.1f}% of device memory'
    return 'resident', f'auto: the splits take {need / 2**20:,.1f} MiB{share}'
  return 'stream', (f'auto: the splits take {need / 2**20:,.1f} MiB, more than '
                    f'{fraction:.0%} of the {budget_bytes / 2**20:,.0f} MiB a device has')
