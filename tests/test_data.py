import os
import pickle

import numpy as np
import pytest
import ml_collections

from lib.core.config import base_config
from lib.core.errors import UserError
from lib.data import datasets as data
from tests.conftest import SHARED_CIFAR


def data_config(**kw):
  c = base_config().data
  c.update(kw)
  return c


@pytest.mark.skipif(not os.path.isdir(SHARED_CIFAR), reason=f'{SHARED_CIFAR} absent')
def test_cifar_dir_reader_on_real_subset():
  train, test, num_classes = data.SOURCES.get('cifar_dir').fn(
      data_config(source='cifar_dir', path=SHARED_CIFAR))
  assert train[0].shape == (4068, 32, 32, 3) and train[0].dtype == np.uint8
  ds = data.load(data_config(source='cifar_dir', path=SHARED_CIFAR, val_fraction=0.1))
  assert len(ds.train[1]) + len(ds.val[1]) == 4068 and len(ds.val[1]) == 407
  assert ds.test[0].shape == (1017, 32, 32, 3)
  assert ds.num_classes == 10
  for _, labels in (ds.train, ds.test):
    assert labels.min() == 0 and labels.max() == 9
  # Channel order: pixel (0,0) of image 0 is (data[0], data[1024], data[2048]).
  with open(os.path.join(SHARED_CIFAR, 'data_batch_1'), 'rb') as f:
    raw = pickle.load(f, encoding='bytes')[b'data']
  np.testing.assert_array_equal(train[0][0, 0, 0], raw[0, [0, 1024, 2048]])
  np.testing.assert_array_equal(train[0][0, 1, 2], raw[0, [34, 1024 + 34, 2048 + 34]])
  # And it is the real images: sky-and-sea classes (airplane, ship) are bluer than red.
  x, y = train
  for cls in (0, 8):
    rgb = x[y == cls].reshape(-1, 3).mean(0)
    assert rgb[2] > rgb[0], (cls, rgb)


def _write_batch(path, n, seed, label_key=b'labels', filenames=False):
  rng = np.random.RandomState(seed)
  d = {b'data': rng.randint(0, 256, (n, 3072)).astype(np.uint8),
       label_key: list(rng.randint(0, 10, n))}
  if filenames:
    d[b'filenames'] = [b'x.png'] * n
  with open(path, 'wb') as f:
    pickle.dump(d, f)
  return d


def test_cifar_dir_without_filenames_and_cifar100_layout(tmp_path):
  c10 = tmp_path / 'c10'
  c10.mkdir()
  b1 = _write_batch(c10 / 'data_batch_1', 30, 0)
  _write_batch(c10 / 'data_batch_2', 20, 1, filenames=True)
  _write_batch(c10 / 'test_batch', 10, 2)
  (images, _), test, num_classes = data.SOURCES.get('cifar_dir').fn(
      data_config(source='cifar_dir', path=str(c10)))
  assert len(images) == 50 and len(test[1]) == 10 and num_classes == 10
  np.testing.assert_array_equal(images[0].transpose(2, 0, 1).reshape(-1), b1[b'data'][0])
  with pytest.raises(UserError, match='no validation images'):
    data.load(data_config(source='cifar_dir', path=str(c10), val_fraction=0.001))
  c100 = tmp_path / 'c100'
  c100.mkdir()
  _write_batch(c100 / 'train', 40, 3, label_key=b'fine_labels')
  _write_batch(c100 / 'test', 10, 4, label_key=b'fine_labels')
  ds = data.load(data_config(source='cifar_dir', path=str(c100), val_fraction=0.25))
  assert ds.num_classes == 100 and len(ds.train[1]) == 30 and len(ds.val[1]) == 10


def test_missing_paths_fail_clearly(tmp_path):
  with pytest.raises(UserError, match='data.path'):
    data.load(data_config(source='cifar_dir', path=str(tmp_path / 'nope')))
  with pytest.raises(UserError, match='data.path'):
    data.load(data_config(source='npz', path=str(tmp_path / 'nope.npz')))
  with pytest.raises(UserError, match='valid: cifar_dir, digits, npz, records, synthetic_jpeg, tfds'):
    data.load(data_config(source='imagenet'))


