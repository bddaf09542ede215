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
own run would. A key that means nothing while its factor is off
(`regularize.dropout_at` without dropout, `augment.cutout_patches` without
cutout) does not keep arms apart.
"""
import json
from typing import Any, Dict, List, Sequence, Tuple

import ml_collections
import numpy as np

from lib import config as config_lib
from lib import steps

INIT_KEYS = ('model.init', 'model.init_scale', 'model.init_fan', 'model.init_gain',
             'model.bias_init', 'model.zero_init_residual')
WATCH_KEYS = ('train.log_every', 'train.tb_histograms', 'train.early_stop_patience',
              'train.vectorize', 'train.vectorize_mode', 'train.max_arms',
              'train.checkpoint_every_s')
# A dependent key -> the strength without which it means nothing.
IRRELEVANT_WHEN_OFF = {'regularize.dropout_at': 'regularize.dropout',
                       'augment.cutout_patches': 'augment.cutout_size'}
# The strength an arm gets when its factor is off but the program has it on,
# where that is not the config's off value: a resized crop of scale 1 is the
# whole image.
IDENTITY_WHEN_ON = {'augment.resized_crop_scale': 1.0}


def varying_keys() -> Tuple[str, ...]:
  return ('seed', *steps.hparam_config_keys().values(), *INIT_KEYS, *WATCH_KEYS)


def _off_values() -> Dict[str, Any]:
  return config_lib.flatten(config_lib.base_config().to_dict())


def signature(config_dict: Dict[str, Any]) -> Dict[str, str]:
  """The flattened keys (values as JSON) that must be equal for runs to share a
  program, leaving out the dependent keys of IRRELEVANT_WHEN_OFF (see `group`)."""
  skip = set(varying_keys()) | set(IRRELEVANT_WHEN_OFF)
  return {k: json.dumps(v) for k, v in config_lib.flatten(config_dict).items() if k not in skip}


def _dependents(config_dict: Dict[str, Any]) -> Dict[str, Any]:
  """The dependent keys whose factor is on in this config (the others may take any value)."""
  flat, off = config_lib.flatten(config_dict), _off_values()
  return {k: flat[c] and flat[k] for k, c in IRRELEVANT_WHEN_OFF.items() if flat[c] != off[c]}


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
  each dependent key taken from an arm whose factor is on."""
  off = _off_values()
  flat = [config_lib.flatten(config_lib.to_json_dict(c)) for c in configs]
  program = dict(flat[0])
  for key in steps.hparam_config_keys().values():
    on = [f[key] for f in flat if f[key] != off[key]]
    if on:
      program[key] = on[0]
  for key, controller in IRRELEVANT_WHEN_OFF.items():
    on = [f[key] for f in flat if f[controller] != off[controller]]
    if on:
      program[key] = on[0]
  config = ml_collections.ConfigDict(config_lib.base_config().to_dict())
  config.update_from_flattened_dict({k: tuple(v) if isinstance(v, list) else v
                                     for k, v in program.items()})
  return config_lib.resolve(config)


def arm_hparams(config, program) -> Dict[str, np.ndarray]:
  """The arm's strengths as the shared program needs them (see IDENTITY_WHEN_ON)."""
  hp = steps.hparams(config)
  off = _off_values()
  for name, key in steps.hparam_config_keys().items():
    section, field = key.split('.')
    if key in IDENTITY_WHEN_ON and config[section][field] == off[key] and \
        program[section][field] != off[key]:
      hp[name] = np.float32(IDENTITY_WHEN_ON[key])
  return hp


def chunk_sizes(n: int, cap: int) -> List[int]:
  """n arms split into ceil(n / cap) programs of nearly equal size (one compile
  serves programs of the same size)."""
  cap = max(1, min(cap, n)) if cap > 0 else n
  k = -(-n // cap)
  return [n // k + (1 if i < n % k else 0) for i in range(k)]
