"""The run lifecycle, in-process: engines freed, exact resume after a partial metrics
line, locks, checkpoint fallback, asynchronous saves, provenance, the train_eval
figures and a full disk. (tests/test_faults.py kills real processes.)"""
import errno
import gc
import json
import os
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

from lib.core import sharding
from lib.core.errors import UserError
from lib.data import datasets as data
from lib.runs import evaluate, group_train, lock, provenance, train
from lib.runs.checkpoint import Checkpoints
from lib.runs.rundir import RunDir
from lib.runs.train import Preempted, train_and_evaluate
from lib.sweeps import runner
from lib.training import engine
from lib.training import vector_engine as ve
from lib.training.resolve import resolve
from conftest import quickstart_mlp

quiet = lambda message: None
TIMINGS = ('examples_per_sec', 'wall_time')


def tiny(epochs=3, **overrides):
  return quickstart_mlp(epochs, **overrides)


@pytest.fixture(scope='module')
def one_device():
  return sharding.make_mesh(jax.devices()[:1])


def rows_of(workdir):
  return [{k: v for k, v in r.items() if k not in TIMINGS} for r in RunDir(workdir).read_metrics()]


@pytest.fixture(scope='module')
def straight(tmp_path_factory, one_device):
  """The uninterrupted 3-epoch run that resumed runs must reproduce."""
  workdir = str(tmp_path_factory.mktemp('straight') / 'w')
  train_and_evaluate(tiny(), workdir, mesh=one_device, log=quiet)
  return workdir


def strict_lines(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f.read().splitlines()]   # every line valid JSON


# ---------------------------------------------------------------- defect 1: engines


def _live_bytes():
  return sum(a.nbytes for a in jax.live_arrays())


def test_engines_are_freed_and_device_memory_does_not_grow_with_runs(tmp_path, one_device):
  counts, live = [], []
  for k in range(3):   # a sequential sweep: each run, then its test evaluation
    workdir = str(tmp_path / f'r{k}')
    train_and_evaluate(tiny(epochs=1, seed=k), workdir, mesh=one_device, log=quiet)
    evaluate.evaluate_checkpoint(workdir, 'best', 'test', mesh=one_device)
    gc.collect()
    counts.append(sum(isinstance(o, engine.Engine) for o in gc.get_objects()))
    live.append(_live_bytes())
  # At most the one engine the evaluation keeps for the next run of the same program.
  assert max(counts) <= 1, counts
  assert live[2] == live[1] == live[0], live
  for k in range(2):   # vectorized groups too
    group_train.train_group([tiny(epochs=1, seed=s) for s in (10 * k, 10 * k + 1)],
                            [str(tmp_path / f'g{k}_{s}') for s in range(2)], log=quiet,
                            devices=jax.devices()[:1])
    gc.collect()
    assert not any(isinstance(o, ve.VectorEngine) for o in gc.get_objects())
    assert sum(isinstance(o, engine.Engine) for o in gc.get_objects()) <= 1
  assert _live_bytes() <= live[0]


# ---------------------------------------------------------------- defect 2: partial line


def test_a_kill_mid_metrics_write_resumes_to_the_uninterrupted_metrics(tmp_path, straight,
                                                                        one_device):
  workdir = str(tmp_path / 'w')
  with pytest.raises(Preempted):
    train_and_evaluate(tiny(), workdir, stop_after_step=80, mesh=one_device, log=quiet)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:   # killed mid-append
    f.write('{"step": 120, "epoch": 3.0, "running_tra')
  assert [r['step'] for r in RunDir(workdir).read_metrics()] == [40, 80]   # skipped on read
  status = train_and_evaluate(tiny(), workdir, mesh=one_device, log=quiet)
  assert status['status'] == 'done'
  assert [r['step'] for r in strict_lines(workdir)] == [40, 80, 120]
  assert rows_of(workdir) == rows_of(straight)


def test_legacy_metric_names_read_as_todays(tmp_path):
  rd = RunDir(str(tmp_path))
  with open(rd.metrics_path, 'w') as f:
    f.write(json.dumps({'step': 1, 'train_loss': 0.5, 'train_accuracy': 0.7}) + '\n')
  assert rd.read_metrics() == [{'step': 1, 'running_train_loss': 0.5,
                                'running_train_accuracy': 0.7}]


