"""Multi-process runs, really run: `python -m launch.<x> --processes=2` starts two JAX
processes on this machine (2 CPU devices each, gloo collectives over localhost), as a
multi-host job would be. Each test fails if the multi-process path is wrong: the results
equal a 1-process x 4-device run within 1e-5, only process 0 writes the run's files,
checkpoints move between process counts both ways, a vectorized sweep spans the two
processes, and a kill -9 of one process ends the launch in one line and resumes.

tests/multiprocess_hooks/sitecustomize.py (on the children's PYTHONPATH) lists what each
process writes and can hold process 1 back at a chosen point (a lagging process).
"""
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from lib.core import distributed
from lib.core.errors import UserError
from lib.runs import train
from lib.runs.rundir import RunDir
from lib.sweeps import runner
from lib.sweeps import sweep as sweep_lib
from conftest import ROOT, assert_same_metrics, bad_records_dir, quickstart_mlp

pytestmark = pytest.mark.multiprocess

HOOKS = os.path.join(ROOT, 'tests', 'multiprocess_hooks')
# The quickstart MLP (64 wide) with batch norm, whose statistics are over the global batch:
# 3 epochs of 40 steps, evaluated (and checkpointed) every 20 steps.
RUN = {'model.norm': 'batch', 'train.eval_every': 20, 'train.checkpoint_every_s': 0}
EPOCHS = 3
LAUNCH_TIMEOUT_S = 180
KILL_TIMEOUT_S = 10   # the README's bound: the launcher ends within this of a process's death
quiet = lambda message: None


def run_flags(epochs=EPOCHS, **extra):
  flags = {'model.width': 64, 'train.epochs': epochs, 'train.log_every': 1000, **RUN, **extra}
  return ['--config=experiments/quickstart.py'] + [f'--config.{k}={v}' for k, v in flags.items()]


