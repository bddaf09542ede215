"""Sweeps: an experiment module's `get_sweep(arg)` expanded into runs, purely.

`get_sweep(arg)` returns a plain dict, one of three kinds:

  {'arms': {'baseline': {}, 'p0.5': {'regularize.dropout': 0.5}}, 'baseline': 'baseline',
   'seeds': 3}                                             named arms (name -> overrides)
  {'grid': {'optim.lr': [0.01, 0.1], 'optim.weight_decay': [0, 5e-4]}, 'seeds': 1}
                                                           the cross product, one arm per point
  {'search_space': {'optim.lr': {'min': 1e-3, 'max': 1.0, 'scaling': 'log'},
                    'regularize.dropout': {'feasible_points': [0.0, 0.5]}},
   'trials': 16, 'search_seed': 0, 'seeds': 1,
   'refine': {'top_k': 4, 'trials': 8, 'margin': 0.25}}     random search (AlgoPerf-style
                                                           space), optionally coarse-to-fine

`seeds` is a count (seeds 0..N-1 of every arm), a list of seeds, or a precision target,
{'min': 5, 'max': 20, 'ci_halfwidth': 0.005}: seeds are added in rounds until each arm's
95% interval is that narrow (lib/sweeps/adaptive.py).

Overrides are flat dotted config keys. Every run of a sweep is `W/<arm>/seed_<k>`:
the experiment's config, then the command line's `--config.` overrides, then the
arm's overrides, then `seed = k`. Expansion is a pure function of the dict (and,
for a refine stage, of the first stage's results), so the same module always gives
the same arms, seeds and draws.
"""
import dataclasses
import difflib
import itertools
import math
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import ml_collections
import numpy as np

from lib.core import config as config_lib
from lib.core.errors import UserError
from lib.sweeps import adaptive as adaptive_lib
from lib.training import resolve as resolve_lib

_ARM_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.+=,-]*$')
_KINDS = ('arms', 'grid', 'search_space')
_KEYS = {'arms', 'grid', 'search_space', 'baseline', 'seeds', 'trials', 'search_seed', 'refine',
         'metric'}
SCALINGS = ('log', 'linear')


@dataclasses.dataclass(frozen=True)
class Run:
  arm: str
  seed: int
  overrides: Tuple[Tuple[str, Any], ...]   # the arm's, in order; not the seed
  stage: int = 1

  @property
  def name(self) -> str:
    return f'{self.arm}/seed_{self.seed}'

  def overrides_dict(self) -> Dict[str, Any]:
    return dict(self.overrides)


@dataclasses.dataclass(frozen=True)
class Sweep:
  kind: str                                # arms | grid | search_space
  arms: Dict[str, Dict[str, Any]]          # stage 1, in order
  seeds: Tuple[int, ...]
  baseline: Optional[str]
  space: Optional[Dict[str, Dict[str, Any]]] = None
  trials: int = 0
  search_seed: int = 0
  refine: Optional[Dict[str, Any]] = None
  adaptive: Optional[adaptive_lib.Target] = None   # seeds by precision (then seeds = round 1's)

  def runs_for(self, counts: Dict[str, int]) -> List[Run]:
    """Seeds 0..counts[arm]-1 of every arm (an adaptive sweep's round)."""
    return [Run(arm, seed, tuple(overrides.items()))
            for arm, overrides in self.arms.items() for seed in range(counts[arm])]

  def runs(self, arms: Optional[Dict[str, Dict[str, Any]]] = None, stage: int = 1) -> List[Run]:
    arms = self.arms if arms is None else arms
    return [Run(arm, seed, tuple(overrides.items()), stage)
            for arm, overrides in arms.items() for seed in self.seeds]

  @property
  def searched_keys(self) -> List[str]:
    if self.space:
      return list(self.space)
    keys = []
    for overrides in self.arms.values():
      keys += [k for k in overrides if k not in keys]
    return keys