# ---------------------------------------------------------------- defect 3: locks


def test_a_second_process_is_refused_naming_the_holder(tmp_path):
  workdir = str(tmp_path / 'w')
  holder = subprocess.Popen(['sleep', '30'])
  try:
    os.makedirs(workdir)
    with open(os.path.join(workdir, lock.LOCK_FILE), 'w') as f:
      json.dump({'state': 'running', 'host': socket.gethostname(), 'pid': holder.pid,
                 'slurm_job': '77_3', 'heartbeat': time.time(), 'nonce': 'x'}, f)
    with pytest.raises(lock.LockHeld, match=rf'pid {holder.pid}, SLURM job 77_3, heartbeat'):
      train_and_evaluate(tiny(epochs=1), workdir, log=quiet)
    assert os.listdir(workdir) == [lock.LOCK_FILE]   # nothing written
    # a sweep skips it and says so; the run is left alone
    tasks = [{'arm': 'a', 'seed': 0, 'workdir': workdir, 'config': {}}]
    lines = []
    assert runner.execute(tasks, str(tmp_path), 'local', log=lines.append) == []
    assert len(lines) == 1 and lines[0].startswith(
        f'a/seed_0 is held by host {socket.gethostname()} pid {holder.pid}, SLURM job 77_3, '
        'heartbeat ') and lines[0].endswith(' s ago: skipped')
  finally:
    holder.kill()
    holder.wait()
  # the holder died: its lock is stale and taken over with a warning
  lines = []
  status = train_and_evaluate(tiny(epochs=1), workdir, log=lines.append)
  assert status['status'] == 'done'
  assert any(l.startswith('warning:') and 'took over a stale lock' in l for l in lines)
  assert not os.path.exists(os.path.join(workdir, lock.LOCK_FILE))   # released at the end


def test_stale_queued_and_own_job_locks(tmp_path, monkeypatch):
  d = str(tmp_path)
  path = os.path.join(d, lock.LOCK_FILE)

  def put(**record):
    with open(path, 'w') as f:
      json.dump({'state': 'running', 'pid': 1, 'nonce': 'n', 'heartbeat': time.time(),
                 **record}, f)
  put(host='another-host')   # alive elsewhere, heartbeat fresh
  assert lock.live_holder(d) is not None
  with pytest.raises(lock.LockHeld):
    lock.RunLock(d, quiet).acquire()
  put(host='another-host', heartbeat=time.time() - lock.lease_s() - 1)   # no heartbeat
  assert lock.live_holder(d) is None
  held = lock.RunLock(d, quiet).acquire()
  assert held.held() and lock.read(d)['pid'] == os.getpid()
  held.release()
  assert not os.path.exists(path)
  # a queued SLURM task: live while the job waits (squeue is absent here: the lease)
  assert lock.place_queued(d, '123_4')
  assert not lock.place_queued(d, '123_4')   # never over an existing lock
  assert lock.live_holder(d)['state'] == 'queued'
  with pytest.raises(lock.LockHeld, match='queued as SLURM job 123_4'):
    lock.RunLock(d, quiet).acquire()
  monkeypatch.setenv('SLURM_ARRAY_JOB_ID', '123')   # ...and that job, once it starts, takes it
  monkeypatch.setenv('SLURM_ARRAY_TASK_ID', '4')
  held = lock.RunLock(d, quiet).acquire()
  assert lock.read(d)['state'] == 'running' and lock.read(d)['slurm_job'] == '123_4'
  held.release()
  # another live step of the same job on another node is not this process
  put(host='another-host', slurm_job='123_4', slurm_restart=0)
  with pytest.raises(lock.LockHeld):
    lock.RunLock(d, quiet).acquire()
  # a requeued job finds its previous incarnation's lock (another host, fresh heartbeat,
  # an earlier SLURM_RESTART_COUNT)
  monkeypatch.setenv('SLURM_RESTART_COUNT', '1')
  lines = []
  held = lock.RunLock(d, lines.append).acquire()
  assert lines and 'requeued' in lines[0]
  # preempted again: the lock turns back into a queued one of the job, not released
  lock.requeue_all()
  assert lock.read(d)['state'] == 'queued' and lock.read(d)['slurm_job'] == '123_4'
  assert not held.held()
  monkeypatch.delenv('SLURM_ARRAY_JOB_ID')
  assert lock.live_holder(d)['state'] == 'queued'   # a sweep rerun leaves it alone
  os.remove(path)