def launch(module, *args, env=None, **popen):
  """`python -m launch.<module> *args` from the repo root, as a user runs it, with the
  test hooks on the path (inert unless asked for)."""
  env = {**os.environ, 'PYTHONPATH': HOOKS, **(env or {})}
  return subprocess.run([sys.executable, '-m', f'launch.{module}', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, **popen)


def writes(audit_dir, process):
  """What `process` wrote, less what JAX does in every process: naming its threads, and
  making sure the compilation cache's folder exists (only process 0 writes entries)."""
  path = os.path.join(audit_dir, f'p{process}.txt')
  lines = open(path).read().splitlines() if os.path.exists(path) else []
  cache = os.environ['JAX_COMPILATION_CACHE_DIR']
  return [w for w in lines if w not in ('open /proc/self/comm', f'os.mkdir {cache}')]


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """The run trained uninterrupted by this (1-process, 4-device) test process."""
  workdir = str(tmp_path_factory.mktemp('mp') / 'reference')
  train.train_and_evaluate(quickstart_mlp(EPOCHS, **RUN), workdir, log=quiet)
  return workdir


@pytest.fixture(scope='module')
def two_process_run(tmp_path_factory):
  """The same run trained by 2 processes x 2 CPU devices, every Python write listed."""
  base = tmp_path_factory.mktemp('mp2')
  workdir, audit = str(base / 'run'), str(base / 'audit')
  os.makedirs(audit)
  out = launch('train', *run_flags(), f'--workdir={workdir}', '--processes=2',
               '--local_devices=2', env={'MP_TEST_AUDIT': audit})
  return workdir, audit, out


def test_the_launcher_splits_the_devices_and_drops_the_parents_device_count():
  env = {'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_cpu_a=1 '
         '--xla_force_host_platform_device_count=4'}
  what, envs = distributed.plan(2, env=env)
  assert what == '2 processes x 2 CPU device(s)' and len(envs) == 2
  assert all(e['JAX_NUM_CPU_DEVICES'] == '2' and e['XLA_FLAGS'] == '--xla_cpu_a=1' for e in envs)
  assert distributed.plan(2, 3, env=env)[1][0]['JAX_NUM_CPU_DEVICES'] == '3'
  gpus = {'CUDA_VISIBLE_DEVICES': '0,1,2,3'}
  assert [e['CUDA_VISIBLE_DEVICES'] for e in distributed.plan(2, env=gpus)[1]] == ['0,1', '2,3']
  with pytest.raises(UserError, match='needs 6 GPUs; 4 visible'):
    distributed.plan(2, 3, env=gpus)
  with pytest.raises(UserError, match='--local_devices=-1'):
    distributed.plan(2, -1, env=env)


def test_bad_process_flags_are_one_line(tmp_path):
  for processes, devices, mode, message in ((0, 0, 'auto', '--processes=0: use 1 or more'),
                                            (1, 2, 'auto', '--local_devices sets'),
                                            (2, 0, 'off', 'drop --distributed=off')):
    with pytest.raises(UserError, match=message):
      distributed.run_as_processes('launch.train', processes, devices, mode)
  out = launch('sweep', '--config=experiments/quickstart_sweep.py', f'--workdir={tmp_path}',
               '--processes=2', '--parallel=2')
  assert out.returncode == 1 and out.stderr.strip().splitlines() == [
      'error: --processes=N trains each run (or vectorized group) with N processes together: '
      'use it with --executor=local and --parallel=1']


def test_gloo_notices_are_dropped_even_inside_our_lines():
  notice = ('[Gloo] Rank 0 is connected to 1 peer ranks. Expected number of connected peer '
            'ranks is : 1')
  stream = io.StringIO(f'{notice}\nstep 1\n{notice}vectorized\n\n  group 1\n\n'
                       f'[Gloo] Rank [1/3] run\n{notice[len("[Gloo] Rank "):]}\n')
  watch = distributed._Watch([], None, None)
  watch._read(0, stream, 'out')
  lines = [watch.lines.get_nowait()[2] for _ in range(watch.lines.qsize())]
  assert lines == ['step 1\n', 'vectorized\n', '  group 1\n', '\n', '[1/3] run\n', None]


class FakeChild:
  """A child process of the launcher as _Watch sees it: its output, and the return codes
  its polls find (None: running), in turn."""

  def __init__(self, out='', err='', polls=(None,) * 1000):
    self.stdout, self.stderr = io.StringIO(out), io.StringIO(err)
    self.polls, self.returncode = list(polls), None

  def poll(self):
    if self.returncode is None and self.polls:
      self.returncode = self.polls.pop(0)
    return self.returncode

  def kill(self):
    self.returncode = -signal.SIGKILL if self.returncode is None else self.returncode

  def wait(self):
    return self.returncode


def watch(*children):
  out, err = io.StringIO(), io.StringIO()
  return distributed._Watch(list(children), out, err).run(), out.getvalue(), err.getvalue()


def test_a_death_is_one_line_though_process_0_fails_first_of_it():
  # Process 0's collective fails at once and it prints a traceback, which the launcher
  # reads before it sees process 1 dead (its second poll).
  p0 = FakeChild('step 40\n', 'Traceback (most recent call last):\nGloo all-reduce failed\n')
  code, out, err = watch(p0, FakeChild('step 40\n', '', polls=(None, -9)))
  assert code == 128 + 9 and out == 'step 40\n'
  assert err == ('error: process 1 died (signal 9, SIGKILL); stopped the other processes; '
                 'rerun the same command to resume\n')


def test_a_failure_of_every_process_is_process_0s_line_and_another_alone_shows_its_own(
    monkeypatch):
  monkeypatch.setattr(distributed, 'GRACE_S', 0.3)
  bad = 'error: regularize.dropout=1.0 must be in [0, 1) (0 = off)\n'
  assert watch(FakeChild('', bad, polls=(None, 1)), FakeChild('', bad, polls=(1,))) == (1, '', bad)
  code, _, err = watch(FakeChild('step 1\n'), FakeChild('', 'Traceback\nKeyError: 3\n',
                                                         polls=(None, 1)))
  assert code == 1 and err == ('[p1] Traceback\n[p1] KeyError: 3\nerror: process 1 failed (exit '
                               'status 1); stopped the other processes\n')


def test_two_processes_train_what_one_process_trains(reference, two_process_run):
  workdir, audit, out = two_process_run
  assert out.returncode == 0, out.stderr[-3000:]
  assert_same_metrics(reference, workdir)
  session = json.load(open(os.path.join(workdir, 'provenance.json')))['sessions'][-1]
  assert (session['process_count'], session['device_count'], session['local_device_count']) \
      == (2, 4, 2)
  # One run's files, written once: process 0's lines alone reach the console.
  assert sorted(os.listdir(workdir)) == sorted(os.listdir(reference))
  lines = out.stdout.splitlines()
  assert lines[0].startswith('2 processes x 2 CPU device(s) on this machine')
  assert sum(l.startswith('done in') for l in lines) == 1 and 'Gloo' not in out.stdout
  assert out.stderr.strip() == ''
  # Process 1 wrote nothing but its share of each checkpoint; process 0 wrote the run.
  ckpt = os.path.join(workdir, 'checkpoints') + os.sep
  assert writes(audit, 1) and not [w for w in writes(audit, 1) if ckpt not in w]
  assert any(w.endswith(os.path.join(workdir, 'metrics.jsonl')) for w in writes(audit, 0))


# The stream path on records: variable-size JPEGs decoded and cropped to 24 px by 2 grain
# worker processes in each JAX process, each process reading only its rows of every batch.
JPEG = {'data.source': 'synthetic_jpeg', 'data.image_size': 24, 'data.workers': 2,
        'augment.resized_crop_scale': 0.25, 'augment.flip': True, 'train.batch_size': 64,
        'optim.lr': 0.05, 'train.eval_every': 6, 'train.checkpoint_every_s': 0}


def test_two_processes_stream_records_as_one_process_does(tmp_path):
  workdir = str(tmp_path / 'one')
  status = train.train_and_evaluate(quickstart_mlp(2, **JPEG), workdir, log=quiet)
  assert status['status'] == 'done'
  two = str(tmp_path / 'two')
  flags = ['--config=experiments/quickstart.py'] + [
      f'--config.{k}={v}' for k, v in {'model.width': 64, 'train.epochs': 2,
                                       'train.log_every': 1000, **JPEG}.items()]
  out = launch('train', *flags, f'--workdir={two}', '--processes=2', '--local_devices=2')
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'input pipeline: stream (data.source=synthetic_jpeg is read as records)' in out.stdout
  assert [r['step'] for r in RunDir(two).read_metrics()] == [6, 12, 18]
  assert_same_metrics(workdir, two)


BAD_AT = (1, 5, 7, 10, 14, 18, 22)


def warned(lines):
  """The bad records a run's output warned of: their messages, each naming its record."""
  return {l.split('): ', 1)[1] for l in lines if 'skipped a bad record' in l}


def test_bad_records_met_by_any_process_are_warned_of_and_limited_alike(tmp_path):
  """Each process reads its own rows: the bad records process 1 met reach process 0's log
  (the same set one process warns of), and a limit fails every process in one line."""
  path = bad_records_dir(tmp_path, BAD_AT)
  base = {'data.source': 'records', 'data.path': path, 'data.val_fraction': 0.25,
          'data.workers': 0, 'train.batch_size': 8, 'train.eval_batch_size': 8}
  lines = []
  train.train_and_evaluate(quickstart_mlp(2, **base), str(tmp_path / 'one'), log=lines.append)
  assert len(warned(lines)) >= 5
  flags = ['--config=experiments/quickstart.py', '--config.model.width=64',
           '--config.train.epochs=2'] + [f'--config.{k}={v}' for k, v in base.items()]
  two = str(tmp_path / 'two')
  out = launch('train', *flags, f'--workdir={two}', '--processes=2', '--local_devices=2')
  assert out.returncode == 0, out.stderr[-3000:]
  assert warned(out.stdout.splitlines()) == warned(lines)
  out = launch('train', *flags, '--config.data.max_bad_records=2', f'--workdir={tmp_path / "x"}',
               '--processes=2', '--local_devices=2')
  assert out.returncode == 1
  assert [l for l in out.stderr.splitlines() if l.startswith('error')] == [l for l in
                                                                         out.stderr.splitlines()]
  assert re.fullmatch(r'error: \d+ bad records, more than data.max_bad_records=2; first: .*'
                      r'record \d+.*', out.stderr.strip())


def test_checkpoints_of_two_processes_evaluate_in_one_and_in_two(two_process_run):
  workdir, _, _ = two_process_run
  best = RunDir(workdir).read_status()['best_val_accuracy']
  for extra in ([], ['--processes=2', '--local_devices=2']):
    out = launch('eval', f'--workdir={workdir}', *extra)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])['accuracy'] == best, extra


