"""Random-access image records of a streaming input path.

The in-memory path (datasets.py, device.py) keeps every split on the devices; data that does
not fit is read example by example on the host, in worker processes, and augmented there.
This module reads and writes those examples (transforms.py augments them; synthetic.py
generates a small dataset of them); the pipeline that shards, batches and prefetches
(stream.py) calls it.

Record format (ours, no TensorFlow): an ArrayRecord file, written with group_size 1 and no
compression (fast random access; JPEG/PNG do not compress further), whose every record is

    struct.pack('<i', label) + encoded image bytes (JPEG or PNG)

with `meta.json` beside it holding {"num_classes": N}. `write_records` writes one
atomically.

Sources: `ArraySource` (arrays in memory), `RecordFileSource` (ArrayRecord files) and
`TfdsSource` (tfds.data_source, no TensorFlow) share one interface: `len(source)`,
`source[i] -> (image HWC uint8, int label)`, `num_classes`, `channels` and `name`. They are
picklable and cheap to pickle: open files and readers are dropped by `__getstate__` and
reopened lazily in the process that unpickles them (a grain worker). A record that cannot be
decoded raises `CorruptRecord`, a one-line UserError naming the file and record.

Imports numpy, PIL and array_record only (neither jax nor grain, which imports jax):
tensorflow_datasets is imported by TfdsSource alone.
"""
import glob
import io
import json
import operator
import os
import struct
import threading
import uuid
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from lib.core.errors import UserError

_LABEL = struct.Struct('<i')
_WRITER_OPTIONS = 'group_size:1,uncompressed'
_READER_OPTIONS = 'readahead_buffer_size:0'   # random access: no read-ahead
_FORMATS = ('JPEG', 'PNG')
META = 'meta.json'


class CorruptRecord(UserError):
  """A record that cannot be decoded: one line naming the file, the record and why."""


# ---------------------------------------------------------------------------- record format

def encode_record(image_bytes: bytes, label: int) -> bytes:
  """One record: the label as little-endian int32, then the encoded image."""
  try:
    return _LABEL.pack(operator.index(label)) + bytes(image_bytes)
  except struct.error:
    raise ValueError(f'label {label} does not fit an int32') from None


def decode_record(raw: bytes, where: str) -> Tuple[bytes, int]:
  """(encoded image bytes, label) of a record; CorruptRecord naming `where` if too short."""
  if len(raw) < _LABEL.size:
    raise CorruptRecord(f'{where}: {len(raw)}-byte record, too short for a label')
  return raw[_LABEL.size:], _LABEL.unpack_from(raw)[0]


def _short(e: Exception) -> str:
  """The first line of an exception's message, without PIL's object reprs."""
  text = str(e).split('\n')[0].split(' <_io.')[0].strip() or type(e).__name__
  return text[:120]


def _sniff(data: bytes) -> Optional[str]:
  if data[:3] == b'\xff\xd8\xff':
    return 'JPEG'
  if data[:8] == b'\x89PNG\r\n\x1a\n':
    return 'PNG'
  return None


def decode_image(data: bytes, where: str) -> np.ndarray:
  """A JPEG or PNG as HWC uint8 RGB (grayscale, palette, RGBA, CMYK converted); anything
  else, or a truncated file, raises CorruptRecord naming `where`."""
  try:
    img = Image.open(io.BytesIO(data), formats=_FORMATS)
    fmt = img.format
  except Exception as e:
    fmt = _sniff(data)
    what = f'corrupt {fmt} image' if fmt else 'not a JPEG/PNG image'
    raise CorruptRecord(f'{where}: {what} ({_short(e)})') from None
  try:
    with img:
      img.load()   # decodes now, so a truncated file fails here
      if img.mode != 'RGB':
        img = img.convert('RGB')
      return np.asarray(img)
  except Exception as e:
    raise CorruptRecord(f'{where}: corrupt {fmt} image ({_short(e)})') from None


def encode_image(image: np.ndarray, format: str = 'JPEG', quality: int = 90) -> bytes:
  """HWC (or HW) uint8 as JPEG or PNG bytes."""
  image = np.asarray(image, np.uint8)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  buf = io.BytesIO()
  kwargs = {'quality': quality} if format.upper() in ('JPEG', 'JPG') else {}
  Image.fromarray(image).save(buf, format=format, **kwargs)
  return buf.getvalue()