def test_an_unreadable_lock_is_neither_lost_nor_held_forever(tmp_path, monkeypatch):
  d = str(tmp_path)
  path = os.path.join(d, lock.LOCK_FILE)
  monkeypatch.setenv('ABLATE_LOCK_HEARTBEAT_S', '0.05')
  held = lock.RunLock(d, quiet).acquire()
  with open(path, 'w') as f:   # a filesystem hiccup or a half-written file: not a takeover
    f.write('{"state": "runn')
  held.check()
  time.sleep(0.5)
  assert lock.read(d)['nonce'] == held.record['nonce']   # the heartbeat went on and repaired it
  os.remove(path)   # removed by hand: taken again, the run goes on
  held.check()
  assert lock.read(d)['nonce'] == held.record['nonce']
  held.release()
  assert not os.path.exists(path)
  # an unreadable lock left by a dead writer: refused while recent, taken once old
  with open(path, 'w') as f:
    f.write('')
  with pytest.raises(lock.LockHeld, match='unreadable'):
    lock.RunLock(d, quiet).acquire()
  old = time.time() - lock.lease_s() - 1
  os.utime(path, (old, old))
  lines = []
  lock.RunLock(d, lines.append).acquire().release()
  assert any('took over an unreadable lock file' in l for l in lines)


def test_a_taken_over_run_stops_without_writing(tmp_path, one_device, monkeypatch):
  workdir = str(tmp_path / 'w')
  real = RunDir.append_metrics

  def steal_after_first_row(self, row):
    real(self, row)
    with open(os.path.join(workdir, lock.LOCK_FILE), 'w') as f:   # another process took over
      json.dump({'state': 'running', 'host': 'other', 'pid': 1, 'nonce': 'theirs',
                 'heartbeat': time.time()}, f)
  monkeypatch.setattr(RunDir, 'append_metrics', steal_after_first_row)
  with pytest.raises(lock.LockHeld, match='lost the lock'):
    train_and_evaluate(tiny(), workdir, mesh=one_device, log=quiet)
  assert [r['step'] for r in RunDir(workdir).read_metrics()] == [40]
  assert RunDir(workdir).read_status()['status'] == 'running'   # not marked failed by us
  assert lock.read(workdir)['nonce'] == 'theirs'   # their lock is left alone


def test_the_heartbeat_refreshes_the_lock(tmp_path, monkeypatch):
  monkeypatch.setenv('ABLATE_LOCK_HEARTBEAT_S', '0.05')
  held = lock.RunLock(str(tmp_path), quiet).acquire()
  first = lock.read(str(tmp_path))['heartbeat']
  time.sleep(0.5)
  assert lock.read(str(tmp_path))['heartbeat'] > first and held.held()
  held.release()


# ---------------------------------------------------------------- defect 4: bad checkpoints


