import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from lib.core.config import base_config
from lib.core.errors import UserError
from lib.training import augment


def aug_config(**kw):
  c = base_config().augment
  c.update(kw)
  return c


def hp_of(c, **kw):
  hp = augment.hparams(c)
  hp.update({k: np.float32(v) for k, v in kw.items()})
  return {k: jnp.asarray(v) for k, v in hp.items()}


@functools.lru_cache(maxsize=None)
def jitted(fn, *static):
  return jax.jit(fn, static_argnums=static)


def run(fn, key, x, c, hp=None):
  """fn(key, x, c, hp) compiled once per config and shape (eager dispatch is slow)."""
  hp = hp_of(c) if hp is None else hp
  x = np.asarray(x, np.float32)   # one input type, so one compile per shape
  return jitted(fn, 2)(key, x, ml_collections.FrozenConfigDict(c), hp)


def run_apply(key, x, c, stage, hp=None):
  hp = hp_of(c) if hp is None else hp
  return jitted(augment.apply, 2, 4)(key, x, ml_collections.FrozenConfigDict(c), hp, stage)


def images(b=16, h=8, w=8, c=3):
  return jnp.asarray(np.random.RandomState(0).rand(b, h, w, c).astype(np.float32)) + 0.1


def unit_images(b=16, h=8, w=8, c=3, high=1.0):
  """Uniform on [0, high)."""
  return jnp.asarray(np.random.RandomState(1).uniform(0, high, (b, h, w, c)).astype(np.float32))


def test_random_crop_is_a_shifted_window_of_the_zero_padded_image():
  x = images()
  p = 2
  c = aug_config(crop_padding=p)
  out = np.asarray(run(augment.random_crop, jax.random.PRNGKey(1), x, c, hp_of(c)))
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
  c = aug_config(flip=True)
  out = np.asarray(run(augment.random_flip, jax.random.PRNGKey(2), x, c, hp_of(c)))
  same = np.all(out == np.asarray(x), axis=(1, 2, 3))
  mirrored = np.all(out == np.asarray(x)[:, :, ::-1], axis=(1, 2, 3))
  assert np.all(same ^ mirrored)
  assert 0.4 < mirrored.mean() < 0.6


def test_apply_with_everything_off_is_identity_and_on_uses_each():
  x = images()
  key = jax.random.PRNGKey(0)
  c = aug_config()
  for stage in augment.STAGES:
    np.testing.assert_array_equal(run_apply(key, x, c, stage), x)
  every = aug_config(crop_padding=4, flip=True, resized_crop_scale=0.5, brightness=0.1,
                     cutout_size=2, mixup_alpha=1.0)
  assert [a.name for a in augment.active(every)] == [
      'crop', 'flip', 'resized_crop', 'jitter', 'cutout']
  assert [a.name for a in augment.active(every, 'normalized')] == ['cutout']
  c = aug_config(flip=True)
  assert not np.array_equal(run_apply(key, x, c, 'pixel'), x)
  # cutout is normalized-stage only.
  c = aug_config(cutout_size=4)
  np.testing.assert_array_equal(run_apply(key, x, c, 'pixel'), x)
  assert not np.array_equal(run_apply(key, x, c, 'normalized'), x)


def test_enabling_one_augmentation_keeps_the_others_random_stream():
  # flip's draw must not move when crop (or a later one) is switched on: compare flip decisions.
  x = jnp.broadcast_to(jnp.arange(8, dtype=jnp.float32)[None, None, :, None], (64, 8, 8, 1)) / 8
  key = jax.random.PRNGKey(3)
  slope = lambda y: np.sign(np.asarray(y)[:, 4, 6, 0] - np.asarray(y)[:, 4, 1, 0])
  c = aug_config(flip=True)
  only_flip = slope(run_apply(key, x, c, 'pixel'))
  # Crop moves columns by at most 1; a flip reverses the ramp, visible in its slope.
  c = aug_config(flip=True, crop_padding=1, brightness=0.2, resized_crop_scale=0.0)
  np.testing.assert_array_equal(only_flip, slope(run_apply(key, x, c, 'pixel')))
  assert 0 < (only_flip < 0).sum() < 64


def test_hparams_are_float32_and_bad_values_raise():
  hp = augment.hparams(aug_config(brightness=0.4, cutout_size=8))
  assert set(hp) == set(augment.HP_KEYS)
  assert all(type(v) is np.float32 for v in hp.values())
  assert hp['brightness'] == np.float32(0.4) and hp['cutout_size'] == 8
  for bad in (dict(resized_crop_scale=1.5), dict(resized_crop_scale=-0.1), dict(brightness=-1.0),
              dict(saturation=float('nan')), dict(cutout_size=-1), dict(cutout_patches=0),
              dict(mixup_alpha=-0.5), dict(cutmix_alpha=-1.0), dict(crop_padding=-1)):
    with pytest.raises(UserError, match=list(bad)[0]):
      augment.hparams(aug_config(**bad))


