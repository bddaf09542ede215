"""lib/data/records.py: the record format, the sources, the host transforms and the
synthetic JPEG dataset. No JAX here: the module runs in grain worker processes."""
import json
import math
import os
import pickle
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

from lib.core.errors import UserError
from lib.data import records as R
from lib.data import synthetic as S
from lib.data import transforms as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _image(h, w, seed=0, c=3):
  """A smooth random image (JPEG keeps it close), HWC uint8."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (4, 4, c)).astype(np.uint8)
  pil = Image.fromarray(small[..., 0] if c == 1 else small)
  out = np.asarray(pil.resize((w, h), Image.BILINEAR))
  return out[..., None] if c == 1 else out


def _write(path, images, labels, fmt='PNG', num_classes=None):
  R.write_records(str(path), ((R.encode_image(x, fmt, quality=95), y)
                              for x, y in zip(images, labels)))
  if num_classes is not None:
    R.write_meta(os.path.dirname(str(path)), num_classes)


def test_importing_records_imports_neither_jax_nor_grain():
  code = ('import sys, lib.data.records; '
          'assert "jax" not in sys.modules and "grain" not in sys.modules, sorted(sys.modules)')
  subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True)


def test_encode_decode_record():
  raw = R.encode_record(b'\xff\xd8abc', 7)
  assert raw == b'\x07\x00\x00\x00\xff\xd8abc'
  assert R.decode_record(raw, 'r') == (b'\xff\xd8abc', 7)
  assert R.decode_record(R.encode_record(b'', -3), 'r') == (b'', -3)
  with pytest.raises(R.CorruptRecord, match='^r: 3-byte record'):
    R.decode_record(b'abc', 'r')
  with pytest.raises(ValueError, match='int32'):
    R.encode_record(b'', 2 ** 31)


def test_round_trip_png_exact_jpeg_close_over_several_files(tmp_path):
  shapes = [(20, 30), (33, 17), (64, 64)]
  png = [_image(h, w, i) for i, (h, w) in enumerate(shapes)]
  jpg = [_image(h, w, 10 + i) for i, (h, w) in enumerate(shapes)]
  gray = _image(25, 35, 99, c=1)
  _write(tmp_path / 'a.array_record', png + [gray], [3, 0, 4, 1], 'PNG', num_classes=5)
  _write(tmp_path / 'b.array_record', jpg, [2, 2, 1], 'JPEG')
  assert sorted(os.listdir(tmp_path)) == ['a.array_record', 'b.array_record', 'meta.json']
  for spec in (str(tmp_path / '*.array_record'),
               [tmp_path / 'a.array_record', str(tmp_path / 'b.array_record')]):
    src = R.RecordFileSource(spec)
    assert len(src) == 7 and src.num_classes == 5 and src.channels == 3
    assert [src[i][1] for i in range(7)] == [3, 0, 4, 1, 2, 2, 1]
    for i, x in enumerate(png):
      np.testing.assert_array_equal(src[i][0], x)
    y = src[3][0]
    assert y.shape == (25, 35, 3) and y.dtype == np.uint8   # grayscale comes back RGB
    for k in range(3):
      np.testing.assert_array_equal(y[..., k], gray[..., 0])
    for i, x in enumerate(jpg):
      got = src[4 + i][0].astype(int)
      assert got.shape == x.shape and src[4 + i][0].dtype == np.uint8
      assert np.abs(got - x).mean() < 6 < 30 < np.abs(got - jpg[i - 1][:1, :1]).mean(), i
    np.testing.assert_array_equal(src[-1][0], src[6][0])
    assert src.locate(4) == (1, 0) and src.where(5).endswith('b.array_record record 1')
  with pytest.raises(IndexError):
    src[7]
  assert R.RecordFileSource(tmp_path / 'b.array_record', num_classes=3).num_classes == 3


def test_write_records_is_atomic(tmp_path):
  path = tmp_path / 'x.array_record'
  _write(path, [_image(8, 8)], [1])
  before = path.read_bytes()

  def failing():
    yield R.encode_image(_image(8, 8, 1), 'PNG'), 0
    raise RuntimeError('boom')
  with pytest.raises(RuntimeError, match='boom'):
    R.write_records(str(path), failing())
  assert os.listdir(tmp_path) == ['x.array_record'] and path.read_bytes() == before
  assert R.write_records(str(path), [(b'img', 1), (b'img2', 2)]) == 2
  assert len(R.RecordFileSource(path, num_classes=3)) == 2


def test_record_source_pickles_without_readers_and_reads_after(tmp_path):
  images = [_image(40, 50, i) for i in range(6)]
  _write(tmp_path / 'train.array_record', images, list(range(6)), num_classes=6)
  src = R.RecordFileSource(str(tmp_path / 'train.array_record'))
  first = src[2]                      # opens a reader, which must not travel
  blob = pickle.dumps(src)
  assert len(blob) < 1000 < os.path.getsize(tmp_path / 'train.array_record')
  clone = pickle.loads(blob)
  assert clone._readers == [None] and len(clone) == 6 and clone.num_classes == 6
  np.testing.assert_array_equal(clone[2][0], first[0])
  assert clone[2][1] == 2 and clone._readers[0] is not None
  np.testing.assert_array_equal(pickle.loads(pickle.dumps(clone))[5][0], images[5])


def test_corrupt_records_raise_one_line_naming_file_and_record(tmp_path):
  good = R.encode_image(np.random.default_rng(0).integers(0, 256, (60, 80, 3)), 'JPEG')
  png = R.encode_image(_image(30, 40), 'PNG')
  payloads = [good, np.random.default_rng(0).bytes(300), good[:len(good) * 3 // 4], good,
              b'', R.encode_image(_image(4, 4), 'GIF'), good[:40], png[:len(png) // 2]]
  labels = [0, 1, 2, 9, 1, 0, 1, 2]
  path = tmp_path / 'train.array_record'
  R.write_records(str(path), zip(payloads, labels))
  from array_record.python.array_record_module import ArrayRecordWriter
  w = ArrayRecordWriter(str(tmp_path / 'short.array_record'), 'group_size:1')
  w.write(b'ab')
  w.close()
  src = R.RecordFileSource([path, tmp_path / 'short.array_record'], num_classes=3)
  assert src[0][0].shape == (60, 80, 3)
  expect = {1: 'not a JPEG/PNG image (cannot identify image file)',
            2: 'corrupt JPEG image (image file is truncated',
            3: 'label 9 outside 0..2',
            4: 'not a JPEG/PNG image',
            5: 'not a JPEG/PNG image',
            6: 'corrupt JPEG image',
            7: 'corrupt PNG image',
            8: '2-byte record, too short for a label'}
  for i, reason in expect.items():
    with pytest.raises(R.CorruptRecord) as e:
      src[i]
    msg = str(e.value)
    assert isinstance(e.value, UserError) and '\n' not in msg and len(msg) < 300, msg
    name, k = ('short.array_record', 0) if i == 8 else ('train.array_record', i)
    assert msg.startswith(f'records {tmp_path / name} record {k}: {reason}'), msg
    assert '_io.BytesIO' not in msg


def test_missing_and_unreadable_files_are_one_line(tmp_path):
  (tmp_path / 'junk.array_record').write_bytes(b'not an array record')
  (tmp_path / 'sub').mkdir()
  _write(tmp_path / 'sub' / 'x.array_record', [_image(8, 8)], [0])
  cases = {str(tmp_path / 'nope.array_record'): 'no such file',
           str(tmp_path / 'nope-*.array_record'): 'no file matches this glob',
           str(tmp_path): 'is a directory',
           str(tmp_path / 'junk.array_record'): 'is not a readable ArrayRecord file',
           str(tmp_path / 'sub' / 'x.array_record'): 'num_classes unknown'}
  for path, reason in cases.items():
    with pytest.raises(UserError) as e:
      R.RecordFileSource(path)
    msg = str(e.value)
    assert '\n' not in msg and path in msg and reason in msg, msg
  (tmp_path / 'sub' / 'meta.json').write_text('{"classes": 3}')
  with pytest.raises(UserError, match='needs {"num_classes": N}'):
    R.RecordFileSource(str(tmp_path / 'sub' / 'x.array_record'))


def test_array_source_views_and_checks():
  images = np.arange(5 * 4 * 6 * 3, dtype=np.uint8).reshape(5, 4, 6, 3)
  labels = np.array([0, 1, 2, 1, 0])
  src = R.ArraySource(images, labels, 3, 'toy')
  assert len(src) == 5 and src.num_classes == 3 and src.channels == 3 and src.name == 'toy'
  x, y = src[3]
  assert np.shares_memory(x, images) and y == 1 and type(y) is int
  np.testing.assert_array_equal(x, images[3])
  clone = pickle.loads(pickle.dumps(src))
  np.testing.assert_array_equal(clone[4][0], images[4])
  with pytest.raises(UserError, match='toy: images must be uint8'):
    R.ArraySource(images.astype(np.float32), labels, 3, 'toy')
  with pytest.raises(UserError, match='does not match 5 images'):
    R.ArraySource(images, labels[:4], 3, 'toy')


def test_tfds_source_with_mock_data(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=6):
    src = R.TfdsSource('cifar10', 'train')
    assert len(src) == 6 and src.num_classes == 10 and src.channels == 3
    x, y = src[4]
    assert x.shape == (32, 32, 3) and x.dtype == np.uint8 and 0 <= y < 10 and type(y) is int
    clone = pickle.loads(pickle.dumps(src))
    assert clone._source is None
    np.testing.assert_array_equal(clone[4][0], x)
    assert clone[4][1] == y
  with pytest.raises(UserError) as e:
    R.TfdsSource('cifar10', 'train', str(tmp_path))
  msg = str(e.value)
  assert '\n' not in msg and 'tfds build cifar10 --file_format=array_record' in msg, msg


# ---------------------------------------------------------------------------- transforms

def test_crop_boxes_respect_scale_ratio_and_bounds():
  rng = np.random.default_rng(0)
  height, width = 300, 400
  for scale, ratio in (((0.08, 1.0), (3 / 4, 4 / 3)), ((0.5, 1.0), (0.5, 2.0))):
    fracs, aspects = [], []
    for _ in range(2000):
      top, left, h, w = T.sample_crop_box(height, width, rng, scale, ratio)
      assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
      fracs.append(h * w / (height * width))
      aspects.append(w / h)
    fracs, aspects = np.array(fracs), np.array(aspects)
    # Rounding the sides to pixels moves the area and aspect slightly.
    assert fracs.min() >= scale[0] * 0.97 and fracs.max() <= 1
    assert aspects.min() >= ratio[0] * 0.97 and aspects.max() <= ratio[1] * 1.03
    assert fracs.min() < scale[0] + 0.02 and fracs.max() > 0.9   # the whole range is used


def test_crop_box_distribution_uniform_area_log_uniform_aspect():
  rng = np.random.default_rng(1)
  fracs = np.array([np.prod(T.sample_crop_box(256, 256, rng, (0.25, 0.5), (1, 1))[2:]) / 256 ** 2
                    for _ in range(3000)])
  assert abs(fracs.mean() - 0.375) < 0.01      # area (not side) uniform in the scale range
  assert abs(np.quantile(fracs, 0.25) - 0.3125) < 0.01
  boxes = [T.sample_crop_box(1000, 1000, rng, (0.01, 0.02), (0.5, 2)) for _ in range(3000)]
  logs = np.array([math.log(w / h) for _, _, h, w in boxes])
  q = math.log(2) / 2                          # quartiles of uniform(-log 2, log 2)
  assert abs(logs.mean()) < 0.03 and abs(np.quantile(logs, 0.75) - q) < 0.04
  assert abs(np.quantile(logs, 0.25) + q) < 0.04


def test_crop_box_falls_back_to_a_centred_clamped_crop():
  # A 10 x 400 strip: no sample fits, so the centre, aspect clamped to 4/3.
  assert T.sample_crop_box(10, 400, np.random.default_rng(0)) == (0, (400 - 13) // 2, 10, 13)
  assert T.sample_crop_box(400, 10, np.random.default_rng(0)) == ((400 - 13) // 2, 0, 13, 10)
  with pytest.raises(ValueError):
    T.sample_crop_box(10, 10, np.random.default_rng(0), scale=(0.5, 0.2))


def test_random_resized_crop_shape_determinism_and_content():
  image = np.random.default_rng(0).integers(0, 256, (90, 130, 3)).astype(np.uint8)
  a = T.random_resized_crop(image, 32, np.random.default_rng(5))
  assert a.shape == (32, 32, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, T.random_resized_crop(image, 32, np.random.default_rng(5)))
  assert not np.array_equal(a, T.random_resized_crop(image, 32, np.random.default_rng(6)))
  assert T.random_resized_crop(image[..., :1], 24, np.random.default_rng(5)).shape == (24, 24, 1)
  # The crop is of the sampled box: scale and ratio pinned to the whole image give the
  # whole image resized; a constant image stays constant.
  whole = T.random_resized_crop(image, 32, np.random.default_rng(0), (1, 1), (130 / 90,) * 2)
  np.testing.assert_array_equal(
      whole, np.asarray(Image.fromarray(image).resize((32, 32), Image.BILINEAR)))
  flat = np.full((50, 70, 3), (10, 200, 30), np.uint8)
  assert (T.random_resized_crop(flat, 16, np.random.default_rng(1)) == (10, 200, 30)).all()
  # And of that box's place: a left-half-black image's crops are darker on their left.
  half = np.full((100, 100, 3), 255, np.uint8)
  half[:, :50] = 0
  lefts = []
  for seed in range(30):
    rng = np.random.default_rng(seed)
    top, left, h, w = T.sample_crop_box(100, 100, np.random.default_rng(seed))
    out = T.random_resized_crop(half, 20, rng)
    if left + w <= 45:
      assert out.max() == 0
    if left >= 55:
      assert out.min() == 255
    lefts.append(left)
  assert min(lefts) < 45 and max(lefts) > 5


def test_center_resize_crop_takes_the_centre_at_the_right_scale():
  h, w, size = 100, 200, 32
  xs, ys = np.meshgrid(np.arange(w), np.arange(h))
  image = np.stack([xs, ys * 2, np.zeros_like(xs)], -1).astype(np.uint8)
  out = T.center_resize_crop(image, size)            # shorter side to round(32 / 0.875) = 37
  assert out.shape == (size, size, 3) and out.dtype == np.uint8
  nh, nw = 37, 74
  top, left = (nh - size) // 2, (nw - size) // 2

  def source_coord(j, scale):   # pixel centre of resized column j in the original
    return (j + 0.5) * scale - 0.5
  assert abs(out[5, 0, 0] - source_coord(left, w / nw)) < 1.0
  assert abs(out[5, -1, 0] - source_coord(left + size - 1, w / nw)) < 1.0
  assert abs(out[0, 5, 1] - 2 * source_coord(top, h / nh)) < 2.0
  assert abs(out[-1, 5, 1] - 2 * source_coord(top + size - 1, h / nh)) < 2.0
  # A tall image: the centre rows; the known centre colour fills the crop.
  tall = np.zeros((160, 80, 3), np.uint8)
  tall[20:140] = (255, 0, 0)   # a crop aligned to the top would take black rows
  out = T.center_resize_crop(tall, 16)
  assert out.shape == (16, 16, 3) and (out[..., 0] > 240).all() and (out[..., 1:] < 15).all()
  # crop_fraction 1 on an image of the size: returned as is.
  small = np.random.default_rng(0).integers(0, 256, (16, 16, 3)).astype(np.uint8)
  assert T.center_resize_crop(small, 16, 1.0) is small
  assert T.eval_transform(image, size).shape == (size, size, 3)
  np.testing.assert_array_equal(T.eval_transform(image, size), T.center_resize_crop(image, size))


def test_flip_half_the_time_and_deterministic():
  image = np.random.default_rng(0).integers(0, 256, (8, 10, 3)).astype(np.uint8)
  flipped = 0
  for seed in range(600):
    out = T.flip(image, np.random.default_rng(seed))
    np.testing.assert_array_equal(out, T.flip(image, np.random.default_rng(seed)))
    if np.array_equal(out, image[:, ::-1]):
      flipped += 1
    else:
      np.testing.assert_array_equal(out, image)
  assert 0.42 < flipped / 600 < 0.58


def test_train_transform_and_example_rng():
  image = np.random.default_rng(0).integers(0, 256, (70, 90, 3)).astype(np.uint8)
  r = T.example_rng(3, 1, 7)
  assert r.random() == np.random.default_rng([3, 1, 7]).random()
  assert T.example_rng(3, 1, 7).random() != T.example_rng(3, 1, 8).random()
  assert T.example_rng(3, 1, 7).random() != T.example_rng(3, 2, 7).random()
  plain = T.train_transform(image, 24, T.example_rng(0, 0, 0), scale_lo=0.3, flip=False)
  np.testing.assert_array_equal(
      plain, T.random_resized_crop(image, 24, T.example_rng(0, 0, 0), scale=(0.3, 1.0)))
  n_flipped = 0
  for i in range(40):
    rng = T.example_rng(0, 0, i)
    crop = T.random_resized_crop(image, 24, rng, scale=(0.3, 1.0))
    expect = T.flip(crop, rng)
    got = T.train_transform(image, 24, T.example_rng(0, 0, i), scale_lo=0.3)
    np.testing.assert_array_equal(got, expect)
    n_flipped += not np.array_equal(got, crop)
  assert 5 < n_flipped < 35


# ------------------------------------------------------------------------ synthetic JPEGs

def _features(src, k=8):
  xs, ys = [], []
  for i in range(len(src)):
    image, label = src[i]
    xs.append(np.asarray(Image.fromarray(image).resize((k, k), Image.BILINEAR), np.float32).ravel())
    ys.append(label)
  return np.array(xs), np.array(ys)


def test_make_synthetic_jpeg_deterministic_variable_size_and_learnable(tmp_path):
  a = S.make_synthetic_jpeg(str(tmp_path / 'a'), n_train=640, n_test=160, seed=3)
  b = S.make_synthetic_jpeg(str(tmp_path / 'b'), n_train=640, n_test=10, seed=3)
  c = S.make_synthetic_jpeg(str(tmp_path / 'c'), n_train=640, n_test=10, seed=4)
  assert sorted(os.listdir(a)) == ['meta.json', 'test.array_record', 'train.array_record']
  assert json.load(open(os.path.join(a, 'meta.json')))['num_classes'] == 10
  train = R.RecordFileSource(os.path.join(a, 'train.array_record'))
  test = R.RecordFileSource(os.path.join(a, 'test.array_record'))
  assert len(train) == 640 and len(test) == 160 and train.num_classes == 10
  # Deterministic: the same seed gives the same records, another seed others.
  same = R.RecordFileSource(os.path.join(b, 'train.array_record'))
  assert all(train.raw(i) == same.raw(i) for i in range(640))
  other = R.RecordFileSource(os.path.join(c, 'train.array_record'))
  assert sum(other.raw(i) == same.raw(i) for i in range(640)) == 0
  shapes = [train[i][0].shape for i in range(len(train))]
  hs, ws = np.array([s[0] for s in shapes]), np.array([s[1] for s in shapes])
  assert hs.min() >= 40 and ws.min() >= 40 and hs.max() <= 160 and ws.max() <= 160
  assert len(set(shapes)) > 300 and (hs != ws).mean() > 0.9 and hs.max() - hs.min() > 100
  assert np.bincount([train[i][1] for i in range(len(train))], minlength=10).tolist() == [64] * 10
  # Separable: a nearest-class-mean classifier on 8x8 thumbnails is far above chance (0.1).
  xtr, ytr = _features(train)
  xte, yte = _features(test)
  means = np.stack([xtr[ytr == k].mean(0) for k in range(10)])
  accuracy = (((xte[:, None] - means[None]) ** 2).sum(-1).argmin(1) == yte).mean()
  assert accuracy > 0.4, accuracy


def test_synthetic_jpeg_dir_generates_once_and_survives_a_lost_race(tmp_path, monkeypatch):
  monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path))
  path = S.synthetic_jpeg_dir(20, 10, 4, 0)
  assert os.path.dirname(path) == str(tmp_path)
  assert os.path.basename(path).startswith('ablations-synthetic-jpeg-')
  assert len(R.RecordFileSource(os.path.join(path, 'train.array_record'))) == 20
  stamp = os.path.getmtime(os.path.join(path, 'train.array_record'))
  assert S.synthetic_jpeg_dir(20, 10, 4, 0) == path
  assert os.path.getmtime(os.path.join(path, 'train.array_record')) == stamp
  assert S.synthetic_jpeg_dir(20, 10, 4, 1) != path
  # Another process finishes first while this one generates: this one uses the winner's.
  real = S.make_synthetic_jpeg
  calls = []

  def racing(directory, *args):
    calls.append(directory)
    real(directory, *args)
    real(directory.split('.tmp-')[0], *args)   # the final directory, made by the winner
  monkeypatch.setattr(S, 'make_synthetic_jpeg', racing)
  got = S.synthetic_jpeg_dir(20, 10, 4, 2)
  assert len(calls) == 1 and calls[0].startswith(got + '.tmp-')
  assert len(R.RecordFileSource(os.path.join(got, 'test.array_record'))) == 10
  assert sorted(os.listdir(tmp_path)) == sorted(   # the loser's temp dir is gone
      os.path.basename(p) for p in (path, S.synthetic_jpeg_dir(20, 10, 4, 1), got))