def write_records(path: str, examples: Iterable[Tuple[bytes, int]]) -> int:
  """Writes (encoded image bytes, label) pairs as an ArrayRecord file at `path`,
  atomically: a temp file in the same directory, renamed over `path` once complete.
  Returns the number of records. Image bytes are stored as given (not checked)."""
  from array_record.python.array_record_module import ArrayRecordWriter
  directory, base = os.path.split(os.path.abspath(path))
  tmp = os.path.join(directory, f'.{base}.{uuid.uuid4().hex[:12]}.tmp')
  writer = ArrayRecordWriter(tmp, _WRITER_OPTIONS)
  n = 0
  try:
    if not writer.ok():
      raise OSError(f'cannot create {tmp} (does the directory exist and is it writable?)')
    for image_bytes, label in examples:
      writer.write(encode_record(image_bytes, label))
      n += 1
    if not writer.ok():
      raise OSError(f'writing {tmp} failed')
    writer.close()
    os.replace(tmp, path)
  except BaseException:
    writer.close()
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return n


def write_meta(directory: str, num_classes: int, **extra) -> None:
  """meta.json ({"num_classes": N, ...}) in `directory`, atomically."""
  tmp = os.path.join(directory, f'.{META}.{uuid.uuid4().hex[:12]}.tmp')
  with open(tmp, 'w') as f:
    json.dump(dict(num_classes=int(num_classes), **extra), f, indent=1, sort_keys=True)
  os.replace(tmp, os.path.join(directory, META))


# ---------------------------------------------------------------------------------- sources

def _index(i, n: int) -> int:
  i = operator.index(i)
  if i < 0:
    i += n
  if not 0 <= i < n:
    raise IndexError(f'index {i} out of range for {n} examples')
  return i


def check_arrays(images, labels, where: str) -> Tuple[np.ndarray, np.ndarray]:
  """(images, labels as int32) of an in-memory split; one line naming `where` if their
  types or shapes are wrong."""
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim != 4 or images.dtype != np.uint8:
    raise UserError(f'{where}: images must be uint8 of shape (N, H, W, C), '
                    f'got {images.dtype} {images.shape}')
  if labels.shape != (images.shape[0],):
    raise UserError(f'{where}: labels shape {labels.shape} does not match '
                    f'{images.shape[0]} images')
  return images, labels.astype(np.int32, copy=False)


