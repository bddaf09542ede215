"""What the recipe's checks (lib/diagnostics/diagnose.py) share: the Result of a check, the
config with regularization off, the first training images, a few train steps."""
import dataclasses
from typing import Any, Callable, Dict, List

import jax
import ml_collections
import numpy as np

from lib.core import config as config_lib
from lib.training import resolve as resolve_lib
from lib.training.engine import Engine

PASS, WARN, FAIL = 'PASS', 'WARN', 'FAIL'
_ORDER = {PASS: 0, WARN: 1, FAIL: 2}


@dataclasses.dataclass
class Result:
  check: str
  verdict: str
  summary: str
  numbers: Dict[str, Any] = dataclasses.field(default_factory=dict)
  plots: List[str] = dataclasses.field(default_factory=list)

  def line(self) -> str:
    return f'{self.verdict} {self.check}: {self.summary}'


def worst(verdicts) -> str:
  return max(verdicts, key=_ORDER.__getitem__, default=PASS)


# ---------------------------------------------------------------- configs and data


def with_overrides(config, overrides: Dict[str, Any]):
  """A resolved copy of `config` with flat dotted overrides."""
  c = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    group, name = key.split('.')
    c[group][name] = value
  return resolve_lib.resolve(c)


def plain(config):
  """`config` with every regularizer and augmentation off (their base defaults), no
  decoupled decay and no TTA: what the recipe's first steps ask for."""
  c = ml_collections.ConfigDict(config.to_dict())
  base = config_lib.base_config()
  c.regularize = base.regularize
  c.augment = base.augment
  c.optim.weight_decay = 0.0
  c.train.eval_tta = 'none'
  return resolve_lib.resolve(c)


def inputs(dataset, n: int, dtype=np.float32):
  """The first `n` training images, normalized as the train step does, and labels."""
  images, labels = dataset.train
  x = images[:n].astype(np.float64) / 255.0
  x = (x - dataset.mean) / dataset.std
  return x.astype(dtype), labels[:n]


def train_steps(eng: Engine, state, steps: int, read_every: int, on_read: Callable = None):
  """`steps` train steps from `state`; every `read_every` steps calls
  on_read(step, mean loss since the last read, train accuracy) and stops if it
  returns True. Returns (state, steps done)."""
  spe, sums, idx, done = eng.steps_per_epoch, eng.zero_sums(), None, 0
  for step in range(int(state.step), int(state.step) + steps):
    if idx is None or step % spe == 0:
      idx = eng.epoch_indices(step // spe)
    state, sums = eng.train_step(state, idx, sums)
    done += 1
    if on_read and (done % read_every == 0 or done == steps):
      host = jax.device_get(sums)
      loss = float(host['loss'] / max(host['steps'], 1))
      acc = float(host['correct'] / max(host['examples'], 1))
      sums = eng.zero_sums()
      if on_read(done, loss, acc):
        break
  return state, done



def pyplot():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt
