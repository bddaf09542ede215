"""The reference that regularize.tie_l2 ties a run's weights to (L2-SP).

`regularize.tie_to=init` ties them to the run's own initial weights (nothing to
load: the train state's anchor starts as a copy of them). `WORKDIR[:best|latest|STEP]`
ties them to another run's weights, of the same architecture: its checkpoint's
params are read once, when the run starts from step 0, and kept in the train state
(so a resumed run keeps the anchor it started with, whatever happened to WORKDIR since).
"""
import os
from typing import Any, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from lib.core.errors import UserError
from lib.runs.checkpoint import Checkpoints
from lib.training import state as state_lib

WHICH = ('best', 'latest')


def parse(tie_to: str) -> Tuple[str, str]:
  """'runs/a:latest' -> ('runs/a', 'latest'); 'runs/a' -> ('runs/a', 'best')."""
  path, sep, which = tie_to.rpartition(':')
  if sep and (which in WHICH or which.isdigit()):
    return path, which
  return tie_to, 'best'


def reference(config, abstract_params) -> Optional[Any]:
  """The params regularize.tie_to names, as host arrays of `abstract_params`'
  structure; None when tying is off or ties to the run's own initial weights."""
  if not state_lib.has_anchor(config) or config.regularize.tie_to == 'init':
    return None
  path, which = parse(config.regularize.tie_to)
  where = f'regularize.tie_to={config.regularize.tie_to!r}'
  if not os.path.isdir(os.path.join(path, 'checkpoints')):
    raise UserError(f'{where}: {path} holds no checkpoints; give `init` or the directory of a '
                    'run of the same model')
  checkpoints = Checkpoints(os.path.join(path, 'checkpoints'), read_only=True)
  try:
    step = checkpoints.resolve(which)
    restored = checkpoints.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))['state']['params']
  finally:
    checkpoints.close()
  restored = jax.device_get(restored)
  want = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(abstract_params)}
  have = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(restored)}
  for name in sorted(set(want) | set(have)):
    a, b = want.get(name), have.get(name)
    if a is None or b is None or tuple(a.shape) != tuple(np.shape(b)):
      what = (f'{name} is {tuple(a.shape)} here and {tuple(np.shape(b))} there' if a is not None
              and b is not None else f'{name} is only {"here" if b is None else "there"}')
      raise UserError(f'{where}: the weights of {path} (step {step}) do not fit this model '
                      f'({what}); tie to a run of the same architecture and classes')
  return jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(abstract_params),
      [np.asarray(have[jax.tree_util.keystr(k)], a.dtype)
       for k, a in jax.tree_util.tree_leaves_with_path(abstract_params)])
