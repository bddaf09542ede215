"""Repacking (train.repack, lib/runs/loop.py): a vectorized program whose arms end early
goes on with its live arms only, and nothing an arm records changes: the same metrics,
statuses and checkpoints as without repacking, the ended arms' files left alone, and
the same results after a kill."""
import json
import os

import pytest

from lib.core import cache
from lib.core import config as config_lib
from lib.runs import group_train, loop, train
from lib.runs.lock_rules import LOCK_FILE
from lib.runs.rundir import RunDir
from lib.training import vector_engine as ve
from conftest import assert_same_metrics, quickstart_mlp

quiet = lambda message: None
EVERY = {'train.eval_every': 20}   # 40 steps per epoch: two evaluations an epoch
# 4 epochs. Arms 1 and 3 diverge in their first steps (found at the evaluation of step 20:
# 2 of 4 ended, a repack to 2 arms, whose program has no mixup); arm 2 stops early at step
# 120 (1 of 2: a repack to 1). The live arms draw random numbers (dropout): their keys
# must carry over too.
ARMS = [{'regularize.dropout': 0.2}, {'optim.lr': 1e6},
        {'seed': 1, 'train.early_stop_patience': 1, 'regularize.dropout': 0.1},
        {'seed': 2, 'optim.lr': 1e6, 'augment.mixup_alpha': 0.4}]


def configs(epochs=4, arms=ARMS):
  return [quickstart_mlp(epochs, **EVERY, **o) for o in arms]