def test_a_run_of_one_process_resumes_with_two_survives_a_kill_of_one_and_resumes(
    reference, tmp_path):
  """Checkpointed by 1 process, resumed by 2; process 1 killed -9 mid-run: the launch ends
  in one line within KILL_TIMEOUT_S; the same command resumes to the uninterrupted run."""
  workdir = str(tmp_path / 'run')
  with pytest.raises(train.Preempted):   # its checkpoint at step 40
    train.train_and_evaluate(quickstart_mlp(EPOCHS, **RUN), workdir, log=quiet,
                             stop_after_step=30)
  args = ['train', *run_flags(), f'--workdir={workdir}', '--processes=2', '--local_devices=2']
  # Process 0 stops at the second metrics row of the launch (step 80) and process 1 waits
  # in the next collective: a certain moment mid-run, then process 1 is killed.
  env = {**os.environ, 'PYTHONPATH': HOOKS, 'ABLATE_FAULT': 'metrics_write@2:pause',
         'ABLATE_FAULT_RELEASE': str(tmp_path / 'never')}
  p = subprocess.Popen([sys.executable, '-m', 'launch.' + args[0], *args[1:]], cwd=ROOT,
                       env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    header = p.stdout.readline()
    pids = [int(x) for x in header.split('pids ')[1].rstrip(')\n').split(', ')]
    deadline = time.time() + LAUNCH_TIMEOUT_S
    while len(RunDir(workdir).read_metrics()) < 3 and time.time() < deadline:
      time.sleep(0.1)
    time.sleep(0.5)   # process 0 is at the pause now
    os.kill(pids[1], signal.SIGKILL)
    killed = time.time()
    out, err = p.communicate(timeout=KILL_TIMEOUT_S)
    took = time.time() - killed
  finally:
    if p.poll() is None:
      p.kill()
  assert f'resuming {workdir} from step 40' in out and 'eval step 60' in out
  assert p.returncode == 128 + signal.SIGKILL and took < KILL_TIMEOUT_S
  assert err.strip().splitlines() == [
      'error: process 1 died (signal 9, SIGKILL); stopped the other processes; rerun the '
      'same command to resume']
  assert 'Traceback' not in out
  with pytest.raises(ProcessLookupError):   # process 0 is gone too
    os.kill(pids[0], 0)
  again = launch(*args)
  assert again.returncode == 0, again.stderr[-3000:]
  # From 60, or 40 if the kill came before the checkpoint at 60 was committed.
  assert re.search(rf'resuming {re.escape(workdir)} from step (40|60)\n', again.stdout)
  assert_same_metrics(reference, workdir)
  assert RunDir(workdir).read_status()['status'] == 'done'


# A process of a job started by another launcher (SLURM, MPI): joins, says so, then syncs.
JOINED = """
from lib.core import sharding
sharding.initialize_distributed()
from jax.experimental import multihost_utils
multihost_utils.sync_global_devices('joined')
print('joined', flush=True)
i = 0
while True:
  i += 1
  multihost_utils.sync_global_devices(f'beat {i}')
"""


def test_without_our_launcher_jax_heartbeat_ends_the_others_in_its_timeout():
  port, heartbeat = distributed.free_port(), 5
  children = []
  for i in range(2):
    env = {**os.environ, 'XLA_FLAGS': '', 'JAX_NUM_CPU_DEVICES': '1',
           distributed.ENV_COORDINATOR: f'127.0.0.1:{port}',
           distributed.ENV_NUM_PROCESSES: '2', distributed.ENV_PROCESS_ID: str(i),
           distributed.ENV_HEARTBEAT: str(heartbeat)}
    children.append(subprocess.Popen([sys.executable, '-c', JOINED], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True))
  try:
    assert any('joined' in line for line in children[0].stdout)   # gloo prints there too
    children[1].kill()
    killed = time.time()
    code = children[0].wait(timeout=heartbeat + 15)   # JAX's default would take 100 s
    assert code != 0 and time.time() - killed < heartbeat + 15
  finally:
    for c in children:
      c.kill()
      c.wait()


AGREE = """
import json, os
from lib.core import sharding
sharding.initialize_distributed()
me = int(os.environ['ABLATE_PROCESS_ID'])
print('agreed', json.dumps(sharding.agree([6 * 2**30 + me, 0.1 + me, me == 0])), flush=True)
print('agreed', json.dumps(sharding.agree(2**40 + me)), flush=True)
"""


def test_agree_hands_every_process_process_0s_values_whole():
  """64-bit numbers arrive whole (without jax_enable_x64 a broadcast cuts them to 32 bits:
  a 6 GiB memory budget became -2 GiB), floats and booleans too, and a scalar stays one."""
  port = distributed.free_port()
  children = []
  for i in range(2):
    env = {**os.environ, 'XLA_FLAGS': '', 'JAX_NUM_CPU_DEVICES': '1',
           distributed.ENV_COORDINATOR: f'127.0.0.1:{port}',
           distributed.ENV_NUM_PROCESSES: '2', distributed.ENV_PROCESS_ID: str(i)}
    children.append(subprocess.Popen([sys.executable, '-c', AGREE], cwd=ROOT, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True))
  try:
    outs = [c.communicate(timeout=LAUNCH_TIMEOUT_S)[0] for c in children]
  finally:
    for c in children:
      c.kill()
  for out in outs:
    rows = [json.loads(l.split(' ', 1)[1]) for l in out.splitlines() if l.startswith('agreed ')]
    assert rows == [[6 * 2**30, 0.1, True], 2**40], out


def test_bad_input_is_one_line_from_every_process(tmp_path):
  out = launch('train', *run_flags(**{'regularize.dropout': 1.0}),
               f'--workdir={tmp_path / "w"}', '--processes=2', '--local_devices=2')
  assert out.returncode == 1
  assert [l for l in out.stderr.splitlines() if l.strip()] == [
      'error: regularize.dropout=1.0 must be in [0, 1) (0 = off)']
  assert not os.path.exists(tmp_path / 'w')


# ---------------------------------------------------------------- a vectorized sweep


SWEEP = {'model.width': 64, 'model.norm': 'batch', 'train.epochs': 2}


def test_a_vectorized_sweep_spans_two_processes_and_ends_at_a_failure_of_process_0(tmp_path):
  """The 3 arms of a vectorized group train over 2 processes as in 1. First, a full disk as
  process 0 writes metrics (process 1 writes none): a sweep records a failed run and goes
  on, but with several processes the failure may be process 0's alone, so the sweep ends
  (it went on with process 0 alone, and hung). The failed process ends at once: a normal
  exit waited in JAX's distributed shutdown (300 s) for process 1, itself waiting in its
  next collective for process 0. Its locks are released; the rerun trains the group."""
  module = 'experiments/quickstart_sweep.py'
  spec = sweep_lib.parse(sweep_lib.load_spec(module, None), 1)
  from experiments import quickstart_sweep
  base = quickstart_sweep.get_config()
  base.update_from_flattened_dict(SWEEP)
  one = str(tmp_path / 'one')
  runner.execute(runner.plan(base, spec.runs(), one), one, 'local', log=quiet, vectorize=True)
  two, audit = str(tmp_path / 'two'), str(tmp_path / 'audit')
  args = ['sweep', f'--config={module}', f'--workdir={two}', '--seeds=1', '--processes=2',
          '--local_devices=2', *[f'--config.{k}={v}' for k, v in SWEEP.items()]]
  out = launch(*args, env={'ABLATE_FAULT': 'metrics_write@1:enospc'})
  assert out.returncode == 1
  errors = [l for l in out.stderr.splitlines() if l.startswith('error')]
  assert len(errors) == 1 and 'disk full writing' in errors[0], out.stderr[-3000:]
  runs = [os.path.join(two, arm, 'seed_0') for arm in spec.arms]
  assert [RunDir(r).read_status().get('status') for r in runs] == ['failed'] * 3
  assert not [r for r in runs if os.path.exists(os.path.join(r, 'lock.json'))]
  os.makedirs(audit)
  # Process 1 lags: it looks at the first run's lock only once process 0 could have taken it.
  first_lock = os.path.join(two, 'no_dropout', 'seed_0', 'lock.json')
  out = launch(*args, env={'MP_TEST_DELAY': f'lock.json|1|{first_lock}|3',
                           'MP_TEST_AUDIT': audit})
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'vectorized: 3 runs in 1 program group(s)' in out.stdout
  assert 'training 3 arms of mlp' in out.stdout, out.stdout
  for arm in spec.arms:
    a, b = os.path.join(one, arm, 'seed_0'), os.path.join(two, arm, 'seed_0')
    assert_same_metrics(a, b)
    sa, sb = RunDir(a).read_status(), RunDir(b).read_status()
    assert sb['status'] == 'done' and sb['best_step'] == sa['best_step']
    assert sb['test']['accuracy'] == pytest.approx(sa['test']['accuracy'], abs=1e-6)
  # Process 1 wrote nothing but its share of the checkpoints (no run folders, no log.txt).
  assert not [w for w in writes(audit, 1) if f'{os.sep}checkpoints{os.sep}' not in w]
