"""`train.profile_steps=START,COUNT`: a jax.profiler trace of those train steps.

The trace goes to W/profile (a single run's workdir; a vectorized group's first arm's):
plugins/profile/<time>/<host>.xplane.pb, what TensorBoard's profile tab (the
tensorboard-plugin-profile / xprof package) shows, and a .trace.json.gz that
Perfetto (ui.perfetto.dev) opens. Steps count from 0 as the loop runs them: START is
the first profiled step, so START >= 1 keeps the first step's compile out of it.
The trace starts before step START is dispatched and stops after step
START+COUNT-1 has finished (the profiler waits for the devices), so it holds
exactly those steps' device work and what the host did meanwhile. A resumed run that
starts past START records nothing.
"""
import os
from typing import Optional, Tuple

import jax

from lib.core.errors import UserError


def parse_steps(value) -> Optional[Tuple[int, int]]:
  """'START,COUNT' -> (START, COUNT); '' -> None. Anything else is one line."""
  if value in ('', None):
    return None
  try:
    start, count = (int(v) for v in str(value).split(','))
  except ValueError:
    start = count = -1
  if start < 0 or count < 1:
    raise UserError(f'train.profile_steps={value!r} must be START,COUNT (steps START to '
                    f'START+COUNT-1, START >= 0, COUNT >= 1), e.g. 10,5; empty = off')
  return start, count


class StepProfiler:
  """Starts and stops the trace around the configured steps; `before(step)` is
  called before step `step` is dispatched, `after(step, state)` once it is."""

  def __init__(self, value, workdir: str, log=print):
    self.steps = parse_steps(value)
    self.dir = os.path.join(workdir, 'profile')
    self.log, self.running = log, False

  def before(self, step: int) -> None:
    if self.steps is not None and step == self.steps[0] and not self.running:
      jax.profiler.start_trace(self.dir)
      self.running = True

  def after(self, step: int, state) -> None:
    if self.running and step == sum(self.steps) - 1:
      self.stop(state)

  def stop(self, state=None) -> None:
    """Ends a running trace (also when training ends before its last step)."""
    if not self.running:
      return
    if state is not None:
      jax.block_until_ready(state)
    jax.profiler.stop_trace()
    self.running = False
    start, count = self.steps
    self.log(f'profile of steps {start}-{start + count - 1} written to {self.dir} '
             f'(tensorboard --logdir {self.dir}: profile tab)')
