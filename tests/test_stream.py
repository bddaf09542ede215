"""The streaming input pipeline (lib/data/stream.py, device.StreamSplits): the same run as
the resident path, exact resume, variable-size JPEG records, bad records, the choice of
pipeline, and the ImageNet module's local variant end to end."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, bad_records_dir, quickstart_mlp

from lib.core.errors import UserError
from lib.data import datasets as data
from lib.data import records, stream, synthetic, transforms
from lib.data.order import epoch_permutation
from lib.runs.train import Preempted, train_and_evaluate

quiet = lambda message: None
SAME = ('step', 'running_train_loss', 'running_train_accuracy', 'train_eval_loss',
        'train_eval_accuracy', 'val_loss', 'val_accuracy', 'lr')


def rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [{k: r[k] for k in SAME} for r in map(json.loads, f)]


def jpeg_mlp(epochs=2, **overrides):
  """An MLP on the generated variable-size JPEGs, brought to 24 px on the host by 2
  worker processes: the whole record path, cheaply."""
  c = quickstart_mlp(epochs, **{'data.source': 'synthetic_jpeg', 'data.image_size': 24,
                                'data.workers': 2, 'augment.resized_crop_scale': 0.25,
                                'augment.flip': True, 'train.batch_size': 64,
                                'optim.lr': 0.05, **overrides})
  return c


# A device-side augmentation of every stage, dropout and a train-eval split: every random
# draw of the step, which must not depend on where the batch came from.
DEVICE_FACTORS = {'augment.crop_padding': 2, 'augment.flip': True, 'augment.cutout_size': 3,
                  'augment.mixup_alpha': 0.2, 'regularize.dropout': 0.1, 'train.eval_every': 15}


def test_stream_run_equals_resident_run(tmp_path):
  """Fixed-size images: the same batches in the same order, the same augmentation draws,
  so the same metrics at every evaluation, bit for bit."""
  out = {}
  for pipeline in ('resident', 'stream'):
    c = quickstart_mlp(2, **{'data.pipeline': pipeline, **DEVICE_FACTORS})
    lines = []
    status = train_and_evaluate(c, str(tmp_path / pipeline), log=lines.append)
    assert status['status'] == 'done'
    assert f'input pipeline: {pipeline} (data.pipeline={pipeline})' in lines
    out[pipeline] = rows(str(tmp_path / pipeline))
  assert len(out['stream']) == 6
  assert out['stream'] == out['resident']


def test_auto_picks_resident_for_data_in_memory_and_says_why(tmp_path):
  lines = []
  train_and_evaluate(quickstart_mlp(1), str(tmp_path / 'a'), log=lines.append)
  chosen = [line for line in lines if line.startswith('input pipeline:')]
  assert chosen and chosen[0].startswith('input pipeline: resident (auto: the splits take')


def test_auto_streams_when_the_data_does_not_fit():
  dataset = data.load(quickstart_mlp(1).data)
  need = sum(stream.split_bytes(dataset, s) for s in dataset.split_names())
  assert stream.choose('auto', dataset, budget_bytes=need * 4)[0] == 'resident'
  kind, why = stream.choose('auto', dataset, budget_bytes=need)   # more than half
  assert kind == 'stream' and 'more than 50%' in why


@pytest.fixture(scope='module')
def jpeg_reference(tmp_path_factory):
  """An uninterrupted 2-epoch run on the generated JPEGs (stream path, 2 workers)."""
  workdir = str(tmp_path_factory.mktemp('jpeg') / 'ref')
  lines = []
  status = train_and_evaluate(jpeg_mlp(), workdir, log=lines.append)
  return workdir, status, lines


def test_variable_size_jpegs_train_through_worker_processes(jpeg_reference):
  workdir, status, lines = jpeg_reference
  assert status['status'] == 'done'
  assert 'input pipeline: stream (data.source=synthetic_jpeg is read as records)' in lines
  # Learnable (chance 0.1): the records were decoded, resized and labelled correctly.
  assert status['best_val_accuracy'] > 0.3
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['data']['image_size'] == 24


def test_killed_stream_run_resumes_to_the_uninterrupted_metrics(jpeg_reference, tmp_path):
  """The pipeline's position is the step: a resumed run rebuilds it there, reads the
  same batches and draws the same host augmentations."""
  ref_dir = jpeg_reference[0]
  workdir = str(tmp_path / 'w')
  c = jpeg_mlp(**{'train.checkpoint_every_s': 0})
  with pytest.raises(Preempted):
    train_and_evaluate(c, workdir, stop_after_step=9, log=quiet)
  assert len(rows(workdir)) == 1   # stopped after the first epoch's evaluation
  status = train_and_evaluate(c, workdir, log=quiet)
  assert status['status'] == 'done'
  assert rows(workdir) == rows(ref_dir)


def test_host_batches_do_not_depend_on_workers_or_processes():
  """Each example's augmentation comes from (seed, epoch, index); each process reads
  its own rows of the batch: the rows of 2 processes make up the batch of 1."""
  source = records.RecordFileSource(
      os.path.join(synthetic.synthetic_jpeg_dir(), 'train.array_record'))
  view = stream.SplitView(source, np.arange(200), 'train')
  t = stream.HostTransform(16, (16, 16, 3), train=True, scale_lo=0.2, flip=True)
  whole = stream.BatchReader(view, t, 3, 8, 25, (0, 8))
  halves = [stream.BatchReader(view, t, 3, 8, 25, r) for r in ((0, 4), (4, 8))]
  for step in (0, 26):
    batch = whole(step)
    parts = [h(step) for h in halves]
    np.testing.assert_array_equal(batch['images'], np.concatenate([p['images'] for p in parts]))
    ids = epoch_permutation(3, step // 25, 200, 25, 8)[step % 25]
    assert batch['labels'].tolist() == [source[int(i)][1] for i in ids]
  read = list(stream.batches(whole, 0, 4, workers=2))   # in worker processes
  for step, item in enumerate(read):
    np.testing.assert_array_equal(item['images'], whole(step)['images'])
  # Evaluation batches (a large split's are read by workers): the same in a worker.
  evaluate = stream.EvalReader(view, stream.HostTransform(16, (16, 16, 3)), 64, (0, 64))
  read = list(stream.batches(evaluate, 0, 4, workers=2))
  assert len(read) == 4 and read[3]['mask'].sum() == 200 - 3 * 64
  for i, item in enumerate(read):
    np.testing.assert_array_equal(item['images'], evaluate(i)['images'])
    np.testing.assert_array_equal(item['labels'], evaluate(i)['labels'])


def test_bad_record_is_skipped_with_a_warning_and_a_limit_fails_the_run(tmp_path):
  path = bad_records_dir(tmp_path)
  base = {'data.source': 'records', 'data.path': path, 'data.val_fraction': 0.25,
          'data.workers': 0, 'train.batch_size': 8}
  lines = []
  status = train_and_evaluate(quickstart_mlp(2, **base), str(tmp_path / 'ok'), log=lines.append)
  assert status['status'] == 'done'
  warnings = [w for w in lines if w.startswith('warning: skipped a bad record')]
  assert len(warnings) == 1 and 'record 7' in warnings[0]    # counted once, named
  with pytest.raises(UserError, match=r'more than data.max_bad_records=0; first: .*record 7'):
    train_and_evaluate(quickstart_mlp(2, **base, **{'data.max_bad_records': 0}),
                       str(tmp_path / 'strict'), log=quiet)


def test_records_source_errors_are_one_line(tmp_path):
  c = quickstart_mlp(1, **{'data.source': 'records', 'data.path': str(tmp_path / 'missing')})
  with pytest.raises(UserError, match='data.path=.*missing'):
    train_and_evaluate(c, str(tmp_path / 'w'), log=quiet)
  c = quickstart_mlp(1, **{'data.source': 'synthetic_jpeg', 'data.pipeline': 'resident'})
  with pytest.raises(UserError, match='data.image_size'):
    train_and_evaluate(c, str(tmp_path / 'w2'), log=quiet)   # several sizes, no resize
  c = quickstart_mlp(1, **{'data.source': 'synthetic_jpeg', 'data.pipeline': 'resident',
                           'data.image_size': 16})
  with pytest.raises(UserError, match='only the stream pipeline'):
    train_and_evaluate(c, str(tmp_path / 'w3'), log=quiet)
  assert not os.path.exists(str(tmp_path / 'w3' / 'metrics.jsonl'))


def test_imagenet_module_local_variant_runs_end_to_end(tmp_path):
  """experiments/imagenet_resnet.py:local through launch.train: ResNet-18 (narrow), the
  ImageNet stem and recipe on generated variable-size JPEGs, decoded by 2 workers."""
  workdir = str(tmp_path / 'in')
  out = subprocess.run([sys.executable, '-m', 'launch.train',
                        '--config=experiments/imagenet_resnet.py:local', f'--workdir={workdir}',
                        '--config.train.epochs=1'],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'input pipeline: stream' in out.stdout + out.stderr
  with open(os.path.join(workdir, 'status.json')) as f:
    assert json.load(f)['status'] == 'done'


def test_vectorized_sweep_group_on_the_stream_path_trains_its_runs_one_by_one(tmp_path):
  """Arms of one program gather from one resident split: a streamed group says so and
  trains each run alone, with the metrics of its own run."""
  from lib.runs.group_train import train_group
  configs = [quickstart_mlp(1, **{'data.pipeline': 'stream', 'seed': s}) for s in (0, 1)]
  lines = []
  dirs = [str(tmp_path / f'arm{s}') for s in (0, 1)]
  out = train_group(configs, dirs, log=lines.append)
  assert [o['status'] for o in out] == ['done', 'done']
  assert any('training the 2 runs one after another' in line for line in lines)
  train_and_evaluate(configs[1], str(tmp_path / 'alone'), log=quiet)
  assert rows(dirs[1]) == rows(str(tmp_path / 'alone'))


def test_host_transform_follows_the_factors():
  """Random-resized crop only when augment.resized_crop_scale is on (else the eval
  resize), a flip only when augment.flip is; evaluation is deterministic."""
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
  fixed = lambda: np.random.default_rng(1)
  evaluate = stream.HostTransform(16, (16, 16, 3))
  plain = stream.HostTransform(16, (16, 16, 3), train=True)
  flipping = stream.HostTransform(16, (16, 16, 3), train=True, flip=True)
  cropping = stream.HostTransform(16, (16, 16, 3), train=True, scale_lo=0.1)
  reference = transforms.eval_transform(image, 16)
  np.testing.assert_array_equal(evaluate(image, None, 'x'), reference)
  np.testing.assert_array_equal(plain(image, fixed, 'x'), reference)
  flips = [np.array_equal(flipping(image, lambda: np.random.default_rng(s), 'x'), reference[:, ::-1])
           for s in range(40)]
  assert 5 < sum(flips) < 35
  crops = [cropping(image, lambda: np.random.default_rng(s), 'x') for s in range(5)]
  assert all(c.shape == (16, 16, 3) for c in crops)
  assert not any(np.array_equal(c, reference) for c in crops)


def test_stream_checkpoint_evaluates_to_its_logged_accuracy(jpeg_reference):
  """launch.eval's evaluate_checkpoint streams the records too: the best checkpoint
  reproduces the logged best val accuracy, and the test split evaluates."""
  from lib.runs import evaluate
  workdir, status, _ = jpeg_reference
  val = evaluate.evaluate_checkpoint(workdir, 'best', 'val')
  assert val['accuracy'] == pytest.approx(status['best_val_accuracy'], abs=1e-6)
  test = evaluate.evaluate_checkpoint(workdir, 'best', 'test')
  assert test['num_examples'] == 160 and test['accuracy'] > 0.2


def test_diagnose_on_streamed_data_says_it_needs_images_in_memory(tmp_path):
  from lib.diagnostics import recipe
  c = jpeg_mlp()
  with pytest.raises(UserError, match='launch.diagnose needs the images in memory'):
    recipe.run(['initial_loss'], str(tmp_path / 'd'), c)
  assert not os.path.exists(str(tmp_path / 'd'))