def parse(spec: Any, seeds: Optional[int] = None, where: str = 'get_sweep') -> Sweep:
  """Validates a get_sweep() dict and builds the stage-1 arms. `seeds` (from
  --seeds) replaces the module's seed count."""
  if not isinstance(spec, dict):
    raise UserError(f'{where} must return a dict, got {type(spec).__name__}')
  unknown = sorted(set(spec) - _KEYS)
  if unknown:
    raise UserError(f'{where}: unknown key {unknown[0]!r}; valid: {", ".join(sorted(_KEYS))}')
  kinds = [k for k in _KINDS if k in spec]
  if len(kinds) != 1:
    raise UserError(f'{where} must give exactly one of {", ".join(_KINDS)}; got '
                    f'{", ".join(kinds) or "none"}')
  kind = kinds[0]
  target = None
  given = spec.get('seeds', 1) if seeds is None else seeds
  if adaptive_lib.is_adaptive(given):
    target = adaptive_lib.parse(given, where)
    given = target.min
  seed_list = _seeds(given, where)
  space, refine = None, None
  trials, search_seed = int(spec.get('trials', 0)), int(spec.get('search_seed', 0))
  if kind == 'arms':
    arms = spec['arms']
    if not isinstance(arms, dict) or not arms:
      raise UserError(f'{where}: arms must be a non-empty dict of name -> overrides')
    arms = {str(name): dict(overrides or {}) for name, overrides in arms.items()}
  elif kind == 'grid':
    grid = spec['grid']
    if not isinstance(grid, dict) or not grid or not all(
        isinstance(v, (list, tuple)) and v for v in grid.values()):
      raise UserError(f'{where}: grid must map each key to a non-empty list of values')
    arms = {}
    for point in itertools.product(*grid.values()):
      overrides = dict(zip(grid, point))
      arms[arm_name(overrides)] = overrides
  else:
    space = {k: _check_dim(k, v, where) for k, v in spec['search_space'].items()}
    if trials <= 0:
      raise UserError(f'{where}: a search_space needs trials > 0')
    arms = {f'trial_{i:02d}': o for i, o in enumerate(draw(space, trials, search_seed))}
    if spec.get('refine') is not None:
      refine = {'top_k': 3, 'trials': trials, 'margin': 0.25, **spec['refine']}
      extra = sorted(set(refine) - {'top_k', 'trials', 'margin'})
      if extra:
        raise UserError(f'{where}: refine has unknown key {extra[0]!r}; valid: margin, top_k, '
                        'trials')
      if not (1 <= refine['top_k'] <= trials and refine['trials'] > 0):
        raise UserError(f'{where}: refine needs 1 <= top_k <= trials and trials > 0')
  for name in arms:
    if not _ARM_NAME.match(name):
      raise UserError(f'{where}: arm name {name!r} must be letters, digits and _.+=,- '
                      '(it names a directory)')
  baseline = spec.get('baseline')
  if baseline is None and kind == 'arms':
    baseline = next(iter(arms))
  if baseline is not None and baseline not in arms:
    raise UserError(f'{where}: baseline {baseline!r} is not an arm; arms: {", ".join(arms)}')
  if 'refine' in spec and kind != 'search_space':
    raise UserError(f'{where}: refine applies to a search_space only')
  if target and refine:
    raise UserError(f'{where}: seeds by precision (ci_halfwidth) and refine do not combine; '
                    'give the search a seed count, or drop refine')
  if target:
    adaptive_lib.check_budget(target, len(arms))
  return Sweep(kind, arms, seed_list, baseline, space, trials, search_seed, refine, target)


def seeds_spec(module_seeds: Any, count: Optional[int], ci_halfwidth: Optional[float],
               least: Optional[int], most: Optional[int], max_runs: Optional[int],
               max_hours: Optional[float]) -> Any:
  """The seeds a launch asks for: --seeds=N (a count), else a precision target from
  --ci_halfwidth and its companions over the module's, else the module's own."""
  extra = {'min': least, 'max': most, 'max_runs': max_runs, 'max_hours': max_hours}
  extra = {k: v for k, v in extra.items() if v is not None}
  if count is not None:
    if ci_halfwidth is not None or extra:
      raise UserError('--seeds=N fixes the seed count; --ci_halfwidth, --min_seeds, '
                      '--max_seeds, --max_runs and --max_hours ask for seeds by precision: '
                      'give one or the other')
    return count
  if ci_halfwidth is None and not extra:
    return None   # the module's
  if ci_halfwidth is None and not adaptive_lib.is_adaptive(module_seeds):
    raise UserError('--min_seeds, --max_seeds, --max_runs and --max_hours go with a '
                    'precision target: add --ci_halfwidth=H (e.g. 0.01)')
  base = dict(module_seeds) if adaptive_lib.is_adaptive(module_seeds) else {}
  return {**base, **({'ci_halfwidth': ci_halfwidth} if ci_halfwidth is not None else {}),
          **extra}


