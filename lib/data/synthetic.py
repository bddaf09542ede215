"""A small learnable dataset of variable-size JPEGs in the `records` format (records.py),
generated with no download: the whole record path (ArrayRecord, JPEG decoding, host
transforms, worker processes) in tests and on a laptop."""
import colorsys
import hashlib
import os
import shutil
import tempfile

import numpy as np

from lib.data.records import META, encode_image, write_meta, write_records


_SHAPES = ('disc', 'square', 'diamond', 'ring', 'stripes')
_SYNTHETIC_VERSION = 1   # bump when the generator's output changes (cached dirs are keyed on it)


def _class_colour(label: int, num_classes: int, rng) -> np.ndarray:
  """The class's hue (evenly spaced, jittered by a quarter of the spacing), as RGB 0..255."""
  hue = ((label + rng.uniform(-0.25, 0.25)) / num_classes) % 1.0
  value = 0.95 if (label // len(_SHAPES)) % 2 == 0 else 0.75
  return np.array(colorsys.hsv_to_rgb(hue, 0.9, value)) * 255 * rng.uniform(0.85, 1.1)


def _noise_crop(rng, bank: np.ndarray, h: int, w: int) -> np.ndarray:
  """A random h x w window of a split's bank of Gaussian noise (cheaper than fresh noise)."""
  top = int(rng.integers(0, bank.shape[0] - h + 1))
  left = int(rng.integers(0, bank.shape[1] - w + 1))
  return bank[top:top + h, left:left + w]


def _synthetic_image(rng, bank: np.ndarray, label: int, num_classes: int, min_size: int,
                     max_size: int) -> np.ndarray:
  """A noisy grey background of random size with the class's coloured shape on it."""
  h, w = (int(s) for s in rng.integers(min_size, max_size + 1, size=2))
  image = _noise_crop(rng, bank, h, w) * np.float32(20) + np.float32(rng.uniform(60, 190))
  r = rng.uniform(0.25, 0.45) * min(h, w)
  cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
  dy = ((np.arange(h, dtype=np.float32) - cy) / r)[:, None]
  dx = ((np.arange(w, dtype=np.float32) - cx) / r)[None, :]
  d = np.sqrt(dy ** 2 + dx ** 2)
  square = np.maximum(abs(dy), abs(dx)) <= 0.85
  mask = {'disc': d <= 1, 'square': square, 'diamond': abs(dy) + abs(dx) <= 1,
          'ring': (d >= 0.55) & (d <= 1),
          'stripes': square & (np.floor((dy + 1) * 3) % 2 == 0)}[_SHAPES[label % len(_SHAPES)]]
  colour = _class_colour(label, num_classes, rng).astype(np.float32)
  image[mask] = colour + _noise_crop(rng, bank, h, w)[mask] * np.float32(8)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def make_synthetic_jpeg(directory: str, n_train: int = 640, n_test: int = 160,
                        num_classes: int = 10, seed: int = 0, min_size: int = 40,
                        max_size: int = 160) -> str:
  """Writes train.array_record, test.array_record and meta.json of a learnable dataset of
  JPEGs (quality 90) into `directory`: each class a hue and a shape (disc, square, diamond,
  ring, stripes) at a random place and scale on a noisy grey background; sides drawn
  independently in [min_size, max_size]; balanced labels. Deterministic for the arguments."""
  os.makedirs(directory, exist_ok=True)
  for split, n, stream in (('train', n_train, 0), ('test', n_test, 1)):
    rng = np.random.default_rng([seed, stream])
    labels = rng.permutation(np.arange(n) % num_classes)
    bank = rng.standard_normal((2 * max_size, 2 * max_size, 3), dtype=np.float32)
    images = (_synthetic_image(rng, bank, int(y), num_classes, min_size, max_size)
              for y in labels)
    write_records(os.path.join(directory, f'{split}.array_record'),
                  ((encode_image(x), int(y)) for x, y in zip(images, labels)))
  write_meta(directory, num_classes, generator='make_synthetic_jpeg', n_train=n_train,
             n_test=n_test, seed=seed, min_size=min_size, max_size=max_size)
  return directory


def synthetic_jpeg_dir(n_train: int = 640, n_test: int = 160, num_classes: int = 10,
                       seed: int = 0, min_size: int = 40, max_size: int = 160) -> str:
  """make_synthetic_jpeg's directory for these arguments under the temp directory, generated
  once per machine: into a private temp dir, renamed into place; a process that loses the
  race to create it uses the winner's."""
  args = (_SYNTHETIC_VERSION, n_train, n_test, num_classes, seed, min_size, max_size)
  key = hashlib.sha1(repr(args).encode()).hexdigest()[:16]
  final = os.path.join(tempfile.gettempdir(), f'ablations-synthetic-jpeg-{key}')
  if os.path.exists(os.path.join(final, META)):
    return final
  tmp = tempfile.mkdtemp(prefix=os.path.basename(final) + '.tmp-', dir=os.path.dirname(final))
  try:
    make_synthetic_jpeg(tmp, n_train, n_test, num_classes, seed, min_size, max_size)
    try:
      os.rename(tmp, final)
    except OSError:
      if not os.path.exists(os.path.join(final, META)):
        raise
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return final