class ArraySource:
  """Images (N, H, W, C) uint8 and labels (N,) held in memory; items are views.
  Pickling copies the arrays (prefer in-process reading for large ones)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int,
               name: str = 'arrays'):
    self.images, self.labels = check_arrays(images, labels, name)
    self.num_classes, self.name = int(num_classes), name
    self.channels = images.shape[-1]

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, i) -> Tuple[np.ndarray, int]:
    i = _index(i, len(self.labels))
    return self.images[i], int(self.labels[i])

  def __repr__(self):
    return f'ArraySource({self.name}, {len(self)} images {self.images.shape[1:]})'


def _expand(path) -> Tuple[List[str], str]:
  """The files of a path, a glob or a list of either, and a name for messages."""
  specs = [path] if isinstance(path, (str, os.PathLike)) else list(path)
  if not specs:
    raise UserError('records: an empty list of files; pass ArrayRecord files or a glob')
  files = []
  for spec in specs:
    spec = os.path.expanduser(os.fspath(spec))
    if glob.has_magic(spec):
      matches = sorted(glob.glob(spec))
      if not matches:
        raise UserError(f'records {spec}: no file matches this glob; pass existing ArrayRecord '
                        'files (write them with lib.data.records.write_records)')
      files.extend(matches)
    elif os.path.isdir(spec):
      raise UserError(f'records {spec} is a directory; pass its files or a glob, e.g. '
                      f'{os.path.join(spec, "train*.array_record")}')
    elif not os.path.isfile(spec):
      raise UserError(f'records {spec}: no such file; pass an existing ArrayRecord file, '
                      'glob or list (write one with lib.data.records.write_records)')
    else:
      files.append(spec)
  name = files[0] if len(files) == 1 else f'{specs[0]} ({len(files)} files)'
  return files, name


def _open_reader(path: str):
  from array_record.python.array_record_module import ArrayRecordReader
  reader = ArrayRecordReader(path, _READER_OPTIONS, file_reader_buffer_size=32768)
  if not reader.ok():
    raise UserError(f'records {path} is not a readable ArrayRecord file; rewrite it with '
                    'lib.data.records.write_records')
  return reader


def _read_meta(path: str) -> int:
  meta = os.path.join(os.path.dirname(path), META)
  try:
    with open(meta) as f:
      return int(json.load(f)['num_classes'])
  except FileNotFoundError:
    raise UserError(f'records {path}: num_classes unknown; pass it, or write {meta} with '
                    '{"num_classes": N}') from None
  except (ValueError, KeyError, TypeError) as e:
    raise UserError(f'{meta}: needs {{"num_classes": N}} ({type(e).__name__}: {_short(e)})') \
        from None


class RecordFileSource:
  """Decoded (image, label) records of one or more ArrayRecord files (a path, a glob or a
  list; a glob's files in sorted order, concatenated). num_classes, when not given, is read
  from the meta.json beside the first file. Readers open lazily, once per process."""

  def __init__(self, path: Union[str, Sequence[str]], num_classes: Optional[int] = None):
    self.paths, self.name = _expand(path)
    counts = []
    for p in self.paths:
      reader = _open_reader(p)
      counts.append(reader.num_records())
      reader.close()
    self._ends = np.cumsum(counts).tolist()
    self.num_classes = _read_meta(self.paths[0]) if num_classes is None else int(num_classes)
    self.channels = 3   # decode_image always gives RGB
    self._readers = [None] * len(self.paths)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return self._ends[-1]

  def _reader(self, f: int):
    if self._readers[f] is None:
      with self._lock:
        if self._readers[f] is None:
          self._readers[f] = _open_reader(self.paths[f])
    return self._readers[f]

  def locate(self, i) -> Tuple[int, int]:
    """(file number, record number in that file) of example i."""
    i = _index(i, len(self))
    f = int(np.searchsorted(self._ends, i, side='right'))
    return f, i - (self._ends[f - 1] if f else 0)

  def where(self, i) -> str:
    """Example i as messages name it: 'records <file> record <k>'."""
    f, k = self.locate(i)
    return f'records {self.paths[f]} record {k}'

  def raw(self, i) -> bytes:
    """The undecoded record of example i."""
    f, k = self.locate(i)
    return self._reader(f).read([k])[0]

  def __getitem__(self, i) -> Tuple[np.ndarray, int]:
    where = self.where(i)
    data, label = decode_record(self.raw(i), where)
    if not 0 <= label < self.num_classes:
      raise CorruptRecord(f'{where}: label {label} outside 0..{self.num_classes - 1}')
    return decode_image(data, where), label

  def close(self) -> None:
    for r in self._readers:
      if r is not None:
        r.close()
    self._readers = [None] * len(self.paths)

  def __getstate__(self):
    state = self.__dict__.copy()
    del state['_readers'], state['_lock']
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._readers = [None] * len(self.paths)
    self._lock = threading.Lock()

  def __repr__(self):
    return f'RecordFileSource({self.name}, {len(self)} records, {self.num_classes} classes)'


def tfds_data_source(name: str, split: str, data_dir: Optional[str]):
  """tfds.data_source(name, split), or one line saying how to prepare it."""
  import tensorflow_datasets as tfds
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir or None)
  except Exception as e:  # tfds raises several types for "not prepared"
    raise UserError(
        f'tfds dataset {name!r} split {split!r} could not be opened in '
        f'data_dir={data_dir or "~/tensorflow_datasets"} ({type(e).__name__}); '
        f'prepare it once as ArrayRecord (needs TensorFlow, see README): '
        f'tfds build {name} --file_format=array_record') from None


class TfdsSource:
  """A prepared TFDS image-classification split through tfds.data_source (no TensorFlow).
  Images keep the dataset's channels (1 for grayscale datasets); reopened lazily after
  unpickling."""

  def __init__(self, name: str, split: str, data_dir: Optional[str] = None):
    self.dataset, self.split, self.data_dir = name, split, data_dir or None
    self.name = f'tfds {name} {split}'
    self._source = tfds_data_source(name, split, self.data_dir)
    features = self._source.dataset_info.features
    self._image_key = next((k for k in ('image', 'img') if k in features), None)
    if self._image_key is None or 'label' not in features:
      raise UserError(f'tfds dataset {name!r} has no image/label features: {list(features)}')
    self.num_classes = int(features['label'].num_classes)
    shape = tuple(features[self._image_key].shape)
    self.channels = shape[-1] if len(shape) == 3 else 1
    self._len = len(self._source)

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i) -> Tuple[np.ndarray, int]:
    i = _index(i, self._len)
    if self._source is None:
      self._source = tfds_data_source(self.dataset, self.split, self.data_dir)
    record = self._source[i]
    image = np.asarray(record[self._image_key], np.uint8)
    return (image[..., None] if image.ndim == 2 else image), int(record['label'])

  def __getstate__(self):
    state = self.__dict__.copy()
    state['_source'] = None
    return state

  def __repr__(self):
    return f'TfdsSource({self.name}, {self._len} examples)'
