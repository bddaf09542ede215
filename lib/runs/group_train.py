"""train_group: runs that share a program (lib/training/arms.py) trained together as arms:
planning the programs that fit the devices and opening each arm's RunBook; the
loop itself is lib/runs/loop.py.

Every arm is an ordinary run kept by a RunBook (lib/runs/runbook.py): its own
config.json, status.json, metrics.jsonl, TensorBoard events and Orbax
checkpoints, the files train_and_evaluate would leave. Its metrics equal those
of its separate run up to float rounding: same init, data order, random
streams and strengths (tests/test_vectorize.py). As between 1 and 4 devices,
rounding differences can grow in long, noisy runs (dropout 0.5: 1e-3 in the
train loss within 6 epochs, either way).

Checkpoints, resume and everything else an arm does while it trains: the one
loop, lib/runs/loop.py (a single run is a group of one there). Each arm follows its
own train.checkpoint_every_s, which may differ between arms of one program.

Memory. The arms are split into programs that fit the devices: XLA's memory
analysis of the compiled step against 90% of an accelerator's memory (half
the host's for CPU devices), or at most `max_arms` per program. A program whose
arms end early shrinks to its live ones (train.repack: lib/runs/loop.py), which
need less.
"""
from typing import Any, Callable, Dict, List, Optional, Sequence

import jax

from lib.core import sharding
from lib.core.errors import UserError
from lib.data import datasets as data
from lib.data import device, stream
from lib.runs import loop
from lib.runs import lock as lock_lib
from lib.runs.metrics import echo
from lib.runs.runbook import RunBook
from lib.runs.train import train_and_evaluate
from lib.training import arms as arms_lib
from lib.training import vector_engine as ve

def plan_programs(configs: Sequence, dataset, devices, mode: str, max_arms: int = 0,
                  memory_budget: Optional[int] = None, log=echo):
  """(indices of `configs` per program, the engine of the first program): at
  most `max_arms` arms each (0: no cap), fewer where the compiled step would not
  fit `memory_budget` bytes per device. The engine's step is compiled already."""
  n = len(configs)
  sizes = arms_lib.chunk_sizes(n, max_arms or n)
  budget = sharding.agree(memory_budget if memory_budget is not None
                          else device.memory_budget(devices))
  while True:   # memory grows about linearly with the arms: one or two compiles
    eng = ve.VectorEngine(configs[:sizes[0]], dataset, devices, mode)
    need = eng.bytes_per_device()
    if need is None or need <= budget or sizes[0] == 1:
      break
    cap = max(1, min(sizes[0] - 1, int(budget // (need / sizes[0]))))
    log(f'{sizes[0]} arms need {need / 2**20:,.0f} MiB per device, over the '
        f'{budget / 2**20:,.0f} MiB budget: at most {cap} arms per program')
    sizes = arms_lib.chunk_sizes(n, cap)
  out, start = [], 0
  for size in sizes:
    out.append(list(range(start, start + size)))
    start += size
  return out, eng


def train_group(configs: Sequence, workdirs: Sequence[str], *, logs: Optional[Sequence] = None,
                log: Callable = echo, hparams: Optional[Sequence[Dict[str, Any]]] = None,
                stop_after_step: Optional[int] = None, devices=None, mode: Optional[str] = None,
                max_arms: Optional[int] = None, memory_budget: Optional[int] = None,
                resume_every_s: Optional[float] = None,
                repack: Optional[bool] = None) -> List[Dict[str, Any]]:
  """Trains every config in its workdir, as arms of as few programs as fit.

  `logs[i]` receives arm i's lines (its log.txt); `log` the group's. mode,
  max_arms and repack default to the first config's train.vectorize_mode /
  max_arms / repack (a program of arms that ended early is repacked to its live
  ones: lib/runs/loop.py);
  resume_every_s, when given, overrides every arm's train.checkpoint_every_s.
  Returns each arm's final status, in order. Bad input raises UserError before
  anything is written.
  """
  n = len(configs)
  logs = list(logs) if logs is not None else [lambda m: None] * n
  books = [RunBook(c, w, log=l, hparams=h)
           for c, w, l, h in zip(configs, workdirs, logs, hparams or [None] * n)]
  groups, notes = arms_lib.group([b.config_dict for b in books])
  if len(groups) > 1:
    raise UserError(f'these runs cannot share a program: {notes[0]}')
  first = books[0].config
  mode = mode or first.train.vectorize_mode
  max_arms = first.train.max_arms if max_arms is None else max_arms
  repack = first.train.repack if repack is None else repack
  devices = list(devices if devices is not None else jax.devices())
  dataset = data.load(first.data)
  pipeline, why = stream.choose(first.data.pipeline, dataset, device.memory_budget(devices))
  if pipeline == 'stream':   # arms gather from one resident split; streamed runs go alone
    log(f'input pipeline: stream ({why}): vectorized arms need the resident pipeline; '
        f'training the {n} runs one after another')
    return [train_and_evaluate(b.config, workdir, log=log_i, hparams=h,   # as launch.train
                               stop_after_step=stop_after_step)
            for b, workdir, log_i, h in zip(books, workdirs, logs, hparams or [None] * n)]
  total = first.train.epochs * device.steps_per_epoch(first, dataset)
  batch = first.train.batch_size
  sharding.check_batch(batch, sharding.make_arm_mesh(devices, ve.arm_axis_size(
      len(devices), n, batch, ve.resolve_mode(mode, first, devices[0].platform, n))))

  results: List[Optional[Dict[str, Any]]] = []
  ended: Dict[int, Dict[str, Any]] = {}   # arm -> final status, as soon as it has one
  live: List[int] = []
  try:
    for b in books:
      try:
        results.append(b.open(total))   # takes each arm's lock
      except lock_lib.LockHeld as e:    # trained elsewhere: not this group's to touch
        b.log(f'skipped: {e}')
        results.append({'status': 'held', 'reason': str(e)})
    live = [i for i in range(n) if results[i] is None]
    if live:
      programs, eng = plan_programs([books[i].config for i in live], dataset, devices, mode,
                                    max_arms, memory_budget, log)
      for p, members in enumerate(programs):
        chunk = [live[j] for j in members]
        if len(programs) > 1:
          log(f'program {p + 1}/{len(programs)}: {len(chunk)} arms')
        if p > 0:   # the first program's engine comes compiled from the plan
          eng = ve.VectorEngine([books[i].config for i in chunk], dataset, devices, mode)
        finished: Dict[int, Dict[str, Any]] = {}
        try:
          loop.train_arms(eng, [books[i] for i in chunk], log, stop_after_step=stop_after_step,
                          checkpoint_every_s=resume_every_s, finished=finished, repack=repack)
        finally:
          ended.update({chunk[j]: status for j, status in finished.items()})
  except (Exception, KeyboardInterrupt) as e:
    # An arm that ended keeps its status; the others record the failure.
    loop.abandon([books[i] for i in live if i not in ended], e)
    raise
  finally:
    for b in books:
      b.release()
  return [ended.get(i, r) for i, r in enumerate(results)]