def test_strengths_are_traced_jit_arguments():
  # One program serves every strength: tracing fails if an hp value is turned
  # into a Python number (tracing only; no compile).
  c = aug_config(resized_crop_scale=0.5, brightness=0.5, contrast=0.5, saturation=0.5,
                 cutout_size=3, mixup_alpha=1.0, cutmix_alpha=1.0)
  x, t = unit_images(b=8), jnp.eye(8)

  def step(key, hp):
    y = augment.apply(key, x, c, hp, 'pixel')
    y = augment.apply(key, y, c, hp, 'normalized')
    return augment.mix(jax.random.fold_in(key, 99), y, t, c, hp)

  jax.make_jaxpr(jax.jit(step))(jax.random.PRNGKey(0), hp_of(c))
  stacked = jax.tree.map(lambda v: jnp.stack([v, v]), hp_of(c))
  out = jax.eval_shape(jax.vmap(step, in_axes=(None, 0)), jax.random.PRNGKey(0), stacked)
  assert out[0].shape == (2,) + x.shape and out[1].shape == (2, 8, 8)


# --- cutout -------------------------------------------------------------------

def zero_rectangle(mask):
  """(rows, cols) of the zeroed set if it is a filled axis-aligned rectangle, else None."""
  ys, xs = np.nonzero(mask)
  rows, cols = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
  return (rows, cols) if rows * cols == len(ys) else None


CUTOUT = aug_config(cutout_size=1)   # on; the size itself is the traced hp value
CUT_SHAPE = (256, 10, 10, 2)


@pytest.mark.parametrize('size', [3, 4])
def test_cutout_zeroes_one_size_by_size_square_clipped_at_borders(size):
  b, h, w, ch = CUT_SHAPE
  out = np.asarray(run(augment.cutout, jax.random.PRNGKey(4), np.ones(CUT_SHAPE), CUTOUT,
                       hp_of(CUTOUT, cutout_size=size)))
  assert set(np.unique(out)) <= {0.0, 1.0}
  np.testing.assert_array_equal(out, np.broadcast_to(out[..., :1], out.shape))   # all channels
  clipped = 0
  for i in range(b):
    zero = out[i, :, :, 0] == 0
    rect = zero_rectangle(zero)
    assert rect is not None, f'example {i}: zeroed pixels are not one rectangle'
    ys, xs = np.nonzero(zero)
    at_border = (ys.min() == 0 or xs.min() == 0 or ys.max() == h - 1 or xs.max() == w - 1)
    if not at_border:
      assert rect == (size, size), f'example {i}: {rect} inside the image'
    else:
      assert rect[0] <= size and rect[1] <= size
      clipped += rect != (size, size)
  assert clipped > 0   # some squares hit the border and lose pixels


def test_cutout_size_zero_is_identity():
  x = np.random.RandomState(0).randn(*CUT_SHAPE).astype(np.float32)
  out = run(augment.cutout, jax.random.PRNGKey(5), x, CUTOUT, hp_of(CUTOUT, cutout_size=0))
  np.testing.assert_array_equal(out, x)


def test_cutout_two_patches_zero_at_most_two_squares():
  c = aug_config(cutout_size=3, cutout_patches=2)
  out = np.asarray(run(augment.cutout, jax.random.PRNGKey(5), np.ones(CUT_SHAPE), c))
  zeros = (out[..., 0] == 0).sum((1, 2))
  assert zeros.max() <= 2 * 9
  assert (zeros > 9).mean() > 0.5   # usually two separate squares
  assert zeros.min() >= 1


# --- mixup / cutmix -----------------------------------------------------------
# All mix calls share one shape and one config (both on); the traced alphas pick
# mixup, cutmix or both, so the Beta sampler compiles once.
MB = 64
BOTH = aug_config(mixup_alpha=1.0, cutmix_alpha=1.0)
MIXUP = dict(mixup_alpha=1.0, cutmix_alpha=0.0)
CUTMIX = dict(mixup_alpha=0.0, cutmix_alpha=1.0)


def mix_runs(n, alphas, x=None):
  """n (images_in, images_out, targets_out) with one-hot targets of class = index."""
  x = unit_images(b=MB, h=8, w=8, c=1) if x is None else x
  hp = hp_of(BOTH, **alphas)
  fn = jitted(augment.mix, 3)
  frozen = ml_collections.FrozenConfigDict(BOTH)
  return [(np.asarray(x),) + tuple(np.asarray(a) for a in fn(jax.random.PRNGKey(s), x, jnp.eye(MB), frozen, hp))
          for s in range(n)]


