"""Which runs can train together, as arms of one compiled program, and how.

Runs share a program when their resolved configs agree on everything that
shapes it (data, model, batch size, epochs, schedule, optimizer, which
augmentations are on, ...) and differ only in

  * `seed` (model init, data order, every random draw);
  * the continuous strengths the step takes as arrays (`steps.hparams`: the
    learning rate, weight decay, L1/L2, dropout / DropConnect rates, noise
    stds, mixup / cutmix alphas, label smoothing, stochastic-depth p_L, the
    augmentation strengths, FGSM eps);
  * values used only at init (`model.init`, `init_scale`, `init_fan`,
    `init_gain`, `bias_init`, `zero_init_residual`);
  * how a run is watched or stopped (`train.log_every`, `train.tb_histograms`,
    `train.early_stop_patience`) and the vectorize switches themselves.

A strength that is off in one arm and on in another puts the operation in the
program for all of them; the arm that has it off gets its identity value
(rate 0, std 0, alpha 0, p_L 1, resized-crop scale 1), so it computes what its
own run would. A strength whose being on adds to the state or the model (a
`switch` factor: EMA weights, tied weights' reference, auxiliary heads) groups
arms that all have it on (or all off), which may differ in its value. A key that means nothing while its factor is off
(`regularize.dropout_at` without dropout, `augment.cutout_patches` without
cutout) does not keep arms apart.
"""
import json
from typing import Any, Dict, List, Sequence, Tuple

import ml_collections
import numpy as np

from lib.core import factors
from lib.core import config as config_lib
from lib.training import resolve as resolve_lib


def varying_keys() -> Tuple[str, ...]:
  """The keys arms of one program may differ in: the seed, every factor that is
  traced, used only at init or decides when a run stops (lib/core/factors.py), and the
  keys that only watch a run."""
  return ('seed', *factors.program_free_keys(), *config_lib.WATCH_KEYS)




def signature(config_dict: Dict[str, Any]) -> Dict[str, str]:
  """The flattened keys (values as JSON) that must be equal for runs to share a
  program, leaving out the dependent keys (factors.dependents) (see `group`)."""
  skip = set(varying_keys()) | set(factors.dependents())
  flat = config_lib.flatten(config_dict)
  out = {k: json.dumps(v) for k, v in flat.items() if k not in skip}
  for k in factors.switches():   # its value is free, whether it is on is not
    out[k + ':on'] = json.dumps(factors.is_on(k, flat[k]))
  return out


def _dependents(config_dict: Dict[str, Any]) -> Dict[str, Any]:
  """The dependent keys whose factor is on in this config (the others may take any value)."""
  flat = config_lib.flatten(config_dict)
  return {k: flat[c] and flat[k] for k, c in factors.dependents().items() if factors.is_on(c, flat[c])}


def _differences(a: Dict[str, Any], b: Dict[str, Any]) -> List[str]:
  """'key=a vs b' for keys both have, with different values (a dependent key that
  one side leaves free is no difference)."""
  return [f'{k}={a[k]} vs {b[k]}' for k in sorted(set(a) & set(b)) if a[k] != b[k]]


def group(configs: Sequence[Dict[str, Any]]) -> Tuple[List[List[int]], List[str]]:
  """Indices of `configs` (resolved config dicts) grouped by shared program, the
  largest group first, and one line per further group saying why it is apart.

  Runs group by `signature`; within that, runs whose factor is on must agree on
  its dependent keys, and runs with it off join the first group."""
  by_sig: Dict[str, List[int]] = {}
  for i, c in enumerate(configs):
    by_sig.setdefault(json.dumps(sorted(signature(c).items())), []).append(i)
  groups: List[Tuple[Dict[str, Any], List[int]]] = []
  for members in by_sig.values():
    subgroups: List[Tuple[Dict[str, Any], List[int]]] = []
    for i in members:
      deps = _dependents(configs[i])
      for values, idx in subgroups:
        if all(values.get(k, v) == v for k, v in deps.items()):
          values.update(deps)
          idx.append(i)
          break
      else:
        subgroups.append((dict(deps), [i]))
    groups += subgroups
  groups.sort(key=lambda g: (-len(g[1]), g[1][0]))
  notes = []
  if len(groups) > 1:
    first = {k: json.loads(v) for k, v in signature(configs[groups[0][1][0]]).items()}
    first.update(groups[0][0])
    for values, idx in groups[1:]:
      own = {k: json.loads(v) for k, v in signature(configs[idx[0]]).items()}
      own.update(values)
      diffs = _differences(own, first)
      notes.append(f'differs from the first group in {"; ".join(diffs[:4])}'
                   + (f' and {len(diffs) - 4} more keys' if len(diffs) > 4 else ''))
  return [g[1] for g in groups], notes


def program_config(configs: Sequence[ml_collections.ConfigDict]) -> ml_collections.ConfigDict:
  """The config that builds the shared program: the first arm's, with every
  strength that any arm turns on turned on (at the first such arm's value), and
  each dependent key taken from an arm whose factor is on. That is the first
  arm's resolved config itself when no other arm turns on more; only a new
  combination is built and resolved. (`to_json_dict` of a resolved arm copies the
  dict computed when it was resolved: no JSON round trip per arm.)"""
  flat = [config_lib.flatten(config_lib.to_json_dict(c)) for c in configs]
  program = dict(flat[0])
  for key in factors.hparam_keys().values():
    on = [f[key] for f in flat if factors.is_on(key, f[key])]
    if on:
      program[key] = on[0]
  for key, controller in factors.dependents().items():
    on = [f[key] for f in flat if factors.is_on(controller, f[controller])]
    if on:
      program[key] = on[0]
  if program == flat[0]:
    return resolve_lib.resolve(configs[0])
  config = ml_collections.ConfigDict(config_lib.base_config().to_dict())
  config.update_from_flattened_dict({k: tuple(v) if isinstance(v, list) else v
                                     for k, v in program.items()})
  return resolve_lib.resolve(config)


def arm_hparams(config, program) -> Dict[str, np.ndarray]:
  """The arm's strengths as the shared program needs them: a factor off in the arm
  but on in the program gets its identity (lib/core/factors.py: e.g. a resized crop of
  scale 1, the whole image)."""
  hp = factors.hparams(config)
  for f in factors.traced():
    if f.identity is not None and not factors.on(config, f.key) and factors.on(program, f.key):
      hp[f.field] = np.float32(f.identity)
  return hp


def chunk_sizes(n: int, cap: int) -> List[int]:
  """n arms split into ceil(n / cap) programs of nearly equal size (one compile
  serves programs of the same size)."""
  cap = max(1, min(cap, n)) if cap > 0 else n
  k = -(-n // cap)
  return [n // k + (1 if i < n % k else 0) for i in range(k)]
