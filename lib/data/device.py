"""How a dataset reaches the devices: the two input pipelines of one train step.

`data.pipeline` chooses (lib/data/stream.py `choose`; `auto` says which and why):

  resident  `DeviceSplits`: every split uploaded once and kept on the devices; the
            step gathers its batch by index. The fast path for data that fits.
  stream    `StreamSplits`: the same batches read by grain worker processes and
            put on the devices a step ahead (lib/data/stream.py), for data that
            does not fit, or images of several sizes decoded on the host.

Resident: the train step gathers its batch on device from the whole training split, by
index: `epoch_permutation` is this epoch's shuffle, a function of (seed, epoch)
alone, so a resumed run reads the same batches on any number of devices.
Evaluation scans a split in fixed, padded batches (`DeviceSplits.eval_inputs`).
`TRAIN_EVAL` is a fixed subset of the training split, evaluated like val.

Both read the same order (lib/data/order.py), so a run of fixed-size images is
the same run on either path.
"""
import json
import os
import queue
import sys
import threading
from typing import Dict, Tuple

import jax
import numpy as np

from lib.core import sharding
from lib.core.errors import UserError
from lib.data import stream
from lib.data.order import epoch_permutation

# The evaluation split of a fixed training subset (Dataset.train_eval_indices), kept
# on device as a split of its own.
TRAIN_EVAL = 'train_eval'
# The stream path evaluates a split with its worker processes only from this many
# padded batches per worker (each evaluation starts them anew).
EVAL_BATCHES_PER_WORKER = 4


def memory_budget(devices) -> int:
  """Bytes one device may use for a program: 90% of the accelerator's limit, or
  half the host's memory shared by its CPU devices (read on this process's devices)."""
  local = [d for d in devices if d.process_index == jax.process_index()] or list(devices)
  stats = None
  try:
    stats = local[0].memory_stats()
  except Exception:   # noqa: BLE001 - not every backend reports
    pass
  if stats and stats.get('bytes_limit'):
    return int(0.9 * stats['bytes_limit'])
  host = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  return int(0.5 * host / len(local))


def steps_per_epoch(config, dataset) -> int:
  """Full batches in an epoch (the remainder of the training split is dropped)."""
  b = config.train.batch_size
  n = dataset.num_examples('train') // b
  if n == 0:
    raise UserError(f'train.batch_size={b} exceeds the {dataset.num_examples("train")} '
                    'training images; lower it')
  return n