def test_mixup_mixes_images_and_labels_with_the_same_lam():
  (x, out, t), = mix_runs(1, MIXUP)
  np.testing.assert_allclose(t.sum(1), 1, atol=1e-5)
  lam = t[np.arange(MB), np.arange(MB)]   # own label's weight
  others = t.copy()
  others[np.arange(MB), np.arange(MB)] = 0
  partner = others.argmax(1)
  has = lam < 1 - 1e-6   # a partner other than itself
  assert has.mean() > 0.9
  l4 = lam[:, None, None, None]
  np.testing.assert_allclose(out[has], (l4 * x + (1 - l4) * x[partner])[has], atol=1e-5)
  np.testing.assert_allclose(out[~has], x[~has], atol=1e-5)
  assert len(set(partner[has])) > MB // 2   # a permutation, not one partner for all


def test_traced_alpha_zero_is_identity():
  (x, out, t), = mix_runs(1, dict(mixup_alpha=0.0, cutmix_alpha=0.0))
  np.testing.assert_array_equal(out, x)
  np.testing.assert_array_equal(t, np.eye(MB))
  # mix only in the program when c turns it on
  x = images()
  assert augment.mix(jax.random.PRNGKey(0), x, x[:, 0, 0], aug_config(), {})[0] is x


@pytest.mark.parametrize('alpha', [1.0, 0.2])
def test_mixup_lam_follows_beta_alpha_alpha(alpha):
  lam = np.concatenate([t[np.arange(MB), np.arange(MB)]   # the traced alpha is what counts
                        for _, _, t in mix_runs(60, dict(MIXUP, mixup_alpha=alpha))])
  assert abs(lam.mean() - 0.5) < 0.02
  var = 1 / (4 * (2 * alpha + 1))   # Beta(a, a); 1/12 for a = 1 (uniform)
  assert abs(lam.var() - var) < 0.01, (lam.var(), var)


def test_cutmix_label_weights_are_the_pasted_area_fractions():
  h = w = 8
  values = np.arange(1, MB + 1, dtype=np.float32)
  x = jnp.asarray(np.broadcast_to(values[:, None, None, None], (MB, h, w, 1)))
  checked, fractions = 0, []
  for _, out, t in mix_runs(4, CUTMIX, x=x):
    out = out[..., 0]
    for i in range(MB):
      vals = set(np.unique(out[i])) - {values[i]}
      assert len(vals) <= 1, f'example {i} mixes more than one partner'
      pasted = (out[i] != values[i]).sum() / (h * w)
      if vals:
        j = int(vals.pop()) - 1
        np.testing.assert_allclose(t[i, j], pasted, atol=1e-6)
        np.testing.assert_allclose(t[i, i], 1 - pasted, atol=1e-6)
        assert zero_rectangle(out[i] != values[i]) is not None   # one box
        checked += 1
        fractions.append(pasted)
      else:   # nothing pasted, or pasted from itself
        assert t[i, i] > 1 - 1e-6 or (t[i] > 0).sum() == 1
  assert checked > 2 * MB
  assert np.std(fractions) > 0.1   # per-example lam


def test_mixup_and_cutmix_together_pick_one_per_batch():
  kinds = []
  for x, out, _ in mix_runs(24, dict(mixup_alpha=1.0, cutmix_alpha=1.0)):
    changed = ~np.isclose(out, x)
    # cutmix copies pixels (many unchanged); mixup changes nearly every pixel.
    is_mixup = changed.mean() > 0.9
    assert is_mixup or np.all(np.isin(out, x))
    kinds.append(is_mixup)
  assert 4 < sum(kinds) < 20


# --- colour jitter ------------------------------------------------------------
JITTER = aug_config(brightness=0.5, contrast=0.5, saturation=0.5)


def jitter(key, x, **strengths):
  """color_jitter with the given strengths and every other one 0."""
  hp = hp_of(JITTER, **{k: strengths.get(k, 0.0) for k in ('brightness', 'contrast', 'saturation')})
  return np.asarray(run(augment.color_jitter, jax.random.PRNGKey(key), x, JITTER, hp))


def test_jitter_strength_zero_is_exact_identity():
  x = images()   # values up to 1.1: not even the clip may touch them
  np.testing.assert_array_equal(jitter(10, x), x)


