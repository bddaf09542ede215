"""Ensembles of finished runs: the mean of their softmax outputs.

`evaluate_ensemble(dirs)` restores each member's checkpoint (the best one unless
asked otherwise; the weights that selected it: the moving average of a run with
train.ema_decay and select_by=ema) with the normalization statistics recorded beside it, and
evaluates every member and the ensemble in one compiled program per split: for
each padded batch, each member's softmax (its own mean/std, its test-time views
averaged as launch.eval does: `train.eval_tta` unless `tta` is given), and their
mean over members, the ensemble's prediction. It sums each member's and the
ensemble's loss (cross-entropy of the prediction), correct predictions (and top-5
above 10 classes) over the split, as an evaluation of one run does.

A directory that holds `seed_<k>` run directories (an arm of a sweep,
W/<arm>/seed_<k>) stands for its runs. Members may differ in model and training
(a bootstrapped run beside a dropout one) but not in their data: the same source,
split and number of classes, else one error line.
"""
import os
import re
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lib.core import sharding
from lib.core import config as config_lib
from lib.core.errors import UserError
from lib.runs import evaluate
from lib.runs.checkpoint import Checkpoints
from lib.runs.rundir import RunDir
from lib.training import engine
from lib.training import eval_step as eval_lib
from lib.training import state as state_lib

SPLITS = ('val', 'test')
# Data keys that leave the evaluated splits as they are (the training order, the pipeline).
_SAME_DATA_EXCEPT = ('bootstrap', 'pipeline', 'workers', 'prefetch', 'max_bad_records')


def member_dirs(dirs: Sequence[str]) -> List[str]:
  """The run directories of `dirs`: a run directory (it has config.json) stands for
  itself, a sweep arm's directory for its seed_<k> runs (in seed order)."""
  out = []
  for d in dirs:
    if not os.path.isdir(d):
      raise UserError(f'--ensemble: no directory {d}')
    if RunDir(d).has_run():
      out.append(d)
      continue
    seeds = [(int(m.group(1)), name) for name in os.listdir(d)
             for m in [re.match(r'^seed_(\d+)$', name)] if m and RunDir(os.path.join(d, name)).has_run()]
    if not seeds:
      raise UserError(f'--ensemble: {d} is neither a run directory (no config.json) nor a '
                      'sweep arm\'s directory (no seed_<k> runs in it)')
    out += [os.path.join(d, name) for _, name in sorted(seeds)]
  if not out:
    raise UserError('--ensemble: name at least one run directory')
  return out


def _data_keys(config) -> Dict[str, Any]:
  return {k: v for k, v in config.data.to_dict().items() if k not in _SAME_DATA_EXCEPT}


def _members(dirs: Sequence[str], checkpoint: str, data_source: Optional[str],
             data_path: Optional[str]) -> List[Dict[str, Any]]:
  members = []
  for d in dirs:
    config = evaluate.on_data(config_lib.from_json_dict(RunDir(d).read_config()), data_source,
                              data_path)
    checkpoints = Checkpoints(RunDir(d).checkpoint_dir, read_only=True)
    step = checkpoints.resolve(checkpoint)
    members.append({'workdir': d, 'config': config, 'checkpoints': checkpoints, 'step': step,
                    'meta': checkpoints.restore_meta(step)})
  first = members[0]
  for m in members[1:]:
    if _data_keys(m['config']) != _data_keys(first['config']):
      diff = sorted(k for k, v in _data_keys(m['config']).items()
                    if _data_keys(first['config']).get(k) != v)
      raise UserError(f'--ensemble: {m["workdir"]} was trained on other data than '
                      f'{first["workdir"]} (data.{", data.".join(diff)} differ); an ensemble\'s '
                      'members must share their data and splits')
    for key in ('num_classes', 'image_shape'):
      if list(np.atleast_1d(m['meta'][key])) != list(np.atleast_1d(first['meta'][key])):
        raise UserError(f'--ensemble: {m["workdir"]} has {key} {m["meta"][key]}, '
                        f'{first["workdir"]} {first["meta"][key]}; an ensemble\'s members '
                        'must share them')
  return members


def ensemble_program(models_: Sequence[Any], means, stds, ttas: Sequence[str], top5: bool,
                     draws: Optional[Sequence[int]] = None):
  """sums(variables, images, labels, idx, mask) -> {'members': [sums of each member],
  'ensemble': sums of the mean of their probabilities} for one padded batch (not
  jitted); `variables` is one {'params', 'batch_stats'} per member; `draws`: each
  member's fixed draws of fractional pooling regions (default 1)."""
  draws = draws or [1] * len(models_)
  log_prob_fns = [eval_lib.make_log_probs(model, np.asarray(mean, np.float32),
                                          np.asarray(std, np.float32), tta, d)
                  for model, mean, std, tta, d in zip(models_, means, stds, ttas, draws)]

  def sums(variables, images, labels, idx, mask):
    x = images[idx].astype(jnp.float32) / 255.0
    y = labels[idx]
    log_probs = [fn(v, x) for fn, v in zip(log_prob_fns, variables)]
    members = [eval_lib.batch_sums(lp, y, mask, top5) for lp in log_probs]
    return {'members': members,
            'ensemble': eval_lib.batch_sums(ensemble_log_probs(log_probs), y, mask, top5)}

  return sums


