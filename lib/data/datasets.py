"""Image-classification datasets held whole in memory as uint8 NHWC + int32 labels.

Each source returns (train, test, num_classes), or (train, test, num_classes,
coarse_of_class) where it knows each class's coarse class (CIFAR-100's 20
superclasses: regularize.aux_coarse); `load` then carves a fixed
validation split out of train, so model selection never sees the test split,
and computes per-channel normalization statistics on the training split only.
"""
import dataclasses
import glob
import os
import pickle
from typing import Optional, Tuple

import ml_collections
import numpy as np

from lib.core import cache
from lib.data import records, stream, synthetic, transforms
from lib.core.errors import UserError
from lib.core.registry import Registry

SOURCES = Registry('data source', 'data.source')
Split = Tuple[np.ndarray, np.ndarray]


@dataclasses.dataclass
class Dataset:
  train: Split
  val: Split
  test: Optional[Split]
  num_classes: int
  mean: np.ndarray  # (C,) float32, of train images scaled to [0, 1]
  std: np.ndarray
  coarse_of_class: Optional[np.ndarray] = None   # (num_classes,) int32, where the source has it

  in_memory = True   # the images are arrays (RecordDataset: records read when needed)

  @property
  def image_shape(self):
    return tuple(self.train[0].shape[1:])

  def num_examples(self, name: str) -> int:
    return len(self.split(name)[1])

  def split_names(self):
    return [n for n in ('train', 'val', 'test')
            if getattr(self, n) is not None and len(getattr(self, n)[1])]

  def train_eval_indices(self) -> np.ndarray:
    """A fixed subset of the training split, as many images as val: evaluated like
    val at every evaluation (train_eval_* metrics), for a train-val gap measured
    without augmentation or regularization. The same for every run of this data."""
    return train_eval_indices(self.num_examples('train'), self.num_examples('val'))

  def split(self, name: str) -> Split:
    if name not in ('train', 'val', 'test'):
      raise UserError(f'unknown split {name!r}; valid: train, val, test')
    out = getattr(self, name)
    if out is None or len(out[1]) == 0:
      raise UserError(f'this dataset has no {name} split')
    return out

  def source_of(self, name: str):
    """Split `name` as a source of the streaming pipeline (lib/data/stream.py)."""
    images, labels = self.split(name)
    return records.ArraySource(images, labels, self.num_classes, name)


def train_eval_indices(n: int, k: int) -> np.ndarray:
  """Sorted indices of a fixed subset of min(k, n) of the n training examples."""
  return np.sort(np.random.RandomState(0).permutation(n)[:min(k, n)]).astype(np.int32)


@dataclasses.dataclass
class RecordDataset:
  """A dataset read as records when needed (the streaming pipeline), not held in
  memory: its splits are sources (lib/data/stream.py), its images are brought to
  `image_shape` on the host, its statistics come from a fixed sample of train."""
  source: str
  train: stream.SplitView
  val: stream.SplitView
  test: Optional[stream.SplitView]
  num_classes: int
  mean: np.ndarray
  std: np.ndarray
  image_shape: Tuple[int, ...]
  coarse_of_class: Optional[np.ndarray] = None   # record sources carry none
  in_memory = False

  def source_of(self, name: str):
    if name not in ('train', 'val', 'test'):
      raise UserError(f'unknown split {name!r}; valid: train, val, test')
    out = getattr(self, name)
    if out is None or len(out) == 0:
      raise UserError(f'this dataset has no {name} split')
    return out

  def num_examples(self, name: str) -> int:
    return len(self.source_of(name))

  def split_names(self):
    return [n for n in ('train', 'val', 'test') if getattr(self, n) is not None and len(getattr(self, n))]

  def train_eval_indices(self) -> np.ndarray:
    return train_eval_indices(self.num_examples('train'), self.num_examples('val'))

  def split(self, name: str):
    raise UserError(f'data.source={self.source} is read as records, not held in memory; '
                    'this command needs images in memory (a fixed-size source such as '
                    'npz, cifar_dir or tfds without data.image_size)')


def _digits_arrays():
  """(images (1797, 8, 8) in 0..16, labels) of scikit-learn's bundled digits, read from
  the CSV the package ships (importing sklearn.datasets costs a second per process);
  load_digits where that file is not found."""
  import importlib.util
  spec = importlib.util.find_spec('sklearn')
  for base in (spec.submodule_search_locations or []) if spec else []:
    path = os.path.join(base, 'datasets', 'data', 'digits.csv.gz')
    if os.path.exists(path):
      table = np.loadtxt(path, delimiter=',')
      return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int32)
  from sklearn.datasets import load_digits
  d = load_digits()
  return d.images, d.target.astype(np.int32)


