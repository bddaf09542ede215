"""train_and_evaluate: one run from config to checkpoints, resumable.

A single run is a group of one for the loop (lib/runs/loop.py: checkpoints, resume,
early stopping, divergence), trained with the plain engine.Engine step: no arm
axis and no VectorEngine, the program launch.train, launch.eval and
launch.benchmark share. `SingleArm` gives that engine the interface the loop
needs. The run's files are kept by a RunBook (lib/runs/runbook.py), as an arm's are.
"""
from typing import Any, Dict, Optional

from lib.core import sharding
from lib.data import datasets as data
from lib.runs import loop
from lib.runs.loop import Preempted, checkpoint_meta, is_eval_step  # noqa: F401 - public here
from lib.runs.metrics import echo
from lib.runs.runbook import RunBook
from lib.training import engine


class SingleArm:
  """An Engine seen by the loop as a program of one arm: the same calls as a
  VectorEngine's, each passed to the engine's own (a step without an `active`
  mask, state without an arm axis), with per-arm lists where the loop expects them."""
  grouped = False   # the run's own log lines, and per-arm errors raise (lib/runs/loop.py)
  n = 1

  def __init__(self, eng: engine.Engine):
    self.base = eng
    self.program, self.dataset, self.mesh = eng.config, eng.dataset, eng.mesh
    self.total_steps, self.steps_per_epoch = eng.total_steps, eng.steps_per_epoch
    self._fresh = None

  def abstract_arm_state(self):
    return self.base.abstract_state()

  def init_arm(self, i: int, reference=None):
    self._fresh = self.base.init_state(reference)
    return self._fresh

  def stack(self, arm_states):
    """The one arm's state: a restored one copied into XLA-owned buffers (it may alias
    host memory, and the step donates it); a fresh one is XLA's already."""
    (state,) = arm_states
    return state if state is self._fresh else self.base.owned(state)

  def arm_state(self, state, i: int):
    return state

  def step_inputs(self, step: int):
    return self.base.step_inputs(step)

  def zero_sums(self):
    return self.base.zero_sums()

  def train_step(self, state, inputs, sums, active=None):
    return self.base.train_step(state, inputs, sums)   # the one arm is always active

  def learning_rates(self, step: int):
    return [self.base.learning_rate(step)]

  def evaluate(self, state, split: str):
    return [self.base.evaluate(state, split)]


def train_and_evaluate(config, workdir: str, *, fresh: bool = False, mesh=None,
                       stop_after_step: Optional[int] = None, log=echo,
                       hparams: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
  """Trains `config` in `workdir` (resuming if it holds this config's run).

  `hparams` (default: the flattened config) go to TensorBoard's HParams tab.
  Returns the final status record. Bad input raises UserError before anything
  is written to disk.
  """
  book = RunBook(config, workdir, fresh=fresh, log=log, hparams=hparams)   # reads only
  dataset = data.load(book.config.data)               # may fail: nothing written yet
  mesh = mesh if mesh is not None else sharding.make_mesh()
  eng = engine.Engine(book.config, dataset, mesh, log=book.log)
  try:
    finished = book.open(eng.total_steps)             # takes the run's lock
    if finished is not None:
      return finished
    try:
      return loop.train_arms(SingleArm(eng), [book], log, stop_after_step=stop_after_step)[0]
    except (Exception, KeyboardInterrupt) as e:
      loop.abandon([book], e)
      raise
  finally:
    eng.close()
    book.release()