def ensemble_log_probs(member_log_probs: Sequence[jax.Array]) -> jax.Array:
  """The log of the mean of the members' probabilities (softmax outputs)."""
  probs = sum(jnp.exp(lp) for lp in member_log_probs) / len(member_log_probs)
  return jnp.log(jnp.maximum(probs, 1e-30))


def evaluate_ensemble(dirs: Sequence[str], splits: Sequence[str] = SPLITS,
                      checkpoint: str = 'best', tta: Optional[str] = None,
                      data_source: Optional[str] = None, data_path: Optional[str] = None,
                      mesh=None) -> Dict[str, Any]:
  """{'members': [{'workdir', 'step', <split>: result}], 'ensemble': {<split>: result}},
  a result being launch.eval's {'accuracy', ['top5_accuracy'], 'loss', 'num_examples'}."""
  members = _members(member_dirs(dirs), checkpoint, data_source, data_path)
  try:
    dataset = evaluate.dataset_for(members[0]['config'], members[0]['meta'])
    mesh = mesh if mesh is not None else sharding.make_mesh()
    engines = [engine.Engine(m['config'], dataset, mesh, mean=m['meta']['mean'],
                             std=m['meta']['std'], eval_only=True) for m in members]
    ttas = [e.check_tta(tta) for e in engines]
    variables = []
    for m, e in zip(members, engines):
      state, _ = m['checkpoints'].restore(m['step'], e.abstract_state())
      # each member's selected weights: its moving average where that picked its best
      state = state_lib.ema_view(state, evaluate.weights_for(m['config']))
      variables.append({'params': state.params, 'batch_stats': state.batch_stats})
      del state
    top5 = eval_lib.reports_top5(dataset.num_classes)
    step = ensemble_program([e.model for e in engines], [e.mean for e in engines],
                            [e.std for e in engines], ttas, top5,
                            [e.eval_draws for e in engines])
    totals = {split: _evaluate_split(engines[0], step, variables, split) for split in splits}
  finally:
    for m in members:
      m['checkpoints'].close()
  out_members = [{'workdir': m['workdir'], 'step': m['step'],
                  **{s: engine.eval_result(totals[s]['members'][i]) for s in splits}}
                 for i, m in enumerate(members)]
  return {'members': out_members,
          'ensemble': {s: engine.eval_result(totals[s]['ensemble']) for s in splits},
          'tta': sorted(set(ttas))}


def _evaluate_split(eng: engine.Engine, step, variables, split: str):
  """The host sums of `step` over a split: one scan of the resident split's padded
  batches, or the streaming pipeline's batches added in order on the devices."""
  if eng.pipeline == 'stream':
    add = jax.jit(lambda totals, v, *batch: jax.tree.map(jnp.add, totals, step(v, *batch)),
                  donate_argnums=(0,), out_shardings=eng.rep)
    totals = None
    for batch in eng.data.eval_batches(split):
      if totals is None:
        shapes = jax.eval_shape(step, variables, *batch)
        totals = jax.jit(lambda: _zeros(shapes), out_shardings=eng.rep)()
      totals = add(totals, variables, *batch)
      if eng._serialize:
        jax.block_until_ready(totals)
    return jax.device_get(totals)

  def run(v, images, labels, idx, mask):
    zeros = _zeros(jax.eval_shape(step, v, images, labels, idx[0], mask[0]))

    def body(totals, batch):
      return jax.tree.map(jnp.add, totals, step(v, images, labels, *batch)), None
    return jax.lax.scan(body, zeros, (idx, mask))[0]

  return jax.device_get(jax.jit(run)(variables, *eng.eval_inputs(split)))


def _zeros(shapes):
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def table(result: Dict[str, Any], root: Optional[str] = None) -> List[str]:
  """The result as a markdown table: each member's accuracy and loss on each split,
  then the ensemble's (top-5 accuracy too where reported)."""
  splits = [s for s in result['ensemble']]
  top5 = any('top5_accuracy' in result['ensemble'][s] for s in splits)
  head = ['run', 'step']
  for s in splits:
    head += [f'{s} accuracy'] + ([f'{s} top-5'] if top5 else []) + [f'{s} loss']
  lines = ['| ' + ' | '.join(head) + ' |', '| --- |' + ' ---: |' * (len(head) - 1)]

  def cells(r):
    out = []
    for s in splits:
      out += [f'{r[s]["accuracy"]:.4f}'] + ([f'{r[s]["top5_accuracy"]:.4f}'] if top5 else [])
      out += [f'{r[s]["loss"]:.4f}']
    return out
  for m in result['members']:
    name = os.path.relpath(m['workdir'], root) if root else m['workdir']
    lines.append('| ' + ' | '.join([name, str(m['step'])] + cells(m)) + ' |')
  n = len(result['members'])
  lines.append('| ' + ' | '.join([f'**ensemble of {n}**', ''] + cells(result['ensemble'])) + ' |')
  return lines
