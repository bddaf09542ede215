"""Runs the tuning recipe's checks (lib/diagnostics/diagnose.py) in recipe order on a
config and writes their record: W/diagnose.json and the checks' PNGs (an earlier record
is archived, never overwritten)."""
import dataclasses
import math
from typing import Any, Dict, List, Optional

import numpy as np

from lib.core import config as config_lib
from lib.core import sharding
from lib.core.errors import UserError
from lib.diagnostics.activation_check import activations
from lib.diagnostics.checks import FAIL, PASS, WARN, Result, worst
from lib.diagnostics.curves_check import curves
from lib.diagnostics.dynamics import lr_range, overfit_small
from lib.diagnostics.gradcheck import grad_check
from lib.diagnostics.initial_loss_check import initial_loss
from lib.training import resolve as resolve_lib


CHECKS = ('initial_loss', 'overfit_small', 'lr_range', 'activations', 'grad_check', 'curves')
NEEDS_CONFIG = CHECKS[:5]


def run(checks: List[str], workdir: str, config=None, curves_from: Optional[str] = None,
        options: Optional[Dict[str, Any]] = None, mesh=None, log=print) -> List[Result]:
  """Runs `checks` in recipe order, printing a PASS / WARN / FAIL line per check;
  writes W/diagnose.json and the PNGs (an earlier diagnose.json and its PNGs are
  moved to W/archive/<time>/ first, never overwritten)."""
  import json
  import os
  from lib.data import datasets as data
  unknown = [c for c in checks if c not in CHECKS]
  if unknown:
    raise UserError(f'unknown check {unknown[0]!r}; valid: {", ".join(CHECKS)}')
  if config is None and any(c in NEEDS_CONFIG for c in checks):
    raise UserError(f'checks {", ".join(c for c in checks if c in NEEDS_CONFIG)} need '
                    '--config=experiments/<x>.py')
  if 'curves' in checks and not curves_from:
    raise UserError('the curves check needs --curves_from=<run or sweep directory>')
  o = options or {}
  _check_options(o)
  config = resolve_lib.resolve(config) if config is not None else None
  needs_data = any(c in NEEDS_CONFIG for c in checks)
  dataset = data.load(config.data) if needs_data else None   # may fail: nothing written yet
  if dataset is not None and not dataset.in_memory:
    raise UserError(f'launch.diagnose needs the images in memory; data.source='
                    f'{config.data.source} with data.image_size={config.data.image_size} is '
                    'streamed: diagnose on a fixed-size source (or a sample saved as npz)')
  if 'overfit_small' in checks:
    need = o.get('overfit_batches', 5) * config.train.batch_size
    if len(dataset.train[1]) < need:
      raise UserError(f'overfit_small needs {need} training images ({o.get("overfit_batches", 5)}'
                      f' batches of {config.train.batch_size}); the dataset has '
                      f'{len(dataset.train[1])}: lower --overfit_batches')
  mesh = mesh if mesh is not None else (sharding.make_mesh() if needs_data else None)
  _archive(workdir)
  os.makedirs(workdir, exist_ok=True)
  png = lambda name: os.path.join(workdir, name)
  calls = {
      'initial_loss': lambda: initial_loss(config, dataset, mesh),
      'overfit_small': lambda: overfit_small(config, dataset, mesh,
                                             o.get('overfit_batches', 5),
                                             o.get('overfit_steps', 1000),
                                             plot=png('overfit_small.png'), log=log),
      'lr_range': lambda: lr_range(config, dataset, mesh, o.get('lr_min', 1e-4),
                                   o.get('lr_max', 10.0), o.get('lr_points', 11),
                                   o.get('lr_steps', 100), o.get('lr_mode', 'grid'),
                                   plot=png('lr_range.png'), log=log),
      'activations': lambda: activations(config, dataset, mesh, o.get('activation_steps', 20),
                                         plot=png('activations.png')),
      'grad_check': lambda: grad_check(config, dataset),
      'curves': lambda: curves(curves_from, plot=png('curves.png')),
  }
  results = []
  for name in [c for c in CHECKS if c in checks]:
    log(f'running {name} ...')
    result = calls[name]()
    results.append(result)
    log(result.line())
  record = {'config': config_lib.to_json_dict(config) if config is not None else None,
            'curves_from': curves_from, 'options': o,
            'verdict': worst(r.verdict for r in results),
            'checks': [dataclasses.asdict(r) for r in results]}
  with open(os.path.join(workdir, 'diagnose.json'), 'w') as f:
    json.dump(_strict(record), f, indent=1, default=float, allow_nan=False)
    f.write('\n')
  plots = [p for r in results for p in r.plots]
  log(f'{sum(r.verdict == PASS for r in results)} passed, {sum(r.verdict == WARN for r in results)}'
      f' warned, {sum(r.verdict == FAIL for r in results)} failed; wrote '
      f'{os.path.join(workdir, "diagnose.json")}' + ''.join(f', {p}' for p in plots))
  return results


def _strict(x):
  """JSON without NaN / Infinity (null instead), which strict readers reject."""
  if isinstance(x, dict):
    return {k: _strict(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_strict(v) for v in x]
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(x) else None
  if isinstance(x, np.integer):
    return int(x)
  return x


def _check_options(o: Dict[str, Any]) -> None:
  positive = ('overfit_batches', 'overfit_steps', 'lr_points', 'lr_steps')
  for key in positive:
    if key in o and o[key] <= 0:
      raise UserError(f'--{key}={o[key]} must be positive')
  if o.get('lr_points', 2) < 2 and o.get('lr_mode', 'grid') == 'grid':
    raise UserError(f'--lr_points={o["lr_points"]} must be at least 2')
  if o.get('activation_steps', 0) < 0:
    raise UserError(f'--activation_steps={o["activation_steps"]} must be >= 0')
  if not 0 < o.get('lr_min', 1e-4) < o.get('lr_max', 10.0):
    raise UserError(f'--lr_min and --lr_max need 0 < lr_min < lr_max; got {o.get("lr_min")}, '
                    f'{o.get("lr_max")}')
  if o.get('lr_mode', 'grid') not in ('grid', 'ramp'):
    raise UserError(f'unknown --lr_mode={o["lr_mode"]}; valid: grid, ramp')


def _archive(workdir: str) -> None:
  """Moves every file this command would write (diagnose.json, the check PNGs)
  that already exists to W/archive/diagnose-<time>/."""
  import datetime
  import os
  import shutil
  names = ['diagnose.json'] + [f'{c}.png' for c in CHECKS]
  if not any(os.path.exists(os.path.join(workdir, n)) for n in names):
    return
  dest = os.path.join(workdir, 'archive',
                      datetime.datetime.now().strftime('diagnose-%Y%m%d-%H%M%S-%f'))
  os.makedirs(dest)
  for name in names:
    if os.path.exists(os.path.join(workdir, name)):
      shutil.move(os.path.join(workdir, name), os.path.join(dest, name))