def _seeds(seeds, where) -> Tuple[int, ...]:
  if isinstance(seeds, int) and not isinstance(seeds, bool):
    if seeds <= 0:
      raise UserError(f'{where}: seeds={seeds} must be positive (or a list of seeds)')
    return tuple(range(seeds))
  if isinstance(seeds, (list, tuple)) and seeds and all(isinstance(s, int) for s in seeds):
    if len(set(seeds)) != len(seeds):
      raise UserError(f'{where}: seeds {list(seeds)} repeat')
    return tuple(seeds)
  raise UserError(f'{where}: seeds must be a positive count or a list of ints, got {seeds!r}')


def _check_dim(key: str, dim: Any, where: str) -> Dict[str, Any]:
  if not isinstance(dim, dict):
    raise UserError(f'{where}: search_space[{key!r}] must be a dict')
  if 'feasible_points' in dim:
    points = dim['feasible_points']
    if set(dim) != {'feasible_points'} or not isinstance(points, (list, tuple)) or not points:
      raise UserError(f'{where}: search_space[{key!r}] = {{"feasible_points": [non-empty list]}}')
    return {'feasible_points': list(points)}
  scaling = dim.get('scaling', 'linear')
  if set(dim) - {'min', 'max', 'scaling'} or 'min' not in dim or 'max' not in dim:
    raise UserError(f'{where}: search_space[{key!r}] needs min and max (and scaling: log or '
                    'linear), or feasible_points')
  if scaling not in SCALINGS:
    raise UserError(f'{where}: search_space[{key!r}] scaling={scaling!r}; valid: log, linear')
  lo, hi = float(dim['min']), float(dim['max'])
  if not lo < hi or (scaling == 'log' and lo <= 0):
    raise UserError(f'{where}: search_space[{key!r}] needs min < max' +
                    (' and min > 0 for log scaling' if scaling == 'log' else ''))
  return {'min': lo, 'max': hi, 'scaling': scaling}


def _round(x: float, digits: int = 3) -> float:
  """Three significant digits: readable arm values that a command line reproduces."""
  if x == 0 or not math.isfinite(x):
    return x
  return float(f'{x:.{digits}g}')


def draw(space: Dict[str, Dict[str, Any]], trials: int, seed: int) -> List[Dict[str, Any]]:
  """`trials` points of the space; a pure function of (space, trials, seed). Trial i
  uses its own generator, so adding trials keeps the earlier draws."""
  out = []
  for i in range(trials):
    rng = np.random.default_rng([seed, i])
    point = {}
    for key, dim in space.items():
      if 'feasible_points' in dim:
        point[key] = dim['feasible_points'][int(rng.integers(len(dim['feasible_points'])))]
      elif dim.get('scaling', 'linear') == 'log':
        point[key] = _round(math.exp(rng.uniform(math.log(dim['min']), math.log(dim['max']))))
      else:
        point[key] = _round(rng.uniform(dim['min'], dim['max']))
    out.append(point)
  return out


def narrow(space: Dict[str, Dict[str, Any]], best: Sequence[Dict[str, Any]],
           margin: float) -> Dict[str, Dict[str, Any]]:
  """The coarse-to-fine step: each range shrinks to the span of the `best` points,
  widened by `margin` of the original width on each side (in log space for log
  dimensions) and clipped to the original range; feasible points shrink to those
  the best points use."""
  out = {}
  for key, dim in space.items():
    values = [p[key] for p in best]
    if 'feasible_points' in dim:
      out[key] = {'feasible_points': [v for v in dim['feasible_points'] if v in values]}
      continue
    f, inv = (math.log, math.exp) if dim['scaling'] == 'log' else (float, float)
    lo, hi = f(dim['min']), f(dim['max'])
    pad = margin * (hi - lo)
    new_lo = max(lo, min(f(v) for v in values) - pad)
    new_hi = min(hi, max(f(v) for v in values) + pad)
    out[key] = {'min': inv(new_lo), 'max': inv(new_hi), 'scaling': dim['scaling']}
  return out


