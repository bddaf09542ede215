"""Kill -9 a training or sweep command at random moments until it finishes, then check
that every run it leaves equals the same command's uninterrupted run (launch.chaos).

  W/reference/   the command run once, uninterrupted
  W/chaos/       the same command, killed `kills` times and rerun until it ends
  W/chaos/launch_<i>.log   what each launch printed

Kills alternate between three kinds of moment: a random time after the launch
(anywhere: start-up, training, evaluation, saving; at the latest once the launch
has written its share of the evaluations left), half-way through writing a
metrics row, and while a checkpoint is being written (lib/runs/faults.py, at the
launch's first write of either, so a kill lands whenever work is left). Every
launch is killed as a process group (sweep workers too).

Identical means: every line of metrics.jsonl is valid JSON and the rows are equal
in every field but the timings (examples_per_sec, wall_time); status.json agrees on
the outcome, best and final step and accuracies (and test accuracy); the best and
the latest checkpoints are the same steps and hold the same arrays, exactly.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from lib.core import config as config_lib
from lib.core.errors import UserError
from lib.runs import faults
from lib.runs.metrics import echo, format_duration

TIMINGS = ('examples_per_sec', 'wall_time')
STATUS_KEYS = ('status', 'step', 'best_step', 'best_val_accuracy', 'final_val_accuracy',
               'stopped_early')
KINDS = ('time', 'metrics_write', 'checkpoint_save')
ROOT = config_lib.REPO_ROOT


def command(launcher: str, config: str, workdir: str, args: Sequence[str] = ()) -> List[str]:
  return [sys.executable, '-m', f'launch.{launcher}', f'--config={config}',
          f'--workdir={workdir}', *args]


def _launch(cmd: List[str], log_path: str, fault: Optional[str] = None) -> subprocess.Popen:
  env = dict(os.environ)
  env.pop(faults.ENV, None)
  if fault:
    env[faults.ENV] = fault
  with open(log_path, 'w') as out:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)   # its own group: kill workers too


def _kill_group(process: subprocess.Popen) -> None:
  try:
    os.killpg(process.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass
  process.wait()


def _tail(path: str, n: int = 3) -> str:
  with open(path) as f:
    return ' | '.join(l.strip() for l in f.read().splitlines()[-n:])


def run(launcher: str, config: str, workdir: str, kills: int, args: Sequence[str] = (),
        seed: int = 0, timeout_s: float = 3600, log: Callable[[str], None] = echo
        ) -> Dict[str, Any]:
  """The reference run, then `kills` kills of the same command and a last launch to
  the end; returns {'kills', 'by_kind', 'launches', 'runs', 'differences'}."""
  reference, chaos = os.path.join(workdir, 'reference'), os.path.join(workdir, 'chaos')
  if os.path.exists(chaos):
    raise UserError(f'{chaos} exists (an earlier chaos run): use another --workdir')
  os.makedirs(chaos)
  start = time.time()
  log(f'reference: {" ".join(command(launcher, config, reference, args)[1:])}')
  first_row, evaluations = _reference(command(launcher, config, reference, args), reference,
                                      os.path.join(workdir, 'reference.log'), timeout_s)
  ref_seconds = time.time() - start
  per_eval = (ref_seconds - first_row) / max(evaluations - 1, 1)
  log(f'reference done in {format_duration(ref_seconds)}: {evaluations} evaluations, the '
      f'first {first_row:.1f} s after the launch')
  # With worker processes a fault kills a worker, not the command: kill by time only.
  kinds = ('time',) if any(a.startswith('--parallel=') and a != '--parallel=1'
                           for a in args) else KINDS
  rng = random.Random(seed)
  by_kind = dict.fromkeys(KINDS, 0)
  landed, launches = 0, 0
  cmd = command(launcher, config, chaos, args)
  while landed < kills:
    kind = kinds[landed % len(kinds)]
    # Each launch may get through about its share of the evaluations left, so that
    # the run is still unfinished when the last kill comes (and each resume starts
    # from a checkpoint past the previous one).
    left = evaluations - _rows(chaos)
    share = max(1, left // (kills - landed + 1))
    launches += 1
    log_path = os.path.join(chaos, f'launch_{launches}.log')
    process = _launch(cmd, log_path, None if kind == 'time' else f'{kind}@{rng.randint(1, share)}')
    if kind == 'time':
      # A random moment, but never past this launch's share of the evaluations: a
      # launch that loads its programs from a compilation cache runs faster than the
      # reference did, and must not finish the run before its kill.
      delay = rng.uniform(0.0, first_row + share * per_eval)
      low, launched = _rows(chaos), time.time()   # low: rows dropped on resume count
      while process.poll() is None and time.time() - launched < delay:
        rows = _rows(chaos)
        low = min(low, rows)
        if rows - low >= share:
          break
        time.sleep(0.05)   # as the reference is watched: little CPU taken from the launch
      if process.poll() is None:
        _kill_group(process)
    else:
      try:
        process.wait(timeout=timeout_s)
      except subprocess.TimeoutExpired:
        _kill_group(process)
        raise UserError(f'launch {launches} did not end in {timeout_s:.0f} s; see {log_path}')
      _kill_group(process)   # a fault kills one process: its sweep workers go too
    if process.returncode == -signal.SIGKILL:
      landed += 1
      by_kind[kind] += 1
      log(f'kill {landed}/{kills} ({kind.replace("_", " ")}): launch {launches} killed')
      continue
    if process.returncode != 0:
      raise UserError(f'launch {launches} failed (exit {process.returncode}): '
                      f'{_tail(log_path)}; see {log_path}')
    log(f'launch {launches} finished before its kill ({kind}): the run is done')
    break
  launches += 1
  log_path = os.path.join(chaos, f'launch_{launches}.log')
  process = _launch(cmd, log_path)
  if process.wait(timeout=timeout_s) != 0:
    raise UserError(f'the last launch failed (exit {process.returncode}): {_tail(log_path)}')
  runs = run_dirs(reference)
  differences = []
  for rel in runs:
    differences += [f'{rel or "."}: {d}' for d in
                    compare(os.path.join(reference, rel), os.path.join(chaos, rel))]
  return {'kills': landed, 'by_kind': by_kind, 'launches': launches, 'runs': len(runs),
          'differences': differences, 'seconds': time.time() - start}


def _rows(root: str) -> int:
  """Metrics rows written under `root` so far (all runs)."""
  n = 0
  for rel in run_dirs(root) if os.path.isdir(root) else []:
    path = os.path.join(root, rel, 'metrics.jsonl')
    if os.path.exists(path):
      with open(path) as f:
        n += sum(1 for line in f if line.strip())
  return n


def _reference(cmd: List[str], workdir: str, log_path: str, timeout_s: float):
  """Runs the uninterrupted reference; (seconds from the launch to its first metrics
  row, evaluations in all)."""
  start = time.time()
  process = _launch(cmd, log_path)
  first = None
  while process.poll() is None:
    if first is None and _rows(workdir):
      first = time.time() - start
    if time.time() - start > timeout_s:
      _kill_group(process)
      raise UserError(f'the reference run took over {timeout_s:.0f} s; see {log_path}')
    time.sleep(0.05)
  if process.returncode != 0:
    raise UserError(f'the uninterrupted reference run failed: {_tail(log_path)}')
  evaluations = _rows(workdir)
  if evaluations == 0:
    raise UserError(f'the reference run wrote no metrics: {_tail(log_path)}')
  return (first if first is not None else time.time() - start), evaluations


def summary(result: Dict[str, Any]) -> str:
  kinds = ', '.join(f'{n} {k.replace("_", " ")}' for k, n in result['by_kind'].items() if n)
  what = ('all resumed runs identical to the uninterrupted reference' if not
          result['differences'] else f'{len(result["differences"])} difference(s)')
  return (f'{result["kills"]} kills ({kinds}) over {result["launches"]} launches, '
          f'{result["runs"]} run(s): {what}')


# ---------------------------------------------------------------- comparing runs


def run_dirs(root: str) -> List[str]:
  """Run directories (holding config.json) at or below `root`, relative to it."""
  out = []
  for here, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d not in ('archive', 'checkpoints', 'tb', 'slurm'))
    if 'config.json' in files:
      out.append(os.path.relpath(here, root) if here != root else '')
  return sorted(out)


def _metrics_lines(path: str):
  """(rows, problems) of a metrics.jsonl, strictly: every line must be JSON."""
  rows, problems = [], []
  if not os.path.exists(path):
    return rows, ['no metrics.jsonl']
  with open(path) as f:
    for i, line in enumerate(f.read().split('\n')):
      if not line:
        continue
      try:
        rows.append(json.loads(line))
      except ValueError:
        problems.append(f'metrics.jsonl line {i + 1} is not JSON: {line[:60]!r}')
  return rows, problems


def _checkpoint_arrays(directory: str, step: int):
  import orbax.checkpoint as ocp
  with ocp.StandardCheckpointer() as ckpt:
    tree = ckpt.restore(os.path.join(directory, str(step), 'state'))
  import jax
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def compare(a: str, b: str) -> List[str]:
  """How run directory `b` differs from `a` (empty: identical, timings aside)."""
  from lib.runs.checkpoint import Checkpoints
  from lib.runs.rundir import RunDir
  out = []
  rows_a, bad_a = _metrics_lines(os.path.join(a, 'metrics.jsonl'))
  rows_b, bad_b = _metrics_lines(os.path.join(b, 'metrics.jsonl'))
  out += bad_b
  strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]
  if strip(rows_a) != strip(rows_b):
    steps_a, steps_b = [r.get('step') for r in rows_a], [r.get('step') for r in rows_b]
    first = next((i for i, (x, y) in enumerate(zip(strip(rows_a), strip(rows_b))) if x != y),
                 min(len(rows_a), len(rows_b)))
    out.append(f'metrics differ (steps {steps_a} vs {steps_b}; first at row {first + 1})')
  sa, sb = RunDir(a).read_status(), RunDir(b).read_status()
  for key in STATUS_KEYS:
    if sa.get(key) != sb.get(key):
      out.append(f'status {key}: {sa.get(key)} vs {sb.get(key)}')
  if sa.get('test', {}).get('accuracy') != sb.get('test', {}).get('accuracy'):
    out.append(f'test accuracy: {sa.get("test")} vs {sb.get("test")}')
  if not os.path.isdir(os.path.join(b, 'checkpoints')):
    return out + ['no checkpoints']
  ca = Checkpoints(os.path.join(a, 'checkpoints'), read_only=True)
  cb = Checkpoints(os.path.join(b, 'checkpoints'), read_only=True)
  for which, step_a, step_b in (('best', ca.best_step(), cb.best_step()),
                                ('latest', ca.latest_step(), cb.latest_step())):
    if step_a != step_b:
      out.append(f'{which} checkpoint at step {step_a} vs {step_b}')
      continue
    arrays_a = _checkpoint_arrays(ca.directory, step_a)
    arrays_b = _checkpoint_arrays(cb.directory, step_b)
    if len(arrays_a) != len(arrays_b) or not all(
        x.shape == y.shape and np.array_equal(x, y) for x, y in zip(arrays_a, arrays_b)):
      out.append(f'{which} checkpoint (step {step_a}) holds other arrays')
  ca.close()
  cb.close()
  if os.path.exists(os.path.join(b, 'lock.json')):
    out.append('a lock was left behind')
  return out
