"""The gradient check: analytic vs centred finite-difference gradients in float64."""
import math
from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np

from lib.diagnostics.checks import FAIL, PASS, Result, WARN, inputs, plain, with_overrides
from lib.model import models
from lib.training import losses, optim, regularize


def check_gradient(f: Callable, params, h: float = 1e-6, seed: int = 0) -> Dict[str, Any]:
  """Analytic vs centred finite-difference gradient of the scalar f(params), in
  float64, along one random unit direction per parameter tensor:
  a = <grad f, v>, n = (f(p + h v) - f(p - h v)) / 2h (with h and h/10). Returns the relative error
  max|a-n| / max(|a|+|n|) (domain.md section 9) and the worst tensor's own."""
  leaves, treedef = jax.tree.flatten(params)
  if any(l.dtype != jnp.float64 for l in leaves):
    raise ValueError('check_gradient needs float64 parameters (inside jax.enable_x64)')
  f = jax.jit(f)
  grads = jax.tree.leaves(jax.jit(jax.grad(f))(params))
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  rng = np.random.default_rng(seed)
  rows = []
  for i, (leaf, g) in enumerate(zip(leaves, grads)):
    v = rng.standard_normal(leaf.shape)
    v /= np.linalg.norm(v) or 1.0
    shifted = lambda s: jax.tree.unflatten(treedef, [l + s * v if j == i else l
                                                     for j, l in enumerate(leaves)])
    a = float(jnp.sum(g * v))
    # Two step sizes, the closer one counts: a ReLU / max-pool kink crossed by the
    # larger step is rarely crossed by the smaller, a wrong derivative is off at both.
    n = min((float((f(shifted(s)) - f(shifted(-s))) / (2 * s)) for s in (h, h / 10)),
            key=lambda d: abs(d - a))
    rows.append({'param': names[i], 'analytic': a, 'numeric': n})
  diff = max(abs(r['analytic'] - r['numeric']) for r in rows)
  scale = max(abs(r['analytic']) + abs(r['numeric']) for r in rows)
  for r in rows:   # a tensor's own error, against a floor for near-zero gradients
    r['relative_error'] = abs(r['analytic'] - r['numeric']) / max(
        abs(r['analytic']) + abs(r['numeric']), 1e-6 * scale, 1e-300)
  worst_row = max(rows, key=lambda r: r['relative_error'])
  return {'relative_error': diff / max(scale, 1e-300), 'worst_param': worst_row['param'],
          'worst_param_error': worst_row['relative_error'], 'tensors': len(rows), 'rows': rows}


def small_instance(config):
  """The configured model at width <= 8 (same depth, activation, norm, init), no
  train-time randomness: a float64 gradient check stays cheap."""
  c = plain(config)
  return with_overrides(c, {'model.width': min(c.model.width, 8)})


def grad_check(config, dataset, examples: int = 4, h: float = 1e-6) -> Result:
  """check_gradient on the objective of a small instance of the configured model
  (data loss + L2 + L1 penalties, batch statistics) on `examples` training images,
  at its initialization with every parameter jittered by 1e-3.
  FAIL above 1e-4 (a bug), WARN above 1e-7 (kinks such as ReLU or max-pool can
  explain it), PASS below."""
  c = small_instance(config)
  reg = config.regularize
  with jax.enable_x64(True):
    model = models.build(c.model, dataset.num_classes, None, dtype=jnp.float64)
    x, y = inputs(dataset, examples, np.float64)
    variables = model.init(jax.random.PRNGKey(c.seed), x[:1], train=False)
    # Jittered by 1e-3 so that no unit sits exactly on a kink: a bias of 0 under an
    # all-zero (dead ReLU) input puts a pre-activation at exactly 0, where the
    # finite difference sees half the slope and the derivative none.
    jitter = np.random.default_rng(c.seed)
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64) + 1e-3 * jitter.standard_normal(
        p.shape), variables['params'])
    batch_stats = variables.get('batch_stats', {})
    targets = jax.nn.one_hot(y, dataset.num_classes, dtype=jnp.float64)
    mask = optim.decay_mask(params, reg.decay_all_params)

    def objective(p):
      logits, _ = model.apply({'params': p, 'batch_stats': batch_stats}, x, train=True,
                              mutable=['batch_stats'])
      value = losses.loss(c.train.loss, logits, targets).mean()
      if reg.l2:
        value += reg.l2 * optim.l2_penalty(p, mask)
      if reg.l1:
        value += reg.l1 * regularize.l1_penalty(p, mask)
      return value
    out = check_gradient(objective, params, h)
  err = out['relative_error']
  numbers = {k: v for k, v in out.items()}
  numbers.update(model=c.model.name, width=c.model.width, depth=c.model.depth, h=h,
                 examples=examples)
  what = (f'relative error {err:.2e} over {out["tensors"]} parameter tensors of '
          f'{c.model.name} (width {c.model.width}, float64); worst {out["worst_param"]} '
          f'{out["worst_param_error"]:.2e}')
  verdict = FAIL if not math.isfinite(err) or err > 1e-4 else WARN if err > 1e-7 else PASS
  if verdict == PASS and out['worst_param_error'] > 1e-4:   # wrong, but in a small gradient
    verdict = WARN
  hint = {FAIL: ': the analytic gradient is wrong (a custom gradient, a stop_gradient, or a '
                'non-differentiable op)',
          WARN: ': above 1e-7; kinks (ReLU, max-pool, hinge) crossed by the step can explain it',
          PASS: ''}[verdict]
  return Result('grad_check', verdict, what + hint, numbers)
