import jax
import jax.numpy as jnp
import numpy as np
import ml_collections

from lib import augment
from lib.config import base_config


def aug_config(**kw):
  c = base_config().augment
  c.update(kw)
  return c


def images(b=16, h=8, w=8, c=3):
  return jnp.asarray(np.random.RandomState(0).rand(b, h, w, c).astype(np.float32)) + 0.1


def test_random_crop_is_a_shifted_window_of_the_zero_padded_image():
  x = images()
  p = 2
  out = np.asarray(augment.random_crop(jax.random.PRNGKey(1), x, aug_config(crop_padding=p)))
  padded = np.pad(np.asarray(x), ((0, 0), (p, p), (p, p), (0, 0)))
  offsets = set()
  for i in range(x.shape[0]):
    hits = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
            if np.array_equal(out[i], padded[i, dy:dy + 8, dx:dx + 8])]
    assert len(hits) == 1, f'example {i} is not a single crop window'
    offsets.add(hits[0])
  assert len(offsets) > 4   # offsets differ between examples


def test_random_flip_mirrors_about_half_the_images():
  x = images(b=400)
  out = np.asarray(augment.random_flip(jax.random.PRNGKey(2), x, aug_config(flip=True)))
  same = np.all(out == np.asarray(x), axis=(1, 2, 3))
  mirrored = np.all(out == np.asarray(x)[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same ^ mirrored)
  assert 0.4 < mirrored.mean() < 0.6


def test_apply_with_everything_off_is_identity_and_on_uses_each():
  x = images()
  key = jax.random.PRNGKey(0)
  np.testing.assert_array_equal(augment.apply(key, x, aug_config()), x)
  assert [a.name for a in augment.active(aug_config(crop_padding=4, flip=True))] == ['crop', 'flip']
  assert not np.array_equal(augment.apply(key, x, aug_config(flip=True)), x)


def test_enabling_one_augmentation_keeps_the_others_random_stream():
  # flip's draw must not move when crop is switched on: compare flip decisions.
  x = jnp.broadcast_to(jnp.arange(8, dtype=jnp.float32)[None, None, :, None], (64, 8, 8, 1))
  key = jax.random.PRNGKey(3)
  only_flip = augment.apply(key, x, aug_config(flip=True))
  both = augment.apply(key, x, aug_config(flip=True, crop_padding=1))
  # Crop moves columns by at most 1; a flip reverses the ramp, visible in its slope.
  slope = lambda y: np.sign(np.asarray(y)[:, 4, 6, 0] - np.asarray(y)[:, 4, 1, 0])
  np.testing.assert_array_equal(slope(only_flip), slope(both))
