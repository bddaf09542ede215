"""Each regularizer does what the literature means by it (its defining property)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lib.core.config import base_config
from lib.core.errors import UserError
from lib.model import models
from lib.training import regularize, steps
from lib.training.resolve import resolve


def hp(**kw):
  out = steps.hparams(resolve(base_config()))
  out.update({k: np.float32(v) for k, v in kw.items()})
  return out


def build(name='mlp', regularize_kw=None, **model_kw):
  c = base_config()
  c.model.name = name
  c.model.update(model_kw)
  c.regularize.update(regularize_kw or {})
  c = resolve(c)
  return models.build(c.model, 10, c.regularize)


class Probe(models.Layers):
  """The shared building blocks alone, for measuring them."""
  site: str = 'head'

  @nn.compact
  def __call__(self, x, train, hp):
    return self.dropout(x, train, hp, self.site)


def test_inverted_dropout_keeps_the_mean_zeroes_rate_and_is_identity_at_eval():
  probe = Probe(opts=models.Options(dropout=True, dropout_at='hidden'))
  x = jnp.full((400, 500), 2.0)
  run = jax.jit(lambda x, rate, key: probe.apply({}, x, True, {'dropout': rate},
                                                 rngs={'dropout': key}))
  for rate in (0.2, 0.5):   # one compiled program: the rate is an argument
    y = np.asarray(run(x, jnp.float32(rate), jax.random.PRNGKey(0)))
    assert abs((y == 0).mean() - rate) < 0.01
    np.testing.assert_allclose(y[y != 0], 2.0 / (1 - rate), rtol=1e-6)
    assert abs(y.mean() - 2.0) < 0.02                         # E[h] unchanged
    assert np.all(np.abs(y.mean(axis=0) - 2.0) < 0.3)         # per unit, Monte Carlo
  np.testing.assert_array_equal(probe.apply({}, x, False, {'dropout': 0.5}), x)
  # A site that regularize.dropout_at does not include is untouched.
  conv_probe = Probe(opts=models.Options(dropout=True, dropout_at='hidden'), site='conv')
  np.testing.assert_array_equal(conv_probe.apply({}, x, True, {'dropout': 0.5},
                                                 rngs={'dropout': jax.random.PRNGKey(0)}), x)


@pytest.mark.parametrize('name,kw', [('mlp', {}), ('cnn', {}), ('vgg11', {'width': 4}),
                                     ('resnet_cifar', {'depth': 8, 'width': 4})])
def test_every_train_time_regularizer_is_the_exact_identity_at_eval(name, kw):
  reg = {'dropout': 0.5, 'dropout_at': 'all', 'noise_hidden': 0.3, 'activation_l1': 0.1}
  if name == 'resnet_cifar':
    reg['survival_last'] = 0.5
  plain, regular = build(name, **kw), build(name, reg, **kw)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3))
  v = plain.init(jax.random.PRNGKey(0), x)
  h = hp(dropout=0.5, noise_hidden=0.3, survival_last=0.5)
  np.testing.assert_array_equal(regular.apply(v, x, train=False, hp=h), plain.apply(v, x))
  # ...while at train time they change the output.
  rngs = {n: jax.random.PRNGKey(i) for i, n in enumerate(('dropout', 'noise', 'drop_path'))}
  a, _ = plain.apply(v, x, train=True, mutable=['batch_stats'])
  b, _ = regular.apply(v, x, train=True, hp=h, rngs=rngs, mutable=['batch_stats', 'losses',
                                                                  'intermediates'])
  assert not np.allclose(a, b)


def test_dropconnect_zeroes_rate_of_dense_weights_only():
  params = {'Dense_0': {'kernel': jnp.ones((300, 200)), 'bias': jnp.ones((200,))},
            'Conv_0': {'kernel': jnp.ones((3, 3, 4, 8))}}
  out = regularize.dropconnect(jax.random.PRNGKey(0), params, jnp.float32(0.3))
  k = np.asarray(out['Dense_0']['kernel'])
  assert abs((k == 0).mean() - 0.3) < 0.01
  np.testing.assert_allclose(k[k != 0], 1 / 0.7, rtol=1e-6)
  np.testing.assert_array_equal(out['Dense_0']['bias'], params['Dense_0']['bias'])
  np.testing.assert_array_equal(out['Conv_0']['kernel'], params['Conv_0']['kernel'])


def test_weight_noise_perturbs_kernels_with_the_given_std():
  params = {'Dense_0': {'kernel': jnp.zeros((300, 200)), 'bias': jnp.zeros((200,))}}
  out = regularize.weight_noise(jax.random.PRNGKey(0), params, jnp.float32(0.05))
  assert abs(float(jnp.std(out['Dense_0']['kernel'])) - 0.05) < 0.002
  np.testing.assert_array_equal(out['Dense_0']['bias'], 0)


def test_hidden_noise_has_the_given_std_and_activation_l1_is_sum_abs_h():
  m = build('mlp', {'noise_hidden': 0.1, 'activation_l1': 1.0}, depth=1, width=64, norm='none')
  x = jax.random.normal(jax.random.PRNGKey(1), (256, 8, 8, 1))
  v = m.init(jax.random.PRNGKey(0), x)
  h = hp(noise_hidden=0.1)
  _, aux = m.apply(v, x, train=True, hp=h, rngs={'noise': jax.random.PRNGKey(2)},
                   mutable=['losses'])
  pre = x.reshape(256, -1) @ v['params']['Dense_0']['kernel'] + v['params']['Dense_0']['bias']
  hidden = jax.nn.relu(pre)
  sown = aux['losses']['activation_l1'][0]
  np.testing.assert_allclose(sown, jnp.abs(hidden).sum() / 256, rtol=1e-5)
  # The noise itself: the noisy activation minus the clean one.
  feats = []
  m.apply(v, x, train=True, hp=h, rngs={'noise': jax.random.PRNGKey(2)},
          method=lambda mdl, x, **kw: feats.append(mdl.act(hidden, True, h)),
          mutable=['losses'])
  assert abs(float(jnp.std(feats[0] - hidden)) - 0.1) < 0.005


def survival_rates(model, v, x, h):
  _, aux = model.apply(v, x, train=True, hp=h, rngs={'drop_path': jax.random.PRNGKey(3)},
                       mutable=['batch_stats', 'intermediates'])
  blocks = sorted(aux['intermediates'], key=lambda n: int(n.split('_')[-1]))
  return [np.asarray(aux['intermediates'][b]['survived'][0]) for b in blocks]


def test_stochastic_depth_drops_block_l_with_probability_l_over_L_times_1_minus_pL():
  m = build('resnet_cifar', {'survival_last': 0.5}, depth=20, width=4)   # L = 9 blocks
  x = jax.random.normal(jax.random.PRNGKey(1), (2000, 8, 8, 1))
  v = m.init(jax.random.PRNGKey(0), x[:1])
  kept = survival_rates(m, v, x, hp(survival_last=0.5))
  assert len(kept) == 9
  for l, k in enumerate(kept, start=1):
    assert abs((1 - k.mean()) - l / 9 * 0.5) < 0.035, (l, k.mean())
    if l > 1:
      assert 0 < k.mean() < 1    # decided per example, not per batch
  # p_L is an array: 1.0 keeps every block.
  assert all(k.all() for k in survival_rates(m, v, x[:64], hp(survival_last=1.0)))


def test_stochastic_depth_and_zero_init_need_residual_blocks():
  for reg, model_kw in (({'survival_last': 0.5}, {}), ({}, {'zero_init_residual': True})):
    with pytest.raises(UserError, match='residual'):
      build('mlp', reg, **model_kw)


@pytest.mark.parametrize('name,kw', [('resnet_cifar', {'depth': 8, 'width': 4}),
                                     ('resnet_cifar', {'depth': 8, 'width': 4, 'norm': 'none'}),
                                     ('preact_resnet_cifar', {'depth': 8, 'width': 4}),
                                     ('wide_resnet', {'depth': 10, 'width': 1}),
                                     ('resnext_cifar', {'depth': 11, 'width': 2}),
                                     ('resnet50', {'width': 4})])
def test_zero_init_residual_makes_every_residual_branch_output_zero(name, kw):
  # The branch output is what reaches drop_path (stochastic depth, here switched on
  # with p_L ~ 1 so it is in the program); spy on it.
  m = build(name, {'survival_last': 0.999}, zero_init_residual=True, **kw)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3))
  v = m.init(jax.random.PRNGKey(0), x)
  branches = []
  original = models.Layers.drop_path

  def spy(self, branch, train, hp, depth_fraction):
    branches.append(branch)
    return branch
  models.Layers.drop_path = spy
  try:
    m.apply(v, x, train=True, hp=hp(), rngs={'drop_path': jax.random.PRNGKey(0)},
            mutable=['batch_stats', 'intermediates'])
    zero = [float(jnp.abs(b).max()) for b in branches]
    m_off = build(name, {'survival_last': 0.999}, **kw)
    v_off = m_off.init(jax.random.PRNGKey(0), x)
    branches.clear()
    m_off.apply(v_off, x, train=True, hp=hp(), rngs={'drop_path': jax.random.PRNGKey(0)},
                mutable=['batch_stats', 'intermediates'])
    nonzero = [float(jnp.abs(b).max()) for b in branches]
  finally:
    models.Layers.drop_path = original
  assert zero and max(zero) == 0.0
  assert min(nonzero) > 0.0


@pytest.mark.parametrize('init', ['zeros', 'constant'])
def test_zeros_or_constant_init_never_breaks_symmetry(init):
  # Every hidden unit of a layer gets the same gradient, so SGD keeps them identical.
  m = build('mlp', depth=2, width=6, norm='none', init=init, init_scale=0.1, bias_init=0.1)
  x = jax.random.normal(jax.random.PRNGKey(1), (32, 8, 8, 1))
  y = jax.nn.one_hot(jnp.arange(32) % 10, 10)
  params = m.init(jax.random.PRNGKey(0), x)['params']
  loss = lambda p: -jnp.mean(jnp.sum(y * jax.nn.log_softmax(m.apply({'params': p}, x)), -1))
  for _ in range(5):
    params = jax.tree.map(lambda p, g: p - 0.5 * g, params, jax.grad(loss)(params))
  for layer in ('Dense_0', 'Dense_1'):
    k = np.asarray(params[layer]['kernel'])
    np.testing.assert_allclose(k, k[:, :1] * np.ones_like(k), rtol=1e-5, atol=1e-7)
  # The default (Kaiming) init breaks it.
  m2 = build('mlp', depth=2, width=6, norm='none')
  k = np.asarray(m2.init(jax.random.PRNGKey(0), x)['params']['Dense_0']['kernel'])
  assert not np.allclose(k, k[:, :1])


def test_model_uses_the_configured_initializer_for_every_kernel():
  m = build('mlp', depth=1, width=2000, norm='none', init='xavier_normal', bias_init=0.25)
  p = m.init(jax.random.PRNGKey(0), jnp.zeros((1, 40, 40, 1)))['params']
  assert abs(float(jnp.std(p['Dense_0']['kernel'])) * np.sqrt(1600) - 1) < 0.05
  assert abs(float(jnp.std(p['Dense_1']['kernel'])) * np.sqrt(2000) - 1) < 0.05
  np.testing.assert_array_equal(p['Dense_0']['bias'], 0.25)
  m = build('mlp', depth=1, width=2000, norm='none', init='kaiming_normal')
  p = m.init(jax.random.PRNGKey(0), jnp.zeros((1, 40, 40, 1)))['params']
  assert abs(float(jnp.std(p['Dense_0']['kernel'])) * np.sqrt(1600 / 2) - 1) < 0.05
  # The classifier has no nonlinearity after it: gain 1.
  assert abs(float(jnp.std(p['Dense_1']['kernel'])) * np.sqrt(2000) - 1) < 0.05


def test_l1_penalty_value_and_gradient():
  params = {'Dense_0': {'kernel': jnp.array([[1.5, -2.0], [0.5, -0.25]]), 'bias': jnp.ones(2)}}
  mask = regularize.kernel_mask(params)
  assert float(regularize.l1_penalty(params, mask)) == pytest.approx(4.25)
  g = jax.grad(lambda p: 0.3 * regularize.l1_penalty(p, mask))(params)
  np.testing.assert_allclose(g['Dense_0']['kernel'], 0.3 * np.sign(params['Dense_0']['kernel']))
  np.testing.assert_array_equal(g['Dense_0']['bias'], 0)


def test_bad_regularizer_values_fail_naming_the_key():
  for key, value in (('dropout', 1.0), ('dropconnect', -0.1), ('survival_last', 0.0),
                     ('label_smoothing', 1.0), ('noise_input', -1.0)):
    c = base_config()
    c.regularize[key] = value
    with pytest.raises(UserError, match=f'regularize.{key}='):
      resolve(c)
  c = base_config()
  c.regularize.dropout_at = 'everywhere'
  with pytest.raises(UserError, match='valid: all, conv, head, hidden'):
    resolve(c)
  c = base_config()
  c.model.norm = 'instance'
  with pytest.raises(UserError, match='instance'):
    resolve(c)


def test_fgsm_steps_eps_pixels_along_the_gradient_sign_inside_the_pixel_range():
  w = jnp.array([1.0, -2.0, 0.5, -0.1])
  x = jnp.array([[0.0, 0.0, 1.9, -1.9]])
  std, lo, hi = 0.5, -2.0, 2.0                       # normalized pixel range
  adv = regularize.fgsm(lambda x: jnp.sum(x * w), x, jnp.float32(0.1), std, lo, hi)
  # +-eps pixels = +-eps/std normalized, clipped to the range.
  np.testing.assert_allclose(adv, [[0.2, -0.2, 2.0, -2.0]], rtol=1e-6)
  # The step raises the loss (it ascends the gradient).
  assert float(jnp.sum(adv * w)) > float(jnp.sum(x * w))
