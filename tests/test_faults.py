"""Fault injection with real processes: kill -9 at random moments (lib/runs/chaos.py), two
launches on one workdir, a worker killed out of a --parallel sweep, a full disk,
and a SLURM-style preemption through submitit's local executor."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lib.runs import chaos, faults, lock
from lib.runs.checkpoint import Checkpoints
from lib.runs.rundir import RunDir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small runs with an evaluation every 5-10 steps: every kill lands on unfinished work.
# TRAIN saves a checkpoint at every evaluation, so a kill mid-save can land in any launch.
TRAIN = ['--config.train.epochs=3', '--config.train.eval_every=5', '--config.model.width=64',
         '--config.train.checkpoint_every_s=0']
SWEEP = ['--seeds=1', '--config.train.epochs=2', '--config.train.eval_every=10',
         '--config.model.width=64']


@pytest.fixture
def one_device(monkeypatch):
  """Subprocesses on one CPU device: what is tested here does not depend on the count,
  and 4 simulated devices on 2 cores make every step slower."""
  flags = os.environ.get('XLA_FLAGS', '').replace('--xla_force_host_platform_device_count=4', '')
  monkeypatch.setenv('XLA_FLAGS', flags.strip())
  monkeypatch.delenv(faults.ENV, raising=False)


def launch(*args, fault=None, release=None, **kw):
  env = {k: v for k, v in os.environ.items() if k not in (faults.ENV, faults.RELEASE_ENV)}
  if fault:
    env[faults.ENV] = fault
  if release:
    env[faults.RELEASE_ENV] = release
  return subprocess.Popen([sys.executable, '-m', *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def resumed_from(workdir):
  """The steps the launches of a chaos run resumed from (their logs)."""
  steps = []
  for name in os.listdir(workdir):
    if name.startswith('launch_'):
      with open(os.path.join(workdir, name)) as f:
        steps += [int(l.rsplit(' ', 1)[1]) for l in f if 'resuming' in l and 'from step' in l]
  return steps


# ---------------------------------------------------------------- kill -9 anywhere


def test_kill_9_of_launch_train_at_10_moments_resumes_identically(tmp_path, one_device):
  result = chaos.run('train', 'experiments/quickstart.py', str(tmp_path), 10, TRAIN,
                     log=lambda m: None)
  assert result['kills'] == 10 and result['runs'] == 1, result
  assert set(result['by_kind'].values()) == {3, 4}   # random times, mid-write, mid-save
  assert result['differences'] == [], result['differences']
  assert len(set(resumed_from(str(tmp_path / 'chaos')))) >= 2   # resumed from several steps


@pytest.mark.parametrize('mode', ['--novectorize', '--vectorize'])
def test_kill_9_of_a_sweep_at_10_moments_resumes_identically(tmp_path, one_device, mode):
  result = chaos.run('sweep', 'experiments/quickstart_sweep.py', str(tmp_path), 10,
                     SWEEP + [mode], log=lambda m: None)
  assert result['kills'] == 10 and result['runs'] == 3, result
  assert result['differences'] == [], result['differences']
  with open(tmp_path / 'chaos' / 'results.csv') as f:   # the report of the finished sweep
    assert sum(1 for _ in f) == 4


def test_chaos_finds_a_difference(tmp_path):
  # The comparison itself must be able to fail: a changed row, a missing checkpoint.
  a, b = tmp_path / 'a', tmp_path / 'b'
  for d in (a, b):
    os.makedirs(d)
    RunDir(str(d)).append_metrics({'step': 1, 'val_accuracy': 0.5, 'wall_time': 1.0})
    RunDir(str(d)).set_status('done', step=1)
  with open(b / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 2, "val_acc')
  out = chaos.compare(str(a), str(b))
  assert any('not JSON' in d for d in out) and any('no checkpoints' in d for d in out)


# ---------------------------------------------------------------- two launches at once


def test_a_second_launch_on_a_busy_workdir_refuses_and_the_first_is_unharmed(tmp_path,
                                                                            one_device):
  workdir = str(tmp_path / 'w')
  args = ['launch.train', '--config=experiments/quickstart.py', f'--workdir={workdir}',
          '--config.train.epochs=6', '--config.model.width=64']
  # The first launch holds at its second metrics write until released: busy (its lock
  # beating) for as long as the second launch takes, however fast the machine.
  release = str(tmp_path / 'release')
  first = launch(*args, fault='metrics_write@2:pause', release=release)
  deadline = time.time() + 120
  while not RunDir(workdir).read_metrics() and time.time() < deadline:
    time.sleep(0.05)
  holder = lock.read(workdir)
  assert holder and holder['pid'] == first.pid
  second = launch(*args)
  out, err = second.communicate(timeout=120)
  open(release, 'w').close()
  assert second.returncode == 1
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'error: {workdir} is being trained by host ')
  assert f'pid {first.pid}' in lines[0]
  out, err = first.communicate(timeout=300)
  assert first.returncode == 0, err
  rows = RunDir(workdir).read_metrics()
  assert [r['step'] for r in rows] == [40 * (i + 1) for i in range(6)]   # no duplicates
  assert RunDir(workdir).read_status()['status'] == 'done'
  assert not os.path.exists(os.path.join(workdir, 'archive'))
  with open(os.path.join(workdir, 'provenance.json')) as f:
    assert len(json.load(f)['sessions']) == 1   # the refused launch wrote nothing


# ---------------------------------------------------------------- a dead worker


def test_a_killed_worker_fails_only_its_run_and_a_rerun_finishes_it(tmp_path, one_device):
  workdir = str(tmp_path / 'w')
  args = ['launch.sweep', '--config=experiments/quickstart_sweep.py', f'--workdir={workdir}',
          '--novectorize', '--parallel=2', '--seeds=1', '--config.train.epochs=6',
          '--config.model.width=64']
  # Each worker holds at its second metrics write until released, so the victim is
  # still training when it is killed, however fast the machine.
  release = str(tmp_path / 'release')
  sweep = launch(*args, fault='metrics_write@2:pause', release=release)
  runs = [os.path.join(workdir, arm, 'seed_0') for arm in ('no_dropout', 'dropout_0.2',
                                                           'dropout_0.5')]
  victim, deadline = None, time.time() + 180
  while victim is None and time.time() < deadline:   # a worker that is training a run
    for run in runs:
      holder = lock.read(run)
      if holder and holder.get('pid') not in (None, sweep.pid) and RunDir(run).read_metrics():
        victim = (run, holder['pid'])
        break
    time.sleep(0.05)
  assert victim, 'no worker started training'
  os.kill(victim[1], signal.SIGKILL)
  open(release, 'w').close()
  out, err = sweep.communicate(timeout=300)
  assert sweep.returncode == 0, err
  statuses = {run: RunDir(run).read_status() for run in runs}
  assert statuses[victim[0]]['status'] == 'failed'
  assert statuses[victim[0]]['reason'] == 'worker died: signal 9 (SIGKILL)'
  assert [s['status'] for r, s in statuses.items() if r != victim[0]] == ['done', 'done']
  assert 'worker died: signal 9' in out
  assert not os.path.exists(os.path.join(victim[0], lock.LOCK_FILE))   # the dead worker's lock
  rerun = launch(*args)
  out, err = rerun.communicate(timeout=300)
  assert rerun.returncode == 0, err
  assert all(RunDir(run).read_status()['status'] == 'done' for run in runs)
  assert '2 of 3 runs already finished' in out


# ---------------------------------------------------------------- a full disk


def test_a_full_disk_is_one_error_line_and_keeps_earlier_checkpoints(tmp_path, one_device):
  workdir = str(tmp_path / 'w')
  args = ['launch.train', '--config=experiments/quickstart.py', f'--workdir={workdir}',
          '--config.train.epochs=3', '--config.model.width=64',
          '--config.train.checkpoint_every_s=0']   # a checkpoint at each evaluation
  failing = launch(*args, fault='checkpoint_save@3:enospc')
  out, err = failing.communicate(timeout=300)
  assert failing.returncode == 1
  assert err.strip().splitlines() == [f'error: disk full writing {workdir}/checkpoints '
                                      '(No space left on device (injected by ABLATE_FAULT)); '
                                      'free space and rerun the same command: it resumes '
                                      'from the last checkpoint']
  status = RunDir(workdir).read_status()
  assert status['status'] == 'failed' and status['reason'].startswith('disk full')
  assert Checkpoints(os.path.join(workdir, 'checkpoints'), read_only=True).steps() == [40, 80]
  rerun = launch(*args)
  out, err = rerun.communicate(timeout=300)
  assert rerun.returncode == 0, err
  assert 'resuming' in out and 'from step 80' in out
  assert RunDir(workdir).read_status()['status'] == 'done'


# ---------------------------------------------------------------- SLURM preemption


def test_a_preempted_submitit_task_is_requeued_and_resumes(tmp_path, one_device):
  workdir = str(tmp_path / 'w')
  args = ['launch.sweep', '--config=experiments/quickstart_sweep.py', f'--workdir={workdir}',
          '--executor=submitit_local', '--novectorize', '--seeds=1', '--slurm_time=10',
          '--config.train.epochs=8', '--config.model.width=64']
  # The task holds at its second metrics write (its first checkpoint saved) until
  # released, so the signal finds it training, however fast the machine.
  release = str(tmp_path / 'release')
  sweep = launch(*args, fault='metrics_write@2:pause', release=release)
  run = os.path.join(workdir, 'no_dropout', 'seed_0')
  task, deadline = None, time.time() + 180
  while task is None and time.time() < deadline:   # the array task, past its first checkpoint
    holder = lock.read(run) or {}
    if holder.get('pid') and os.path.isdir(os.path.join(run, 'checkpoints', '40')):
      task = holder['pid']
    time.sleep(0.05)
  assert task, 'the array task did not start training'
  os.kill(task, signal.SIGUSR2)   # what SLURM sends before preempting or at the time limit
  open(release, 'w').close()
  out, err = sweep.communicate(timeout=600)
  assert sweep.returncode == 0, err
  status = RunDir(run).read_status()
  assert status['status'] == 'done' and status['step'] == 8 * 40
  with open(os.path.join(run, 'log.txt')) as f:
    log = f.read()
  assert 'resuming' in log   # the requeued task went on from its checkpoint
  rows = RunDir(run).read_metrics()
  assert [r['step'] for r in rows] == [40 * (i + 1) for i in range(8)]
  with open(os.path.join(run, 'provenance.json')) as f:
    sessions = json.load(f)['sessions']
  assert len(sessions) == 2 and sessions[1]['start_step'] >= 40