class DeviceSplits:
  """`dataset`'s splits on `mesh` (replicated), uploaded on first use, and the
  fixed padded evaluation batches of `eval_batch_size` (rounded up to a multiple
  of the data axis). Per-object caches: dropping it frees its device arrays."""

  def __init__(self, dataset, mesh, eval_batch_size: int):
    self.dataset, self.mesh = dataset, mesh
    self.rep = sharding.replicated(mesh)
    self.eval_batch = eval_batch_on(mesh, eval_batch_size)
    self._on_device: Dict[str, tuple] = {}
    self._eval_batches: Dict[str, tuple] = {}

  def split(self, name: str):
    """(images, labels) of split `name` on the devices."""
    if name not in self._on_device:
      if name == TRAIN_EVAL:   # its own copy, shaped like val: the same compiled evaluation
        images, labels = self.dataset.split('train')
        members = self.dataset.train_eval_indices()
        images, labels = images[members], labels[members]
      else:
        images, labels = self.dataset.split(name)
      self._on_device[name] = (sharding.to_global(images, self.rep),
                               sharding.to_global(labels, self.rep))
    return self._on_device[name]

  def epoch_indices(self, seed: int, epoch: int, steps: int, batch_size: int,
                    bootstrap: bool = False):
    """This epoch's (steps, batch) indices, each step's batch split over the data axis
    (of the seed's bootstrap resample with `bootstrap`: lib/data/order.py)."""
    idx = epoch_permutation(seed, epoch, self.dataset.num_examples('train'), steps, batch_size,
                            bootstrap)
    return sharding.to_global(idx, sharding.sharded_along(self.mesh, 2, axis=1))

  def eval_inputs(self, split: str):
    """(images, labels, idx, mask) of a split: its images on device and its fixed
    padded batches, uploaded once. TRAIN_EVAL's subset is a split of its own on
    device, as large as val (where the training split allows): the same shapes, so
    it runs val's compiled evaluation, not one of its own."""
    images, labels = self.split(split)
    if split not in self._eval_batches:
      n = int(labels.shape[0])
      padded = np.arange(-(-n // self.eval_batch) * self.eval_batch).reshape(-1, self.eval_batch)
      mask = padded < n
      idx = np.where(mask, padded, 0).astype(np.int32)
      rows = sharding.sharded_along(self.mesh, 2, axis=1)
      self._eval_batches[split] = (sharding.to_global(idx, rows), sharding.to_global(mask, rows))
    return (images, labels) + self._eval_batches[split]


def eval_batch_on(mesh, eval_batch_size: int) -> int:
  """`eval_batch_size` rounded up to a multiple of the data axis (the batch is split
  over the data axis only)."""
  n = mesh.shape[sharding.DATA]
  return -(-eval_batch_size // n) * n


def local_rows(mesh, batch: int, shape) -> Tuple[int, int]:
  """(start, stop): the rows of a global batch of `batch` examples this process's
  devices hold (the batch is split over the data axis)."""
  spec = sharding.sharded_along(mesh, 1 + len(shape))
  index_map = spec.addressable_devices_indices_map((batch,) + tuple(shape))
  starts = [idx[0].start or 0 for idx in index_map.values()]
  stops = [batch if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
  return min(starts), max(stops)


class _Feed:
  """A background thread that reads host batches from `it` and puts them on the
  devices, `depth` batches ahead: the batch of step t + 1 is on its way while step
  t runs. Errors (a bad record over the limit, a dead worker) reach the caller at
  its next `get`."""

  def __init__(self, it, to_device, depth: int, on_item):
    self._queue = queue.Queue(maxsize=max(depth, 1))
    self._stop = threading.Event()
    self._it, self._to_device, self._on_item = it, to_device, on_item
    self._thread = threading.Thread(target=self._run, daemon=True, name='input-feed')
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _run(self):
    try:
      for item in self._it:
        self._on_item(item)
        if not self._put(('ok', self._to_device(item))):
          return
      self._put(('end', None))
    except BaseException as e:   # noqa: BLE001 - handed to the consumer
      self._put(('error', e))

  def get(self):
    while True:
      try:
        kind, value = self._queue.get(timeout=1.0)
        break
      except queue.Empty:
        if not self._thread.is_alive():
          raise RuntimeError('the input pipeline stopped without an error') from None
    if kind == 'error':
      raise value
    if kind == 'end':
      raise StopIteration
    return value

  def close(self):
    self._stop.set()
    self._thread.join(timeout=10)
    self._it = None


class StreamSplits:
  """The streaming input path: the same batches as DeviceSplits would gather, read
  by grain workers (lib/data/stream.py) and put on the devices ahead of the step.

  `train_batch(step)` is the (images, labels) of training step `step`, sharded
  over the data axis; `eval_batches(split)` the fixed padded evaluation batches
  (images, labels, idx, mask) of a split. Bad records are counted (distinct) and
  warned about through `log`; more than data.max_bad_records fail the run. With
  several processes, each reads only its rows: the bad records each met are
  pooled at the end of every evaluation (a collective every process reaches), so
  process 0 warns of them all and every process fails at the same point."""

  def __init__(self, dataset, mesh, config, steps_per_epoch: int, log=None):
    self.dataset, self.mesh, self.config = dataset, mesh, config
    d = config.data
    self.eval_batch = eval_batch_on(mesh, config.train.eval_batch_size)
    self.batch = config.train.batch_size
    self.steps_per_epoch = steps_per_epoch
    self.shape = tuple(dataset.image_shape)
    # Records are decoded by grain worker processes; in-memory arrays are read by
    # threads of this process (their host work is a copy, not worth a process).
    self.workers = d.workers if not getattr(dataset, 'in_memory', True) else 0
    self.depth, self.limit = d.prefetch, d.max_bad_records
    size = d.image_size
    aug = config.augment
    self.train_transform = stream.HostTransform(
        size, self.shape, train=True, scale_lo=float(aug.resized_crop_scale) if size else 0.0,
        flip=bool(aug.flip) and size > 0)
    self.eval_transform = stream.HostTransform(size, self.shape)
    self.images_sharding = sharding.sharded_along(mesh, 1 + len(self.shape))
    self.labels_sharding = sharding.sharded_along(mesh, 1)
    self.bad = {}   # message (naming the record) -> the split that read it
    # Several processes: what this one met since the last pooling (noted there).
    self._pooled = jax.process_count() > 1
    self._unpooled = []
    self._lock = threading.Lock()   # the feed threads add, the main thread pools
    self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    self._feed, self._next_step = None, None
    self._sources = {}

  def source(self, name: str):
    if name not in self._sources:
      if name == TRAIN_EVAL:
        train = self.dataset.source_of('train')
        self._sources[name] = stream.SplitView(train, self.dataset.train_eval_indices(),
                                               'train (train_eval subset)')
      else:
        self._sources[name] = self.dataset.source_of(name)
    return self._sources[name]

  def _count_bad(self, split: str, item):
    for _, message in item['bad']:   # the message names the record: counted once
      if self._pooled:
        with self._lock:
          if message not in self.bad and [message, split] not in self._unpooled:
            self._unpooled.append([message, split])
      else:
        self._note_bad(message, split)

  def _note_bad(self, message: str, split: str):
    if message in self.bad:
      return
    self.bad[message] = split
    self.log(f'warning: skipped a bad record ({len(self.bad)} so far, limit '
             f'data.max_bad_records={self.limit}): {message}')
    if len(self.bad) > self.limit:
      raise stream.BadRecord(
          f'{len(self.bad)} bad records, more than data.max_bad_records={self.limit}; '
          f'first: {next(iter(self.bad))}. Fix or remove them, or raise the limit')

  def pool_bad(self, limit_bytes: int = 16384):
    """Several processes: every process's newly met bad records, noted alike by each
    (a collective: all processes call it at the same point). What does not fit in
    `limit_bytes` waits for the next pooling."""
    if not self._pooled:
      return
    with self._lock:
      send = []
      while self._unpooled and len(json.dumps(send + self._unpooled[:1])) < limit_bytes:
        send.append(self._unpooled.pop(0))
    for text in sharding.gather_text(json.dumps(send), limit_bytes):
      for message, split in json.loads(text):
        self._note_bad(message, split)

  def _global(self, item, global_batch: int):
    images = jax.make_array_from_process_local_data(
        self.images_sharding, item['images'], (global_batch,) + item['images'].shape[1:])
    labels = jax.make_array_from_process_local_data(
        self.labels_sharding, item['labels'], (global_batch,))
    if 'mask' in item:
      mask = jax.make_array_from_process_local_data(self.labels_sharding, item['mask'],
                                                    (global_batch,))
      return images, labels, mask
    return images, labels

  # ----- training -----
  def _start(self, step: int, total: int):
    self.close()
    reader = stream.BatchReader(self.source('train'), self.train_transform, self.config.seed,
                                self.batch, self.steps_per_epoch,
                                local_rows(self.mesh, self.batch, self.shape),
                                bool(self.config.data.bootstrap))
    it = stream.batches(reader, step, total, self.workers, self.depth)
    self._feed = _Feed(it, lambda item: self._global(item, self.batch), self.depth,
                       lambda item: self._count_bad('train', item))
    self._next_step = step

  def train_batch(self, step: int, total: int):
    """Images and labels of training step `step` on the devices (the pipeline is
    (re)started there when `step` is not the next one it has)."""
    if self._feed is None or step != self._next_step:
      self._start(step, total)
    try:
      out = self._feed.get()
    except StopIteration:
      raise RuntimeError(f'the input pipeline ended before step {step}') from None
    self._next_step = step + 1
    return out

  def close(self):
    if self._feed is not None:
      self._feed.close()
      self._feed = None

  # ----- evaluation -----
  def eval_batches(self, split: str):
    """(images, labels, idx, mask) of each padded evaluation batch of `split`, read
    by the workers and put on the devices ahead of use."""
    source = self.source(split)
    count = -(-len(source) // self.eval_batch)
    reader = stream.EvalReader(source, self.eval_transform, self.eval_batch,
                               local_rows(self.mesh, self.eval_batch, self.shape))
    # A worker process takes seconds to start: a split of a few batches is read by threads.
    workers = self.workers if count >= EVAL_BATCHES_PER_WORKER * self.workers else 0
    it = stream.batches(reader, 0, count, workers, self.depth)
    idx = sharding.to_global(np.arange(self.eval_batch, dtype=np.int32), self.labels_sharding)
    feed = _Feed(it, lambda item: self._global(item, self.eval_batch), self.depth,
                 lambda item: self._count_bad(split, item))
    try:
      while True:
        try:
          images, labels, mask = feed.get()
        except StopIteration:
          break
        yield images, labels, idx, mask
    finally:
      feed.close()
    self.pool_bad()   # every process has read the whole split: a point they all reach

  def first_images(self, split: str, n: int) -> np.ndarray:
    """The first n images of a split, as evaluated (host array)."""
    source = self.source(split)
    return np.stack([self.eval_transform(np.asarray(source[i][0]), None, f'{split} example {i}')
                     for i in range(min(n, len(source)))])