def _truncate_largest_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, 'r+b') as f:
    f.truncate(os.path.getsize(biggest) // 3)


# A failed restore leaves tensorstore reads unawaited; pytest reports each one.
quiet_failed_restore = pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')


@quiet_failed_restore
def test_a_corrupt_latest_checkpoint_is_archived_and_the_previous_one_resumes(
    tmp_path, straight, one_device):
  workdir = str(tmp_path / 'w')
  with pytest.raises(Preempted):
    train_and_evaluate(tiny(), workdir, stop_after_step=80, mesh=one_device, log=quiet)
  ckpt = os.path.join(workdir, 'checkpoints')
  assert sorted(os.listdir(ckpt)) == ['40', '80']   # the two latest are kept
  _truncate_largest_file(os.path.join(ckpt, '80'))
  lines = []
  status = train_and_evaluate(tiny(), workdir, mesh=one_device, log=lines.append)
  assert status['status'] == 'done'
  warning = [l for l in lines if 'checkpoint at step 80 does not restore' in l]
  assert len(warning) == 1 and 'moved it to' in warning[0]
  assert 'resuming' in ' '.join(lines) and f'{workdir} from step 40' in ' '.join(lines)
  archived = os.listdir(os.path.join(workdir, 'archive'))
  assert len(archived) == 1 and archived[0].startswith('checkpoint-80-')
  assert rows_of(workdir) == rows_of(straight)
  for which in ('best', 'latest'):
    assert (Checkpoints(ckpt, read_only=True).resolve(which) ==
            Checkpoints(os.path.join(straight, 'checkpoints'), read_only=True).resolve(which))


@quiet_failed_restore
def test_a_run_killed_after_its_final_save_with_that_save_unreadable_retrains_the_end(
    tmp_path, straight, one_device):
  workdir = str(tmp_path / 'w')
  train_and_evaluate(tiny(), workdir, mesh=one_device, log=quiet)
  RunDir(workdir).set_status('running', step=120)   # killed before it was marked done
  _truncate_largest_file(os.path.join(workdir, 'checkpoints', '120'))
  lines = []
  status = train_and_evaluate(tiny(), workdir, mesh=one_device, log=lines.append)
  assert status['status'] == 'done'
  assert any('checkpoint at step 120 does not restore' in l for l in lines)
  assert rows_of(workdir) == rows_of(straight)
  restored = Checkpoints(os.path.join(workdir, 'checkpoints'), read_only=True)
  assert restored.latest_step() == 120 and restored.steps() == sorted(
      Checkpoints(os.path.join(straight, 'checkpoints'), read_only=True).steps())


@quiet_failed_restore
def test_no_valid_checkpoint_fails_the_run_and_keeps_everything(tmp_path, one_device):
  workdir = str(tmp_path / 'w')
  with pytest.raises(Preempted):
    train_and_evaluate(tiny(), workdir, stop_after_step=80, mesh=one_device, log=quiet)
  for step in ('40', '80'):
    _truncate_largest_file(os.path.join(workdir, 'checkpoints', step))
  # None restores: the cause may be elsewhere (memory, a changed model), so nothing is
  # moved, the run fails naming each failure, and a rerun tries them again.
  with pytest.raises(UserError, match=r'no checkpoint of .* restores \(step 80: .*; step 40: '
                                      r'.*\); all are left in place'):
    train_and_evaluate(tiny(), workdir, mesh=one_device, log=quiet)
  status = RunDir(workdir).read_status()
  assert status['status'] == 'failed' and 'no checkpoint of' in status['reason']
  assert not os.path.exists(os.path.join(workdir, 'archive'))
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['40', '80']
  assert [r['step'] for r in RunDir(workdir).read_metrics()] == [40, 80]   # kept
  with pytest.raises(UserError, match='no checkpoint of'):   # never silently redone from 0
    train_and_evaluate(tiny(), workdir, mesh=one_device, log=quiet)
  assert [r['step'] for r in RunDir(workdir).read_metrics()] == [40, 80]
  assert train_and_evaluate(tiny(), workdir, fresh=True, mesh=one_device,
                            log=quiet)['status'] == 'done'


# ---------------------------------------------------------------- defect 5: async saves


def test_an_async_save_holds_the_state_of_its_step_though_the_step_donates_it(tmp_path):
  c = resolve(tiny())
  eng = engine.Engine(c, data.load(c.data), sharding.make_mesh(jax.devices()[:1]))
  ckpt = Checkpoints(str(tmp_path / 'ckpt'))
  assert ckpt.manager._options.enable_async_checkpointing   # noqa: SLF001
  state, sums = eng.init_state(), eng.zero_sums()
  idx = eng.epoch_indices(0)
  state, sums = eng.train_step(state, idx, sums)
  saved = jax.device_get(state.params)
  ckpt.save(1, state, {'wall_time': 0.0}, {'val_accuracy': 0.5, 'val_loss': 1.0})
  for _ in range(5):   # the step donates the buffers the save was handed
    state, sums = eng.train_step(state, idx, sums)
  restored, _ = ckpt.restore(1, eng.abstract_state())   # waits for the write first
  ckpt.close()
  for a, b, c_ in zip(jax.tree.leaves(saved), jax.tree.leaves(jax.device_get(restored.params)),
                      jax.tree.leaves(jax.device_get(state.params))):
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c_)


