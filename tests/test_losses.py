import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lib.core.errors import UserError
from lib.training import losses


def onehot(labels, c):
  return jax.nn.one_hot(jnp.asarray(labels), c)


def random_logits(seed=0, b=6, c=5):
  return jax.random.normal(jax.random.PRNGKey(seed), (b, c)) * 3.0


def test_registry_names():
  assert losses.LOSSES.names() == ['cross_entropy', 'hinge', 'squared_hinge']


@pytest.mark.parametrize('name', ['hinge', 'squared_hinge'])
def test_hinge_equals_c_minus_1_at_equal_scores(name):
  for c in (2, 3, 10):
    logits = jnp.full((4, c), 0.7)
    per = losses.per_class(name, logits)
    np.testing.assert_allclose(per, np.full((4, c), c - 1.0), rtol=0, atol=1e-6)
    out = losses.loss(name, logits, onehot([0, 1, c - 1, 0], c))
    np.testing.assert_allclose(out, np.full((4,), c - 1.0), atol=1e-6)
  assert float(losses.loss(name, jnp.zeros((1, 10)), onehot([3], 10))[0]) == pytest.approx(9.0)


def test_hinge_cs231n_example():
  logits = jnp.array([[3.2, 5.1, -1.7]])
  t = onehot([0], 3)
  # max(0, 5.1 - 3.2 + 1) + max(0, -1.7 - 3.2 + 1) = 2.9 + 0
  assert float(losses.loss('hinge', logits, t)[0]) == pytest.approx(2.9, abs=1e-5)
  assert float(losses.loss('squared_hinge', logits, t)[0]) == pytest.approx(8.41, abs=1e-4)
  # Every column by hand: label 1: max(0, 3.2-5.1+1) + max(0, -1.7-5.1+1) = 0;
  # label 2: max(0, 3.2+1.7+1) + max(0, 5.1+1.7+1) = 5.9 + 7.8 = 13.7.
  np.testing.assert_allclose(losses.per_class('hinge', logits), [[2.9, 0.0, 13.7]], atol=1e-5)
  np.testing.assert_allclose(losses.per_class('squared_hinge', logits),
                             [[8.41, 0.0, 5.9 ** 2 + 7.8 ** 2]], rtol=1e-5)


def test_hinge_matches_loop_reference():
  logits = np.asarray(random_logits(1, 4, 6))
  ref = np.zeros_like(logits)
  ref2 = np.zeros_like(logits)
  for b in range(4):
    for c in range(6):
      for j in range(6):
        if j != c:
          m = max(0.0, logits[b, j] - logits[b, c] + 1.0)
          ref[b, c] += m
          ref2[b, c] += m * m
  np.testing.assert_allclose(losses.per_class('hinge', jnp.asarray(logits)), ref, rtol=1e-5)
  np.testing.assert_allclose(losses.per_class('squared_hinge', jnp.asarray(logits)), ref2,
                             rtol=1e-5)


@pytest.mark.parametrize('eps', [0.0, 0.1, 0.5, 1.0])
def test_cross_entropy_uniform_logits_is_log_c(eps):
  c = 10
  t = losses.smooth(onehot([0, 4, 9], c), eps)
  out = losses.loss('cross_entropy', jnp.full((3, c), -2.3), t)
  np.testing.assert_allclose(out, np.full((3,), math.log(c)), rtol=1e-6)


def test_cross_entropy_matches_log_softmax():
  logits = random_logits()
  labels = jnp.array([0, 1, 2, 3, 4, 0])
  p = np.exp(np.asarray(logits, np.float64))
  p /= p.sum(-1, keepdims=True)
  want = -np.log(p[np.arange(6), np.asarray(labels)])
  np.testing.assert_allclose(losses.loss('cross_entropy', logits, onehot(labels, 5)), want,
                             rtol=1e-5)


def test_smoothing_decomposes():
  logits = random_logits(2)
  labels = jnp.array([1, 0, 4, 2, 3, 3])
  t = onehot(labels, 5)
  eps = 0.2
  ce = losses.loss('cross_entropy', logits, t)
  mean_nll = jnp.mean(-jax.nn.log_softmax(logits), axis=-1)
  np.testing.assert_allclose(losses.loss('cross_entropy', logits, losses.smooth(t, eps)),
                             (1 - eps) * ce + eps * mean_nll, rtol=1e-5)


def test_smooth_formula_and_traced_eps():
  t = onehot([2], 4)
  np.testing.assert_allclose(losses.smooth(t, 0.4), [[0.1, 0.1, 0.7, 0.1]], rtol=1e-6)
  f = jax.jit(lambda eps: losses.smooth(t, eps))
  np.testing.assert_allclose(f(jnp.float32(0.4)), [[0.1, 0.1, 0.7, 0.1]], rtol=1e-6)
  np.testing.assert_allclose(losses.smooth(t, 0.4).sum(-1), [1.0], rtol=1e-6)


@pytest.mark.parametrize('name', ['cross_entropy', 'hinge', 'squared_hinge'])
def test_loss_linear_in_soft_targets(name):
  logits = random_logits(3)
  ta = onehot([0, 1, 2, 3, 4, 0], 5)
  tb = onehot([4, 3, 2, 1, 0, 1], 5)
  lam = jnp.array([0.0, 0.3, 0.5, 0.7, 1.0, 0.25])[:, None]
  mixed = losses.loss(name, logits, lam * ta + (1 - lam) * tb)
  want = lam[:, 0] * losses.loss(name, logits, ta) + (1 - lam[:, 0]) * losses.loss(
      name, logits, tb)
  np.testing.assert_allclose(mixed, want, rtol=1e-5)
  # and not trivially constant in the targets
  assert not np.allclose(losses.loss(name, logits, ta), losses.loss(name, logits, tb))


def test_unknown_loss_lists_valid_names():
  with pytest.raises(UserError, match=r'train\.loss.*cross_entropy, hinge, squared_hinge'):
    losses.loss('hinje', jnp.zeros((1, 3)), onehot([0], 3))


def test_cross_entropy_gradient_is_softmax_minus_targets():
  logits = random_logits(4)
  t = losses.smooth(onehot([0, 1, 2, 3, 4, 0], 5), 0.1)
  g = jax.grad(lambda s: losses.loss('cross_entropy', s, t).sum())(logits)
  np.testing.assert_allclose(g, jax.nn.softmax(logits) - t, atol=1e-6)


def test_hinge_gradient_counts_violations():
  # d hinge / d s_c = -(number of violating j), d / d s_j = 1 for each violating j.
  logits = jnp.array([[3.2, 5.1, -1.7]])
  g = jax.grad(lambda s: losses.loss('hinge', s, onehot([0], 3)).sum())(logits)
  np.testing.assert_allclose(g, [[-1.0, 1.0, 0.0]], atol=1e-6)
