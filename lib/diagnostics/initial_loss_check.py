"""Step 1 of the tuning recipe (lib/diagnostics/diagnose.py): the loss at step 0,
regularization off, against ln C (cross-entropy) or C-1 (hinge)."""
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from lib.diagnostics.checks import FAIL, PASS, WARN, Result, inputs, plain
from lib.training import losses
from lib.training.engine import Engine


def expected_initial_loss(loss_name: str, num_classes: int) -> float:
  """ln C for softmax cross-entropy; C - 1 for the (squared) hinge at equal scores."""
  return math.log(num_classes) if loss_name == 'cross_entropy' else float(num_classes - 1)


def initial_loss(config, dataset, mesh, examples: int = 512,
                 loss_fn: Optional[Callable] = None) -> Result:
  """The data loss at step 0 (regularization off, batch statistics as at the first
  step) on the first `examples` training images. `loss_fn(logits, targets)` replaces
  the configured per-example loss (tests scramble it)."""
  c = plain(config)
  eng = Engine(c, dataset, mesh)
  state = eng.init_state()
  x, y = inputs(dataset, examples)
  name, num_classes = c.train.loss, dataset.num_classes
  loss_fn = loss_fn or (lambda logits, targets: losses.loss(name, logits, targets))

  @jax.jit
  def measure(state, x, y):
    logits, _ = eng.model.apply({'params': state.params, 'batch_stats': state.batch_stats}, x,
                                train=True, mutable=['batch_stats'])
    loss = loss_fn(logits, jax.nn.one_hot(y, num_classes)).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == y), jnp.std(logits)

  loss, acc, logit_std = (float(v) for v in measure(state, x, y))
  expected = expected_initial_loss(name, num_classes)
  ratio = loss / expected
  numbers = {'loss': loss, 'expected': expected, 'ratio': ratio, 'accuracy': acc,
             'logit_std': logit_std, 'examples': len(y), 'loss_name': name}
  what = f'loss {loss:.4f} at step 0, expected {expected:.4f} ({_expected_name(name, num_classes)})'
  if not math.isfinite(loss) or not 0.5 <= ratio <= 2.0:
    verdict = FAIL
  elif not 0.8 <= ratio <= 1.25:
    verdict = WARN
  else:
    return Result('initial_loss', PASS, f'{what}; logit std {logit_std:.3f}', numbers)
  if not math.isfinite(loss) or ratio > 1:
    why = ('likely causes: large logits at init (scale of model.init / init_scale, the last '
           f'layer; logit std is {logit_std:.3g}), a loss summed instead of averaged, or the '
           'wrong number of classes')
  else:
    why = ('likely causes: the labels leak into the inputs, the loss is scaled down, or the '
           'targets are not one-hot')
  return Result('initial_loss', verdict, f'{what}, {ratio:.2f}x; {why}', numbers)


def _expected_name(loss_name, c):
  return f'ln {c}' if loss_name == 'cross_entropy' else f'C - 1 for {c} classes'