# ---------------------------------------------------------------- defect 8: provenance


def test_provenance_records_the_code_and_a_changed_resume_warns(tmp_path, one_device):
  workdir = str(tmp_path / 'w')
  with pytest.raises(Preempted):
    train_and_evaluate(tiny(epochs=2), workdir, stop_after_step=40, mesh=one_device, log=quiet)
  rd = RunDir(workdir)
  with open(rd.provenance_path) as f:
    record = json.load(f)['sessions'][0]
  head = subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                        cwd=provenance.ROOT).stdout.strip()
  assert record['git_commit'] == head and isinstance(record['git_dirty'], bool)
  assert record['packages']['jax'] == jax.__version__
  assert record['device_kind'] == jax.devices()[0].device_kind
  assert record['device_count'] == 4 and record['process_count'] == 1
  assert record['command'] and record['start_step'] == 0
  # as if the run had been started under another commit and jax
  with open(rd.provenance_path, 'w') as f:
    json.dump({'sessions': [{**record, 'git_commit': 'f' * 40,
                             'packages': {**record['packages'], 'jax': '0.0.1'}}]}, f)
  lines = []
  train_and_evaluate(tiny(epochs=2), workdir, mesh=one_device, log=lines.append)
  warnings = [l for l in lines if l.startswith('warning: resuming')]
  assert len(warnings) == 1 and 'commit ffffffffff ->' in warnings[0]
  assert f'jax 0.0.1 -> {jax.__version__}' in warnings[0]
  with open(rd.provenance_path) as f:
    sessions = json.load(f)['sessions']
  assert len(sessions) == 2 and sessions[1]['start_step'] == 40


def test_an_unreadable_provenance_file_is_archived_not_overwritten(tmp_path):
  rd = RunDir(str(tmp_path))
  with open(rd.provenance_path, 'w') as f:
    f.write('{"sessions": [{"git_comm')   # damaged
  lines = []
  provenance.record(rd, 40, True, lines.append)
  archived = os.listdir(rd.archive_dir)
  assert len(archived) == 1 and archived[0].startswith('provenance-')
  with open(os.path.join(rd.archive_dir, archived[0])) as f:
    assert f.read() == '{"sessions": [{"git_comm'
  with open(rd.provenance_path) as f:
    assert [s['start_step'] for s in json.load(f)['sessions']] == [40]
  assert any('unreadable; moved it to' in l for l in lines)


# ---------------------------------------------------------------- item 11: train_eval


def test_train_eval_is_a_fixed_train_subset_evaluated_like_val(tmp_path, one_device):
  # Heavy augmentation and dropout: the running train figures are not the model's.
  c = tiny(epochs=2, **{'regularize.dropout': 0.5, 'regularize.dropout_at': 'hidden',
                        'augment.crop_padding': 2})
  workdir = str(tmp_path / 'w')
  status = train_and_evaluate(c, workdir, mesh=one_device, log=quiet)
  rows = RunDir(workdir).read_metrics()
  best = next(r for r in rows if r['step'] == status['best_step'])
  config = resolve(c)
  dataset = data.load(config.data)
  subset = dataset.train_eval_indices()
  assert len(subset) == len(dataset.val[1]) and np.all(np.diff(subset) > 0)
  np.testing.assert_array_equal(subset, data.load(config.data).train_eval_indices())
  # the same numbers as evaluating the best checkpoint on that subset as a val split
  dataset.val = (dataset.train[0][subset], dataset.train[1][subset])
  eng = engine.Engine(config, dataset, one_device)
  state, _ = Checkpoints(os.path.join(workdir, 'checkpoints'), read_only=True).restore(
      status['best_step'], eng.abstract_state())
  result = eng.evaluate(state, 'val')
  assert best['train_eval_accuracy'] == pytest.approx(result['accuracy'], abs=1e-9)
  assert best['train_eval_loss'] == pytest.approx(result['loss'], rel=1e-5)
  assert best['running_train_accuracy'] < best['train_eval_accuracy'] - 0.02
  # the subset is shaped like val, so it runs val's compiled evaluation (no second compile)
  eng = engine.Engine(config, data.load(config.data), one_device)
  val, train_eval = eng.evaluate(state, 'val'), eng.evaluate(state, engine.TRAIN_EVAL)
  assert eng._eval_split(config.train.eval_tta)._cache_size() == 1
  assert train_eval['accuracy'] == pytest.approx(result['accuracy'], abs=1e-9)


