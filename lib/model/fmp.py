"""Fractional max-pooling (Graham 2014, "Fractional Max-Pooling", arXiv:1412.6071).

An n-pixel side is pooled to n_out = floor(n / ratio) outputs (ratio in (1, 2]) by
regions 1 or 2 pixels wide. Per side, the region starts are Graham's pseudo-random
sequence (his a_i = ceil(alpha (i + u)), u uniform in [0, 1); here with floor,
alpha = m / n_out and shifted to start at 0), written in integers so it is exact
under jit:

    a_i = floor((i * m + s) / n_out),  i = 0 .. n_out,  s = floor(u * m) mod n_out

(s is all of u that the floors see). a_0 = 0, a_{n_out} = m and
every increment is 1 or 2. m = min(n, 2 n_out) is the part of the side the regions
cover: all of it, except when n > 2 n_out (ratio 2, or a ratio near 2 on a small
odd side), where the last row is left out, as VALID 2x2 pooling leaves it out.

  disjoint:     region i = [a_i, a_{i+1} - 1]   (1 or 2 wide; together exactly [0, m))
  overlapping:  region i = [a_i, a_{i+1}]       (2 or 3 wide, clipped at the last row)

Rows and columns get independent sequences, and pooling is separable (the max over a
rectangle is the max over its rows of the max over its columns): per side, the 2 (3
overlapping) candidate rows of every region are gathered, the last repeated where a
region is narrower, and the max taken. Shapes are static; only the indices are drawn.

Randomness: one draw per pooling layer and call, the same regions for every image of
the batch. `pool(x, key, ...)` takes the layer's key: the train step's 'fmp' stream
(lib/training/state.py), so a different draw every step. A forward pass without an
'fmp' rng (evaluation, init, diagnostics) uses `fixed_key(layer)`: one fixed draw,
so evaluation is deterministic. Evaluation averaging over K draws
(train.fmp_eval_draws) uses that draw and those of `eval_draw_key(1 .. K-1)`.

A 1-pixel side stays 1 pixel (as 2x2 SAME max-pooling leaves it): floor(1 / ratio)
would be no output at all.
"""
import jax
import jax.numpy as jnp

_FIXED = 0x464D50   # 'FMP': the root of the fixed evaluation draws


def output_size(n: int, ratio: float) -> int:
  return 1 if n == 1 else int(n // ratio)


def starts(key, n: int, n_out: int):
  """a_0 .. a_{n_out} (int32): the pseudo-random region starts of an n-pixel side."""
  m = min(n, 2 * n_out)
  s = jax.random.randint(key, (), 0, m) % n_out
  return (jnp.arange(n_out + 1, dtype=jnp.int32) * m + s) // n_out


def region_rows(a, n: int, overlap: bool):
  """(n_out, 2) disjoint or (n_out, 3) overlapping: the rows of each region, its last
  row repeated where it is narrower."""
  last = jnp.minimum(a[1:], n - 1) if overlap else a[1:] - 1
  offsets = jnp.arange(3 if overlap else 2, dtype=jnp.int32)
  return jnp.minimum(a[:-1, None] + offsets[None, :], last[:, None])


def _pool_axis(x, key, axis: int, ratio: float, overlap: bool):
  n = x.shape[axis]
  if n == 1:
    return x
  rows = region_rows(starts(key, n, output_size(n, ratio)), n, overlap)
  g = jnp.take(x, rows.reshape(-1), axis=axis)
  g = g.reshape(x.shape[:axis] + rows.shape + x.shape[axis + 1:])
  return jnp.max(g, axis=axis + 1)


def pool(x, key, ratio: float, overlap: bool = False):
  """Fractional max-pooling of NHWC `x` by `ratio`, regions drawn from `key`."""
  rows_key, cols_key = jax.random.split(key)
  return _pool_axis(_pool_axis(x, rows_key, 1, ratio, overlap), cols_key, 2, ratio, overlap)


def fixed_key(layer: int):
  """The key of pooling layer `layer` in a forward pass without an 'fmp' rng."""
  return jax.random.fold_in(jax.random.PRNGKey(_FIXED), layer)


def eval_draw_key(draw: int):
  """The 'fmp' rng of evaluation draw `draw` >= 1 (draw 0 is the fixed draw)."""
  return jax.random.fold_in(jax.random.PRNGKey(_FIXED + 1), draw)