def test_npz_source_and_shape_check(tmp_path):
  rng = np.random.RandomState(0)
  images = rng.randint(0, 256, (40, 16, 16, 3)).astype(np.uint8)
  labels = rng.randint(0, 5, 40)
  np.savez(tmp_path / 'd.npz', images=images, labels=labels, test_images=images[:8],
           test_labels=labels[:8])
  ds = data.load(data_config(source='npz', path=str(tmp_path / 'd.npz'), val_fraction=0.25))
  assert ds.image_shape == (16, 16, 3) and len(ds.val[1]) == 10 and len(ds.test[1]) == 8
  assert ds.num_classes == labels.max() + 1
  np.savez(tmp_path / 'bad.npz', images=images[..., 0], labels=labels)
  with pytest.raises(UserError, match=r'\(N, H, W, C\)'):
    data.load(data_config(source='npz', path=str(tmp_path / 'bad.npz')))


def test_digits_fixed_splits_and_train_only_statistics():
  a = data.load(data_config(source='digits'))
  b = data.load(data_config(source='digits'))
  assert a.image_shape == (8, 8, 1) and a.num_classes == 10
  n = len(a.train[1]) + len(a.val[1]) + len(a.test[1])
  assert n == 1797 and len(a.test[1]) == 360 and len(a.val[1]) == round(1437 * 0.1)
  np.testing.assert_array_equal(a.val[0], b.val[0])   # deterministic
  # No image is in two splits.
  keys = lambda x: {im.tobytes() + bytes([l]) for im, l in zip(*x)}
  assert not keys(a.train) & keys(a.test) and not keys(a.val) & keys(a.test)
  np.testing.assert_allclose(a.mean, [a.train[0].mean() / 255.0], rtol=1e-5)
  assert not np.isclose(a.mean, np.concatenate([a.train[0], a.test[0]]).mean() / 255.0, rtol=1e-6)


def test_val_split_is_fixed_and_independent_of_seed():
  tr, va = data.split_train_val(100, 0.2, 0)
  tr2, va2 = data.split_train_val(100, 0.2, 0)
  np.testing.assert_array_equal(va, va2)
  assert len(va) == 20 and not set(tr) & set(va) and len(set(tr) | set(va)) == 100
  assert not np.array_equal(va, data.split_train_val(100, 0.2, 1)[1])


def test_tfds_data_source_with_mock_data():
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=24):
    ds = data.load(data_config(source='tfds', name='cifar10', val_fraction=0.25))
  assert ds.image_shape == (32, 32, 3) and ds.num_classes == 10
  assert len(ds.train[1]) == 18 and len(ds.val[1]) == 6 and len(ds.test[1]) == 24
  assert ds.train[0].dtype == np.uint8 and ds.train[1].dtype == np.int32


def test_tfds_images_of_several_sizes_are_one_line_or_streamed():
  """A dataset of variable-size images (tf_flowers) is refused in one line before any
  decoding when held in memory (np.stack failed after decoding it all), and read record by
  record, brought to data.image_size, on the stream path."""
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=8):
    with pytest.raises(UserError, match=r"'tf_flowers' has images of several sizes .*"
                                        r"--config.data.image_size=S"):
      data.load(data_config(source='tfds', name='tf_flowers', val_fraction=0.25))
    ds = data.load(data_config(source='tfds', name='tf_flowers', val_fraction=0.25,
                               image_size=16))
    assert not ds.in_memory and ds.num_classes == 5 and ds.image_shape == (16, 16, 3)
    assert ds.num_examples('train') == 6 and ds.num_examples('val') == 2
    image, label = ds.source_of('train')[3]
    assert np.asarray(image).dtype == np.uint8 and np.asarray(image).ndim == 3 and 0 <= label < 5