# ---------------------------------------------------------------- a full disk


def test_a_full_disk_fails_the_run_in_one_line_and_keeps_earlier_checkpoints(
    tmp_path, straight, one_device, monkeypatch):
  workdir = str(tmp_path / 'w')
  real, calls = RunDir.append_metrics, []

  def full_on_third(self, row):
    calls.append(row['step'])
    if len(calls) == 3:
      raise OSError(errno.ENOSPC, 'No space left on device', self.metrics_path)
    real(self, row)
  monkeypatch.setattr(RunDir, 'append_metrics', full_on_third)
  every_eval = tiny(**{'train.checkpoint_every_s': 0})   # a checkpoint at each evaluation
  with pytest.raises(OSError):
    train_and_evaluate(every_eval, workdir, mesh=one_device, log=quiet)
  monkeypatch.undo()
  status = RunDir(workdir).read_status()
  assert status['status'] == 'failed'
  assert status['reason'].startswith(f'disk full writing {workdir}/metrics.jsonl')
  assert '\n' not in status['reason'] and 'rerun' in status['reason']
  ckpt = Checkpoints(os.path.join(workdir, 'checkpoints'), read_only=True)
  assert ckpt.steps() == [40, 80]
  for step in (40, 80):   # every earlier checkpoint restores
    evaluate.evaluate_checkpoint(workdir, str(step), mesh=one_device)
  assert train_and_evaluate(every_eval, workdir, mesh=one_device, log=quiet)['status'] == 'done'
  assert rows_of(workdir) == rows_of(straight)


# ---------------------------------------------------------------- --fresh interrupted


def test_an_interrupted_fresh_archive_never_mixes_two_runs(tmp_path, one_device, monkeypatch):
  workdir = str(tmp_path / 'w')
  train_and_evaluate(tiny(epochs=2), workdir, mesh=one_device, log=quiet)
  import shutil
  real, moved = shutil.move, []

  def dies_after_two(src, dst):   # the process dies half-way through archiving
    if len(moved) == 2:
      raise KeyboardInterrupt
    moved.append(os.path.basename(src))
    return real(src, dst)
  monkeypatch.setattr(shutil, 'move', dies_after_two)
  with pytest.raises(KeyboardInterrupt):
    train_and_evaluate(tiny(epochs=2), workdir, fresh=True, mesh=one_device, log=quiet)
  monkeypatch.setattr(shutil, 'move', real)
  assert 'config.json' not in moved and RunDir(workdir).has_run()   # moved last
  # A directory with run files but no config.json is never started over.
  left = [n for n in os.listdir(workdir) if n in ('checkpoints', 'metrics.jsonl', 'tb')]
  assert left
  os.remove(os.path.join(workdir, 'config.json'))
  with pytest.raises(UserError, match='no config.json .*--fresh'):
    train_and_evaluate(tiny(epochs=2), workdir, mesh=one_device, log=quiet)
  status = train_and_evaluate(tiny(epochs=2), workdir, fresh=True, mesh=one_device, log=quiet)
  assert status['status'] == 'done'
  assert [r['step'] for r in RunDir(workdir).read_metrics()] == [40, 80]   # one run's rows


# ---------------------------------------------------------------- sweeps and other holders