def test_brightness_scales_each_image_by_one_factor_in_range():
  x = unit_images(high=0.5) + 0.01   # 1.5 * x stays below 1: no clipping
  f = (jitter(11, x, brightness=0.5) / np.asarray(x)).reshape(len(x), -1)
  np.testing.assert_allclose(f, np.broadcast_to(f[:, :1], f.shape), rtol=1e-5)   # one per image
  assert f.min() >= 0.5 - 1e-6 and f.max() <= 1.5 + 1e-6
  assert f[:, 0].std() > 0.15   # uniform on [0.5, 1.5]: std 0.29
  assert float(jitter(11, x * 3, brightness=0.5).max()) == 1   # clipped


def test_contrast_keeps_the_mean_gray_and_clips():
  x = unit_images(high=0.5) + 0.25   # 1.5 * contrast of [0.25, 0.75] stays in [0, 1]
  out = jitter(12, x, contrast=0.5)
  gray_mean = lambda y: np.asarray(augment._gray(y)).mean((1, 2, 3))
  assert (~np.all(np.isclose(out, x), axis=(1, 2, 3))).all()
  np.testing.assert_allclose(gray_mean(out), gray_mean(x), atol=1e-5)
  out = jitter(12, x * 2, contrast=5.0)
  assert float(out.min()) == 0 and float(out.max()) == 1


def test_saturation_leaves_gray_images_alone():
  one = unit_images(c=1)
  np.testing.assert_array_equal(jitter(13, one, saturation=0.9), one)
  gray3 = jnp.repeat(unit_images(c=1), 3, axis=-1)
  np.testing.assert_allclose(jitter(13, gray3, saturation=0.9), gray3, atol=1e-6)
  rgb = unit_images(high=0.5) + 0.25   # no clipping at saturation 0.5
  out = jitter(13, rgb, saturation=0.5)
  assert not np.allclose(out, rgb)
  np.testing.assert_allclose(augment._gray(out), augment._gray(rgb), atol=1e-5)   # luma kept
  blend_to_gray = jitter(13, rgb, saturation=1.0) - np.asarray(augment._gray(rgb))
  ratio = blend_to_gray / (np.asarray(rgb) - np.asarray(augment._gray(rgb)))   # = factor
  assert ratio.min() > -1e-3 and ratio.max() < 2 + 1e-3


# --- random resized crop ------------------------------------------------------
RRC = aug_config(resized_crop_scale=0.5)
RRC_SHAPE = (16, 12, 10, 3)


def rrc(key, x, scale=0.5):
  return np.asarray(run(augment.random_resized_crop, jax.random.PRNGKey(key), x, RRC,
                        hp_of(RRC, resized_crop_scale=scale)))


def test_resized_crop_shape_constant_and_per_example_variation():
  x = unit_images(*RRC_SHAPE)
  out = rrc(14, x, scale=0.2)
  assert out.shape == x.shape
  assert out.min() >= -1e-6 and out.max() <= 1 + 1e-6
  const = jnp.full(RRC_SHAPE, 0.37)
  np.testing.assert_allclose(rrc(14, const, scale=0.2), const, atol=1e-6)
  # The same image everywhere, cropped differently per example.
  out = rrc(14, jnp.broadcast_to(x[:1], x.shape), scale=0.2)
  diffs = np.abs(out - out[:1]).mean((1, 2, 3))
  assert (diffs[1:] > 1e-3).all()


def test_resized_crop_scale_one_is_identity_and_crops_are_area_fractions():
  x = unit_images(*RRC_SHAPE)
  np.testing.assert_allclose(rrc(15, x, scale=1.0), x, atol=1e-6)
  # On an affine ramp the crop is an affine map of coordinates (away from the
  # edges, where samples clamp): the step along each axis is the box side over
  # the image side, so their product is the crop's area fraction.
  b, h, w, ch = RRC_SHAPE
  yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing='ij')
  ramp = np.broadcast_to(((xx + yy) / 2)[None, :, :, None], RRC_SHAPE)
  out = rrc(15, ramp, scale=0.5)
  step_x = np.diff(out[:, 5, 1:w - 1, 0], axis=1)
  step_y = np.diff(out[:, 1:h - 1, 5, 0], axis=1)
  np.testing.assert_allclose(step_x, np.broadcast_to(step_x[:, :1], step_x.shape), atol=1e-5)
  np.testing.assert_allclose(step_y, np.broadcast_to(step_y[:, :1], step_y.shape), atol=1e-5)
  side_x, side_y = step_x[:, 0] * 2 * (w - 1), step_y[:, 0] * 2 * (h - 1)   # box / image side
  assert (side_x <= 1 + 1e-4).all() and (side_y <= 1 + 1e-4).all()   # never downsampled
  area = side_x * side_y
  assert area.min() >= 0.5 - 1e-4 and area.max() <= 1 + 1e-4   # U[scale, 1]
  assert 0.65 < area.mean() < 0.85 and area.std() > 0.05