def checkpoint_steps(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')) if s.isdigit())


def assert_same_run(mine, theirs):
  """Same final status, metrics rows and kept checkpoints."""
  a, b = RunDir(mine).read_status(), RunDir(theirs).read_status()
  for key in ('status', 'step', 'stopped_early', 'best_step', 'best_val_accuracy'):
    assert a.get(key) == pytest.approx(b.get(key), abs=1e-6), (mine, key)
  if RunDir(theirs).read_metrics():
    assert_same_metrics(mine, theirs)
  else:
    assert not RunDir(mine).read_metrics()
  assert checkpoint_steps(mine) == checkpoint_steps(theirs)


def files(workdir):
  """Every file of a run directory (its lock aside) with its size and modification time."""
  out = {}
  for folder, _, names in os.walk(workdir):
    for name in names:
      if name != LOCK_FILE:
        path = os.path.join(folder, name)
        out[os.path.relpath(path, workdir)] = (os.path.getsize(path), os.stat(path).st_mtime_ns)
  return out


@pytest.fixture(scope='module')
def unrepacked(tmp_path_factory):
  """ARMS trained as one group with train.repack off: what repacking must reproduce."""
  root = tmp_path_factory.mktemp('unrepacked')
  dirs = [str(root / f'arm{i}') for i in range(len(ARMS))]
  lines = []
  statuses = group_train.train_group(configs(), dirs, log=lines.append, repack=False)
  assert [(s['status'], s['step']) for s in statuses] == [
      ('done', 160), ('diverged', 3), ('done', 120), ('diverged', 3)]
  assert statuses[2]['stopped_early'] and not any('repacked' in l for l in lines)
  return dirs


# ---------------------------------------------------------------- when it pays (pure)


def test_repack_pays_from_a_quarter_ended_with_an_epoch_left_and_no_arm_waiting():
  spe, total = 40, 160
  assert loop.repack_pays(4, [0, 2, 3], [0] * 4, 20, total, spe)         # 1 of 4: a quarter
  assert not loop.repack_pays(5, [0, 1, 2, 3], [0] * 5, 20, total, spe)  # 1 of 5: less
  assert loop.repack_pays(4, [0], [0] * 4, 120, total, spe)               # one epoch left
  assert not loop.repack_pays(4, [0], [0] * 4, 140, total, spe)           # less than one
  assert not loop.repack_pays(4, [], [0] * 4, 20, total, spe)             # nothing lives
  # arm 2 resumed at step 60 waits for the others: not before they reach it
  assert not loop.repack_pays(4, [0, 2], [0, 0, 60, 0], 40, total, spe)
  assert loop.repack_pays(4, [0, 2], [0, 0, 60, 0], 60, total, spe)
  # the batch must split over the data axis of the live arms' mesh
  assert ve.splits_batch(4, 4, 2, 'vmap') and not ve.splits_batch(4, 3, 2, 'vmap')
  assert ve.splits_batch(4, 3, 32, 'vmap') and not ve.splits_batch(4, 1, 2, 'unroll')


def test_repack_is_a_watch_key_on_by_default():
  assert config_lib.base_config().train.repack is True
  assert 'train.repack' in config_lib.WATCH_KEYS   # arms differing in it share a program
  assert config_lib.diff({'train': {'repack': True}}, {'train': {'repack': False}}) == []


# ---------------------------------------------------------------- the same results


@pytest.mark.parametrize('setting,mode', [('auto', 'vmap'), ('unroll', 'unroll')])
def test_repacked_arms_record_what_they_would_have(unrepacked, tmp_path, setting, mode,
                                                   monkeypatch):
  dirs = [str(tmp_path / f'arm{i}') for i in range(len(ARMS))]
  arm_lines = [[] for _ in ARMS]
  lines = []
  # Each ended arm's files as they are when a repack leaves it behind.
  left = {}
  real = loop._repack

  def repack(eng, state, live, books, done, log):
    for i, b in enumerate(books):
      if i not in live:
        left[b.workdir] = files(b.workdir)
    return real(eng, state, live, books, done, log)
  monkeypatch.setattr(loop, '_repack', repack)
  cache.process_cache().clear()
  statuses = group_train.train_group(configs(), dirs, log=lines.append, mode=setting,
                                     logs=[l.append for l in arm_lines])
  assert f'as one program ({mode};' in lines[0]
  assert (f'repacked at step 20: 2 of 4 arms ended; recompiled for the 2 live arms ({mode}; '
          f'mesh {2 if mode == "vmap" else 1} arms x') in '\n'.join(lines)
  assert any(l.startswith('repacked at step 120: 1 of 2 arms ended; recompiled for the 1 '
                          'live arm') for l in lines)
  assert 'training as arm 2 of 2 in one program' in '\n'.join(arm_lines[2])
  # auto for one arm: the single-arm program, unrolled, its batch over the 4 devices
  assert '(unroll; mesh 1 arms x 4 data)' in '\n'.join(lines)
  # The programs really shrank: train steps of 4, 2 and 1 arms were compiled.
  keys = [json.loads(k) for k in cache.process_cache().program_keys()]
  assert sorted(k[3] for k in keys if k[0][0] == 'step') == [1, 2, 4]   # [what, ..., arms, ...]
  # Every arm's status (under its own index), metrics and checkpoints as without repacking.
  assert [(s['status'], s['step']) for s in statuses] == [
      ('done', 160), ('diverged', 3), ('done', 120), ('diverged', 3)]
  for mine, theirs in zip(dirs, unrepacked):
    assert_same_run(mine, theirs)
  # The arms left behind were not touched after the repack.
  assert sorted(left) == sorted(dirs[1:])
  for workdir, before in left.items():
    assert files(workdir) == before, workdir


def test_repack_off_or_unpaid_leaves_the_program_as_it_is(tmp_path):
  lines = []
  # 1 of 5 arms ended: less than a quarter.
  five = configs(2, ARMS[:2] + [{'seed': 3}, {'seed': 4}, {'seed': 5}])
  statuses = group_train.train_group(five, [str(tmp_path / f'five{i}') for i in range(5)],
                                     log=lines.append)
  assert [s['status'] for s in statuses] == ['done', 'diverged', 'done', 'done', 'done']
  # 2 of 4 ended at step 20, but with one epoch of 40 steps less than an epoch is left.
  statuses = group_train.train_group(configs(1), [str(tmp_path / f'one{i}') for i in range(4)],
                                     log=lines.append)
  assert [s['status'] for s in statuses] == ['done', 'diverged', 'done', 'diverged']
  # It would pay, but train.repack is off (in the first arm's config: the program's).
  off = configs(2)
  off[0].train.repack = False
  statuses = group_train.train_group(off, [str(tmp_path / f'off{i}') for i in range(4)],
                                     log=lines.append)
  assert [s['status'] for s in statuses][:2] == ['done', 'diverged']
  assert not any('repack' in l for l in lines)


# ---------------------------------------------------------------- resume


def test_a_kill_after_a_repack_resumes_to_the_same_results(unrepacked, tmp_path):
  dirs = [str(tmp_path / f'arm{i}') for i in range(len(ARMS))]
  lines = []
  with pytest.raises(train.Preempted):
    group_train.train_group(configs(), dirs, log=lines.append, stop_after_step=60,
                            resume_every_s=1e9)   # a resume point only where it stops
  assert any(l.startswith('repacked at step 20') for l in lines)
  assert [RunDir(d).read_status()['status'] for d in dirs] == [
      'running', 'diverged', 'running', 'diverged']
  assert checkpoint_steps(dirs[0])[-1] == checkpoint_steps(dirs[2])[-1] == 60
  # The rerun (as a sweep's): the runs left to train, one group again.
  live = [0, 2]
  lines = []
  group_train.train_group([configs()[i] for i in live], [dirs[i] for i in live],
                          log=lines.append)
  assert 'resuming from steps [60]' in lines[0]
  assert any(l.startswith('repacked at step 120: 1 of 2 arms ended') for l in lines)
  for mine, theirs in zip(dirs, unrepacked):
    assert_same_run(mine, theirs)


def test_arms_resumed_at_different_steps_repack_once_none_waits(tmp_path):
  # Arm 0 was trained alone and killed at step 60; the others start from scratch.
  three = configs(3, [{}, {'optim.lr': 1e6}, {'seed': 1}, {'seed': 2}])
  dirs = [str(tmp_path / f'arm{i}') for i in range(4)]
  with pytest.raises(train.Preempted):
    train.train_and_evaluate(three[0], dirs[0], log=quiet, stop_after_step=60)
  lines = []
  statuses = group_train.train_group(three, dirs, log=lines.append)
  assert 'resuming from steps [0, 60]' in lines[0]
  # Arm 1 diverged by step 20, but arm 0 waits until step 60: the repack comes there.
  assert [l.split(':')[0] for l in lines if l.startswith('repacked')] == ['repacked at step 60']
  assert [s['status'] for s in statuses] == ['done', 'diverged', 'done', 'done']
  alone = str(tmp_path / 'alone0')
  train.train_and_evaluate(three[0], alone, log=quiet)
  assert_same_run(dirs[0], alone)