def test_a_run_that_died_before_its_test_is_tested_by_a_rerun_not_retrained(tmp_path):
  workdir = str(tmp_path / 'w')
  train_and_evaluate(tiny(epochs=1), workdir, log=quiet)   # done; the test never ran
  task = {'arm': 'a', 'seed': 0, 'workdir': workdir, 'config': RunDir(workdir).read_config()}
  assert runner.pending([task]) == [task]
  before = RunDir(workdir).read_metrics()
  result = runner.run_task(task)
  assert result['status'] == 'done' and 0 < result['test']['accuracy'] <= 1
  assert RunDir(workdir).read_status()['test'] == result['test']
  assert RunDir(workdir).read_metrics() == before   # nothing retrained
  assert runner.pending([task]) == []
  skipped = {'status': 'done', 'test_skipped': 'no test split'}   # said once, not retried
  assert not runner._needs_test(skipped)


def test_a_failure_never_overwrites_the_status_of_a_run_another_process_holds(tmp_path):
  workdir = str(tmp_path / 'w')
  os.makedirs(workdir)
  RunDir(workdir).set_status('running', step=40)
  holder = subprocess.Popen(['sleep', '30'])
  try:
    with open(os.path.join(workdir, lock.LOCK_FILE), 'w') as f:
      json.dump({'state': 'running', 'host': socket.gethostname(), 'pid': holder.pid,
                 'heartbeat': time.time(), 'nonce': 'theirs'}, f)
    out = runner._failed(workdir, RuntimeError('boom'), quiet, None, True)
    assert out['status'] == 'held'
    assert RunDir(workdir).read_status()['status'] == 'running'
  finally:
    holder.kill()
    holder.wait()
  out = runner._failed(workdir, RuntimeError('boom'), quiet, None, True)   # holder dead
  assert out['status'] == 'failed' and RunDir(workdir).read_status()['status'] == 'failed'


def test_a_run_that_failed_before_it_started_is_not_refused(tmp_path, one_device):
  workdir = str(tmp_path / 'w')
  os.makedirs(workdir)
  RunDir(workdir).set_status('failed', 'no data at /mnt/x')   # what a sweep records then
  status = train_and_evaluate(tiny(epochs=1), workdir, mesh=one_device, log=quiet)
  assert status['status'] == 'done'


def test_a_queued_lock_is_live_only_while_squeue_says_the_job_will_run(monkeypatch):
  def squeue(states):
    def run(*args, **kwargs):
      return subprocess.CompletedProcess(args, 0, stdout=states, stderr='')
    monkeypatch.setattr(lock.subprocess, 'run', run)
  squeue('PENDING\n')
  assert lock._slurm_job_active('7_1') is True
  squeue('REQUEUED\n')
  assert lock._slurm_job_active('7_1') is True
  squeue('COMPLETING\n')   # ending: not a holder any more
  assert lock._slurm_job_active('7_1') is False
  squeue('')
  assert lock._slurm_job_active('7_1') is False


def test_an_arm_taken_over_stops_alone_and_the_other_arms_finish(tmp_path, monkeypatch):
  dirs = [str(tmp_path / f'arm{i}') for i in range(2)]
  real = RunDir.append_metrics

  def steal_arm0_after_its_first_row(self, row):
    real(self, row)
    if self.path == dirs[0]:   # another process takes arm 0's run over
      with open(os.path.join(dirs[0], lock.LOCK_FILE), 'w') as f:
        json.dump({'state': 'running', 'host': 'other', 'pid': 1, 'nonce': 'theirs',
                   'heartbeat': time.time()}, f)
  monkeypatch.setattr(RunDir, 'append_metrics', steal_arm0_after_its_first_row)
  statuses = group_train.train_group([tiny(epochs=2, seed=s) for s in (0, 1)], dirs, log=quiet,
                                     devices=jax.devices()[:1])
  assert statuses[0]['status'] == 'held' and 'lost the lock' in statuses[0]['reason']
  assert [r['step'] for r in RunDir(dirs[0]).read_metrics()] == [40]   # nothing more written
  assert lock.read(dirs[0])['nonce'] == 'theirs'
  assert statuses[1]['status'] == 'done'
  assert [r['step'] for r in RunDir(dirs[1]).read_metrics()] == [40, 80]
