"""Top-5 accuracy: summed by the compiled eval step (also under test-time
augmentation), reported beside accuracy for datasets of more than 10 classes in
metrics.jsonl, TensorBoard, launch.eval's result and vectorized arms; 10-class
runs write what they always did (tests/test_train.py checks their keys)."""
import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import quickstart_mlp
from lib.core import sharding
from lib.runs import evaluate, group_train
from lib.runs.rundir import RunDir
from lib.runs.train import train_and_evaluate
from lib.training import engine
from lib.training import eval_step as eval_lib
from lib.training import state as state_lib

quiet = lambda message: None
C = 12


class _TableModel:
  """A stand-in classifier whose logits are rows of a hand-made table: a 1x2 image
  holds row numbers, and the model reads the left pixel (so a mirrored view reads
  the right one). Called exactly as the eval step calls a Flax model."""

  def __init__(self, table):
    self.table = jnp.asarray(table, jnp.float32)

  def apply(self, variables, x, train=False):
    assert not train
    return self.table[jnp.round(x[:, 0, 0, 0] * 255).astype(jnp.int32)]


def _ranked(label, rank):
  """Logits of C classes with `label` at 0-based position `rank` from the top."""
  order = [c for c in range(C) if c != label]
  order.insert(rank, label)
  row = np.zeros(C, np.float32)
  row[order] = np.arange(C, 0, -1)
  return row


def _eval(table, pixels, labels, mask, tta, top5=True):
  images = jnp.asarray(np.asarray(pixels, np.uint8)[:, None, :, None])   # (N, 1, 2, 1)
  step = eval_lib.make_eval_step(_TableModel(table), 0.0, 1.0, tta, top5=top5)
  state = state_lib.TrainState(step=0, params={}, batch_stats={}, opt_state=None, rng=None)
  out = step(state, images, jnp.asarray(labels), jnp.arange(len(labels)), jnp.asarray(mask))
  return {k: float(v) for k, v in out.items()}


def test_top5_counts_the_label_among_the_five_highest_scores_through_the_eval_step():
  view_a = np.zeros(C, np.float32)
  view_a[:5], view_a[11] = 10.0, 9.5   # label 11 ranks 6th in this view...
  view_b = np.zeros(C, np.float32)
  view_b[5:10], view_b[11] = 10.0, 9.5   # ...and in this one, but 1st in their average
  table = [_ranked(3, 0),       # 0: top-1 (and top-5)
           _ranked(3, 2),       # 1: 3rd: top-5 only
           _ranked(3, 4),       # 2: 5th: top-5 only
           _ranked(3, 5),       # 3: 6th: neither
           _ranked(3, 11),      # 4: last: neither
           np.ones(C),          # 5: all tied: ranks follow the class index, as argmax's
           view_a, view_b]
  pixels = [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (5, 5), (6, 7), (0, 0)]
  labels = [3, 3, 3, 3, 3, 4, 5, 11, 3]
  mask = [True] * 8 + [False]   # a padding row, correct both ways, counts for nothing
  plain = _eval(table, pixels, labels, mask, 'none')
  assert (plain['count'], plain['correct'], plain['correct5']) == (8, 1, 4)
  # Mirrored views are the same rows for 0-6; example 7's averaged prediction puts
  # its label first, which neither view alone puts in its top 5.
  flip = _eval(table, pixels, labels, mask, 'flip')
  assert (flip['count'], flip['correct'], flip['correct5']) == (8, 2, 5)
  assert 'correct5' not in _eval(table, pixels, labels, mask, 'none', top5=False)
  result = engine.eval_result(plain)
  assert list(result) == ['loss', 'accuracy', 'top5_accuracy', 'num_examples']
  assert (result['accuracy'], result['top5_accuracy']) == (1 / 8, 4 / 8)
  assert 'top5_accuracy' not in engine.eval_result({k: v for k, v in plain.items()
                                                    if k != 'correct5'})
  assert not eval_lib.reports_top5(10) and eval_lib.reports_top5(11)