@SOURCES.register('digits')
def _digits(data_config):
  """scikit-learn's bundled 8x8 digits; a fixed 360-image test split."""
  pixels, labels = _digits_arrays()
  images = np.round(pixels * (255.0 / 16.0)).astype(np.uint8)[..., None]
  perm = np.random.RandomState(1234).permutation(len(labels))
  test, train = np.sort(perm[:360]), np.sort(perm[360:])
  return (images[train], labels[train]), (images[test], labels[test]), 10


def _unpickle(path):
  with open(path, 'rb') as f:
    return pickle.load(f, encoding='bytes')


def _cifar_batch(path):
  """(images, labels, label key, coarse labels or None) of one pickled batch."""
  d = _unpickle(path)
  key = b'labels' if b'labels' in d else b'fine_labels'
  if b'data' not in d or key not in d:
    raise UserError(f'{path} is not a CIFAR "python version" batch '
                    '(needs b"data" and b"labels" or b"fine_labels")')
  images = np.asarray(d[b'data'], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  coarse = np.asarray(d[b'coarse_labels'], np.int32) if b'coarse_labels' in d else None
  return np.ascontiguousarray(images), np.asarray(d[key], np.int32), key, coarse


def coarse_mapping(labels: np.ndarray, coarse: np.ndarray, num_classes: int,
                   where: str) -> np.ndarray:
  """(num_classes,) the coarse class of each class, from per-example labels (CIFAR-100's
  superclasses: one per class): -1 for a class with no example, -2 for one whose
  examples disagree (an error only where regularize.aux_coarse uses them)."""
  labels, coarse = np.asarray(labels), np.asarray(coarse)
  if coarse.shape != labels.shape or (len(coarse) and coarse.min() < 0):
    raise UserError(f'{where}: coarse labels must be one non-negative integer per example')
  out = np.full(num_classes, -1, np.int64)
  for c in range(num_classes):
    values = np.unique(coarse[labels == c])
    out[c] = values[0] if len(values) == 1 else -2 if len(values) > 1 else -1
  return out.astype(np.int32)


def _path(data_config, exists, kind: str, what: str) -> str:
  """data.path, which `exists(path)` must accept, or one line naming the fix."""
  path = data_config.path
  if not path or not exists(path):
    raise UserError(f'data.path={path!r} is not a {kind}; pass --config.data.path=<{what}>')
  return path


@SOURCES.register('cifar_dir')
def _cifar_dir(data_config):
  """CIFAR-10 (data_batch_*, test_batch) or CIFAR-100 (train, test) pickles."""
  path = _path(data_config, os.path.isdir, 'directory', 'CIFAR "python version" directory')
  train_files = sorted(glob.glob(os.path.join(path, 'data_batch_*')))
  test_file = os.path.join(path, 'test_batch')
  if not train_files and os.path.exists(os.path.join(path, 'train')):
    train_files, test_file = [os.path.join(path, 'train')], os.path.join(path, 'test')
  if not train_files:
    raise UserError(f'no data_batch_* or train file in data.path={path!r}; '
                    'expected the CIFAR-10/100 "python version" layout')
  parts = [_cifar_batch(f) for f in train_files]
  train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
  test = _cifar_batch(test_file)[:2] if os.path.exists(test_file) else None
  num_classes = 100 if parts[0][2] == b'fine_labels' else 10
  if all(p[3] is not None for p in parts):   # CIFAR-100: its 20 superclasses
    coarse = np.concatenate([p[3] for p in parts])
    return train, test, num_classes, coarse_mapping(train[1], coarse, num_classes, path)
  return train, test, num_classes


@SOURCES.register('npz')
def _npz(data_config):
  """`images` (N,H,W,C) uint8 and `labels` (N,); optional test_images/test_labels, and
  `coarse_labels` (N,) (each class's coarse class, regularize.aux_coarse)."""
  path = _path(data_config, os.path.isfile, 'file', '.npz with images and labels')
  with np.load(path) as f:
    if 'images' not in f or 'labels' not in f:
      raise UserError(f'{path} needs arrays "images" and "labels"; has {sorted(f.keys())}')
    train = records.check_arrays(f['images'], f['labels'], path)
    test = None
    if 'test_images' in f:
      test = records.check_arrays(f['test_images'], f['test_labels'], path + ' (test)')
    num_classes = int(f['num_classes']) if 'num_classes' in f else None
    coarse = np.asarray(f['coarse_labels']) if 'coarse_labels' in f else None
  if num_classes is None:
    num_classes = int(max(train[1].max(), -1 if test is None else test[1].max())) + 1
  if coarse is not None:
    return train, test, num_classes, coarse_mapping(train[1], coarse, num_classes, path)
  return train, test, num_classes


def _tfds_split(name, split, data_dir):
  source = records.tfds_data_source(name, split, data_dir)
  info = source.dataset_info
  image_key = next((k for k in ('image', 'img') if k in info.features), None)
  if image_key is None or 'label' not in info.features:
    raise UserError(f'tfds dataset {name!r} has no image/label features: '
                    f'{list(info.features)}')
  shape = tuple(getattr(info.features[image_key], 'shape', ()) or ())
  if None in shape:   # found before decoding a whole dataset that cannot be stacked
    raise UserError(f'tfds dataset {name!r} has images of several sizes {shape}: read it '
                    'record by record on the stream path with --config.data.image_size=S '
                    '(e.g. 224)')
  rows = []
  for start in range(0, len(source), 1024):   # batched reads; decoding dominates
    keys = list(range(start, min(start + 1024, len(source))))
    try:
      rows.extend(source.__getitems__(keys))
    except TypeError:   # sources without batched reads (e.g. tfds.testing.mock_data)
      rows.extend(source[k] for k in keys)
  images = np.stack([np.asarray(r[image_key], np.uint8) for r in rows])
  if images.ndim == 3:
    images = images[..., None]
  labels = np.asarray([r['label'] for r in rows], np.int32)
  num_classes = info.features['label'].num_classes
  if 'coarse_label' in info.features:   # cifar100's superclasses
    coarse = np.asarray([r['coarse_label'] for r in rows], np.int32)
    info = (info, coarse_mapping(labels, coarse, num_classes, f'tfds {name} {split}'))
  return (images, labels), num_classes, info


@SOURCES.register('tfds')
def _tfds(data_config):
  """Any TFDS image-classification dataset through tfds.data_source (no TensorFlow)."""
  if not data_config.name:
    raise UserError('data.source=tfds needs --config.data.name=<tfds name, e.g. cifar10>')
  train, num_classes, info = _tfds_split(data_config.name, 'train', data_config.path)
  try:  # not every dataset has a test split
    test = _tfds_split(data_config.name, 'test', data_config.path)[0]
  except UserError:
    test = None
  if isinstance(info, tuple):   # with each class's coarse class
    return train, test, num_classes, info[1]
  return train, test, num_classes


# Sources read as records by the streaming pipeline (lib/data/stream.py): each returns
# (train source, test source or None, num_classes), never arrays of the whole split.
@SOURCES.register('records', streamed=True)
def _records(data_config):
  """ArrayRecord files of encoded images (lib/data/records.py's format): data.path a
  directory with train*.array_record (and test*.array_record) and meta.json."""
  path = _path(data_config, os.path.exists, 'directory or file',
               'directory of train*.array_record files and meta.json')
  if os.path.isdir(path):
    train = records.RecordFileSource(os.path.join(path, 'train*.array_record'))
    tests = glob.glob(os.path.join(path, 'test*.array_record'))
    test = records.RecordFileSource(sorted(tests), train.num_classes) if tests else None
  else:
    train, test = records.RecordFileSource(path), None
  return train, test, train.num_classes


@SOURCES.register('synthetic_jpeg', streamed=True)
def _synthetic_jpeg(data_config):
  """A small generated dataset of variable-size JPEGs (640 train, 160 test, 10 classes)
  in the `records` format, written once to the temp directory: the whole streaming
  path (ArrayRecord, JPEG decoding, host transforms, workers) without a download."""
  return _records(ml_collections.ConfigDict({'path': synthetic.synthetic_jpeg_dir()}))


def _tfds_streamed(data_config):
  """A TFDS dataset read record by record (data.image_size > 0): any image size. Its
  held-out split is `validation` where the dataset has one (imagenet2012), else `test`."""
  train = records.TfdsSource(data_config.name, 'train', data_config.path or None)
  test = None
  for name in ('validation', 'test'):
    try:
      test = records.TfdsSource(data_config.name, name, data_config.path or None)
      break
    except UserError:
      continue
  return train, test, train.num_classes


def streamed(data_config) -> bool:
  """Whether `data_config` is read example by example (a RecordDataset): a source of
  records, or images brought to data.image_size on the host."""
  return bool(SOURCES.get(data_config.source).defaults.get('streamed')) or \
      data_config.image_size > 0


def _load_records(data_config) -> RecordDataset:
  if data_config.source == 'tfds':
    if not data_config.name:
      raise UserError('data.source=tfds needs --config.data.name=<tfds name, e.g. imagenet2012>')
    train, test, num_classes = _tfds_streamed(data_config)
  else:
    entry = SOURCES.get(data_config.source)
    train, test, num_classes, *_ = entry.fn(data_config)
    if not entry.defaults.get('streamed'):   # arrays in memory, resized on the host all the same
      train = records.ArraySource(*train, num_classes, 'train')
      test = records.ArraySource(*test, num_classes, 'test') if test is not None else None
  tr, va = split_train_val(len(train), data_config.val_fraction, data_config.split_seed)
  if len(va) == 0:
    raise UserError(f'data.val_fraction={data_config.val_fraction} leaves no validation '
                    f'images out of {len(train)}; raise it')
  name = data_config.source
  train_view = stream.SplitView(train, tr, f'{name} train')
  val_view = stream.SplitView(train, va, f'{name} train (val split)')
  test_view = stream.SplitView(test, np.arange(len(test)), f'{name} test') if test else None
  size = data_config.image_size
  sample = _stat_sample(train_view, size)
  mean, std = channel_stats(sample)
  return RecordDataset(name, train_view, val_view, test_view, num_classes, mean, std,
                       tuple(sample.shape[1:]))


def _stat_sample(split, size: int, n: int = 256) -> np.ndarray:
  """A fixed sample of training images as evaluated (at `size`), for the channel
  statistics; with size 0 every sampled image must have one shape."""
  idx = np.sort(np.random.RandomState(0).permutation(len(split))[:n])
  images, shapes = [], set()
  for i in idx:
    try:
      image = np.asarray(split[int(i)][0])
    except records.CorruptRecord:   # counted and reported when training reads it
      continue
    image = image[..., None] if image.ndim == 2 else image
    shapes.add(image.shape)
    images.append(transforms.eval_transform(image, size) if size else image)
  if not images:
    raise UserError(f'no image of {split.name} can be read')
  if not size and len(shapes) > 1:
    some = ', '.join(map(str, sorted(shapes)[:3]))
    raise UserError(f'{split.name} has images of several sizes ({some}, ...): set '
                    '--config.data.image_size=<model input size> to resize them')
  return np.stack(images)


def split_train_val(n: int, val_fraction: float, split_seed: int):
  """Fixed (sorted) train and val indices of a training split of size n."""
  n_val = int(round(n * val_fraction))
  perm = np.random.RandomState(split_seed).permutation(n)
  return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def channel_stats(images: np.ndarray):
  x = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
  return x.mean(0).astype(np.float32), np.maximum(x.std(0), 1e-3).astype(np.float32)


def load(data_config) -> Dataset:
  """The dataset of `data_config`. A process that trains several runs on the same data
  (a sweep) reads it once: the process cache (lib/core/cache.py) keeps the last dataset
  loaded, keyed by the config and the modification time of its path."""
  path = os.path.expanduser(data_config.path) if data_config.path else ''
  # data.bootstrap only chooses which loaded training examples a run reads (lib/data/order.py).
  key = (repr(sorted((k, v) for k, v in data_config.to_dict().items() if k != 'bootstrap')),
         os.path.getmtime(path) if path and os.path.exists(path) else None)
  dataset = cache.process_cache().dataset(key, lambda: _load(data_config))
  return dataclasses.replace(dataset)   # callers may set num_classes on their copy


def _load(data_config):
  if streamed(data_config):
    return _load_records(data_config)
  train, test, num_classes, *coarse = SOURCES.get(data_config.source).fn(data_config)
  if len(train[1]) and (train[1].min() < 0 or train[1].max() >= num_classes):
    raise UserError(f'labels must lie in 0..{num_classes - 1}; got '
                    f'{train[1].min()}..{train[1].max()}')
  tr, va = split_train_val(len(train[1]), data_config.val_fraction, data_config.split_seed)
  if len(va) == 0:
    raise UserError(f'data.val_fraction={data_config.val_fraction} leaves no validation '
                    f'images out of {len(train[1])}; raise it')
  val = (train[0][va], train[1][va])
  train = (train[0][tr], train[1][tr])
  mean, std = channel_stats(train[0])
  return Dataset(train, val, test, num_classes, mean, std, coarse[0] if coarse else None)