def refine_arms(sweep: Sweep, scores: Dict[str, float]) -> Tuple[Dict[str, Dict[str, Any]],
                                                                  Dict[str, Dict[str, Any]]]:
  """Stage 2 of a coarse-to-fine search from stage 1's per-arm scores (mean val
  accuracy over seeds; arms without a score are ignored). Returns (narrowed
  space, arms named fine_00 ...). Pure: same scores, same arms."""
  ranked = sorted((a for a in sweep.arms if a in scores and math.isfinite(scores[a])),
                  key=lambda a: (-scores[a], a))
  if not ranked:
    raise UserError('no first-stage trial finished, so there is nothing to refine around')
  top = [sweep.arms[a] for a in ranked[:sweep.refine['top_k']]]
  space = narrow(sweep.space, top, sweep.refine['margin'])
  points = draw(space, sweep.refine['trials'], sweep.search_seed + 1)
  return space, {f'fine_{i:02d}': p for i, p in enumerate(points)}


def arm_name(overrides: Dict[str, Any]) -> str:
  """A directory name for a grid point: last key component = value, joined by ','."""
  parts = []
  for key, value in overrides.items():
    value = _round(value) if isinstance(value, float) else value
    parts.append(f'{key.split(".")[-1]}={value}')
  return ','.join(parts) or 'default'


def make_config(base: ml_collections.ConfigDict, run: Run) -> ml_collections.ConfigDict:
  """The run's resolved config: base (experiment + command-line overrides), then the
  arm's overrides, then its seed. Errors name the arm and the key."""
  config = ml_collections.ConfigDict(base.to_dict())
  config.lock()
  known = config_lib.flatten(config_lib.base_config().to_dict())
  for key, value in (*run.overrides, ('seed', run.seed)):
    if key not in known:
      close = difflib.get_close_matches(key, list(known), n=1)
      hint = f'; did you mean {close[0]}?' if close else ''
      raise UserError(f'arm {run.arm}: unknown config key {key}{hint}')
    try:
      config.update_from_flattened_dict({key: tuple(value) if isinstance(value, list) else value})
    except (TypeError, ValueError, KeyError) as e:
      raise UserError(f'arm {run.arm}: {key}={value!r} does not fit that key '
                      f'(its default is {known[key]!r}): {e}') from None
  try:
    return resolve_lib.resolve(config)
  except UserError as e:
    raise UserError(f'arm {run.arm}: {e}') from None


def _module(module_path: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location('experiment_sweep_module', module_path)
  if spec is None or not module_path.endswith('.py'):
    raise UserError(f'cannot load {module_path}: not a .py experiment module')
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except FileNotFoundError:
    raise UserError(f'cannot load {module_path}: no such file') from None
  return module


def has_sweep(module_path: str) -> bool:
  """Whether an experiment module file defines get_sweep (an ablation, not one run)."""
  return hasattr(_module(module_path), 'get_sweep')


def load_spec(module_path: str, arg: Optional[str]) -> Any:
  """get_sweep(arg) of an experiment module file."""
  module = _module(module_path)
  if not hasattr(module, 'get_sweep'):
    raise UserError(f'{module_path} has no get_sweep(arg): add one returning the arms (see '
                    'lib/sweeps/sweep.py), or train a single run with launch.train')
  try:
    return module.get_sweep(arg)
  except Exception as e:   # an experiment's own check of its arg
    raise UserError(f'{module_path} get_sweep({arg!r}) failed: {type(e).__name__}: {e}') from None


def manifest(module_path: str, arg: Optional[str], overrides: Dict[str, Any],
             sweep: Sweep) -> Dict[str, Any]:
  """What W/sweep.json records: enough for the report to name the arms and baseline."""
  extra = {'adaptive': sweep.adaptive.to_dict()} if sweep.adaptive else {}
  return config_lib_json({
      'module': module_path, 'arg': arg, 'overrides': overrides, 'kind': sweep.kind,
      'baseline': sweep.baseline, 'seeds': list(sweep.seeds), 'arms': sweep.arms,
      'searched_keys': sweep.searched_keys, 'space': sweep.space, 'trials': sweep.trials,
      'search_seed': sweep.search_seed, 'refine': sweep.refine, **extra})


def config_lib_json(obj: Any) -> Any:
  import json
  return json.loads(json.dumps(obj, default=list))