@pytest.fixture(scope='module')
def npz12(tmp_path_factory):
  """12 classes of noisy 8x8 patterns, hard enough that 1 epoch leaves top-1 < top-5."""
  rng = np.random.RandomState(0)
  means = rng.uniform(60, 200, (C, 8, 8, 1))

  def draw(n):
    labels = rng.randint(0, C, n)
    images = np.clip(means[labels] + rng.normal(0, 90, (n, 8, 8, 1)), 0, 255)
    return images.astype(np.uint8), labels.astype(np.int32)
  (images, labels), (test_images, test_labels) = draw(720), draw(240)
  path = str(tmp_path_factory.mktemp('npz12') / 'd.npz')
  np.savez(path, images=images, labels=labels, test_images=test_images,
           test_labels=test_labels)
  return path


def config12(path, seed=0):
  return quickstart_mlp(1, **{'data.source': 'npz', 'data.path': path, 'model.width': 32,
                              'data.val_fraction': 0.25, 'seed': seed})


def test_a_run_with_more_than_10_classes_reports_top5_accuracy(npz12, tmp_path):
  workdir = str(tmp_path / 'w')
  assert train_and_evaluate(config12(npz12), workdir, log=quiet)['status'] == 'done'
  rows = RunDir(workdir).read_metrics()
  keys = list(rows[0])
  assert keys[keys.index('train_eval_accuracy') + 1] == 'train_eval_top5_accuracy'
  assert keys[keys.index('val_accuracy') + 1] == 'val_top5_accuracy'
  for row in rows:
    assert row['val_accuracy'] <= row['val_top5_accuracy'] <= 1.0
    assert row['train_eval_accuracy'] <= row['train_eval_top5_accuracy'] <= 1.0
  assert rows[-1]['val_top5_accuracy'] > rows[-1]['val_accuracy']   # not top-1 again
  events = glob.glob(os.path.join(workdir, 'tb', '*tfevents*'))
  assert any(b'val_top5_accuracy' in open(f, 'rb').read() for f in events)
  best = evaluate.evaluate_checkpoint(workdir, 'best')   # launch.eval's result
  assert best['top5_accuracy'] == rows[-1]['val_top5_accuracy']
  test = evaluate.evaluate_checkpoint(workdir, 'best', split='test', tta='flip')
  assert test['num_examples'] == 240 and test['accuracy'] <= test['top5_accuracy'] <= 1.0


def test_vectorized_arms_report_the_top5_of_their_own_runs(npz12, tmp_path):
  dirs = [str(tmp_path / f'arm{s}') for s in (0, 1)]
  statuses = group_train.train_group([config12(npz12, seed=s) for s in (0, 1)], dirs,
                                     log=quiet, devices=jax.devices()[:1], mode='vmap')
  assert [s['status'] for s in statuses] == ['done', 'done']
  alone = str(tmp_path / 'alone')
  train_and_evaluate(config12(npz12, seed=1), alone, mesh=sharding.make_mesh(jax.devices()[:1]),
                     log=quiet)
  arm, own = RunDir(dirs[1]).read_metrics()[-1], RunDir(alone).read_metrics()[-1]
  for key in ('val_top5_accuracy', 'train_eval_top5_accuracy'):
    assert arm[key] == pytest.approx(own[key], abs=1e-6)


def test_a_streamed_run_reports_the_top5_of_the_resident_run(npz12, tmp_path):
  """The stream path's evaluation sums top-5 too (it summed loss, correct and count only:
  a streamed ImageNet run had no top-5)."""
  rows = {}
  for pipeline in ('resident', 'stream'):
    c = config12(npz12)
    c.data.pipeline = pipeline
    workdir = str(tmp_path / pipeline)
    assert train_and_evaluate(c, workdir, log=quiet)['status'] == 'done'
    rows[pipeline] = RunDir(workdir).read_metrics()[-1]
  for key in ('val_top5_accuracy', 'train_eval_top5_accuracy', 'val_accuracy'):
    assert rows['stream'][key] == pytest.approx(rows['resident'][key], abs=1e-6), key
