"""Orbax checkpoints of a run: the latest (to resume) and the best by val_accuracy.

Each checkpoint holds the train state (StandardSave) and a small JSON `meta`
(epoch, wall time, the normalization statistics of the training split and the
data shape) so that evaluation needs nothing but the workdir.
"""
import os
from typing import Any, Dict, Optional, Tuple

import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from lib.errors import UserError

BEST_METRIC = 'val_accuracy'


def _best_metric(metrics):
  return metrics[BEST_METRIC]


class Checkpoints:

  def __init__(self, directory: str, read_only: bool = False):
    self.directory = os.path.abspath(directory)
    if read_only and not os.path.isdir(self.directory):
      raise UserError(f'no checkpoints in {directory}: the run saved none yet')
    policy = pp.AnyPreservationPolicy([
        pp.LatestN(n=1),
        pp.BestN(get_metric_fn=_best_metric, reverse=False, n=1),
    ])
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=_best_metric, best_mode='max',
        create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only,
        # Synchronous: the train step donates the state buffers right after a save,
        # and an async save may still be reading them. Saves happen once per eval.
        enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'meta'))

  def save(self, step: int, state, meta: Dict[str, Any], metrics: Dict[str, float]) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), metrics=metrics)

  def steps(self):
    return sorted(self.manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def best_step(self) -> Optional[int]:
    return self.manager.best_step()

  def resolve(self, which: str) -> int:
    """'best', 'latest' or a step number -> an existing step, or one clear error."""
    available = self.steps()
    if not available:
      raise UserError(f'no checkpoints in {self.directory}: the run saved none yet')
    if which in ('best', 'latest'):
      return self.best_step() if which == 'best' else self.latest_step()
    try:
      step = int(which)
    except ValueError:
      raise UserError(f'--checkpoint={which!r}: use best, latest or a step number') from None
    if step not in available:
      raise UserError(f'no checkpoint at step {step} in {self.directory}; available: '
                      f'{", ".join(map(str, available))} (best: {self.best_step()})')
    return step

  def restore(self, step: int, abstract_state) -> Tuple[Any, Dict[str, Any]]:
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out['state'], out['meta']

  def restore_meta(self, step: int) -> Dict[str, Any]:
    """Only the JSON meta (data shape, normalization statistics), not the state."""
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
