"""4 CPU devices for every test, and a persistent compilation cache, set before JAX is imported.

The tests' programs are tiny, so compiling them is most of their time: they are compiled with
LLVM's optimizations off (`--xla_backend_optimization_level=0`, about a quarter less compile
time for the larger models, and no slower to run at these sizes). Launches started by tests
inherit it; nothing outside the tests is compiled this way. A flag already in XLA_FLAGS wins.

The cache (default .cache/jax-tests in the repo, override with JAX_COMPILATION_CACHE_DIR) is
shared by every test and by the launches tests start as subprocesses (they inherit the
environment), so a program compiled once is loaded, not recompiled, by later tests and runs.
"""
import os
import sys

_FLAGS = os.environ.get('XLA_FLAGS', '')
if '--xla_backend_optimization_level' not in _FLAGS:
  _FLAGS += ' --xla_backend_optimization_level=0'
os.environ['XLA_FLAGS'] = (_FLAGS + ' --xla_force_host_platform_device_count=4').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(ROOT, '.cache', 'jax-tests'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')   # CPU programs too
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')

import jax  # noqa: E402  (after the flags above)
# The backend starts now, with its 4 devices: tests that change XLA_FLAGS for the launches
# they start (test_faults.py's one_device) must not decide this process's device count by
# happening to run first (as they did when a subset of modules was run).
jax.devices()
import pytest  # noqa: E402

SHARED_CIFAR = os.path.join(ROOT, '..', 'shared', 'data', 'cifar-10-batches-py')


def pytest_configure(config):
  config.addinivalue_line('markers', 'multiprocess: starts launches of 2 JAX processes on this '
                          'machine (tests/test_multiprocess.py); -m "not multiprocess" skips them')


# Modules that take longest, longest first (measured with --durations on the 2-core CPU). With
# `--dist loadscope` each module goes whole to one worker in collection order: started first,
# they do not end the run on one worker while the other idles.
LONGEST_FIRST = ('test_factors.py', 'test_faults.py', 'test_multiprocess.py', 'test_vectorize.py',
                 'test_fast_cifar.py', 'test_repack.py',
                 'test_stream.py', 'test_regularize.py', 'test_sweep.py', 'test_adaptive.py',
                 'test_bagging.py',
                 'test_fmp.py', 'test_diagnose.py',
                 'test_lifecycle.py', 'test_models.py', 'test_train.py')


def pytest_collection_modifyitems(session, config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.fspath)), len(rank)))


@pytest.fixture(scope='session')
def devices():
  d = jax.devices()
  assert len(d) == 4, 'tests expect 4 CPU devices (see conftest.py)'
  return d


def quickstart_mlp(epochs: int, **overrides):
  """The quickstart MLP on digits, 64 wide, for `epochs` epochs (flattened overrides:
  {'regularize.dropout': 0.2, 'seed': 1}). Import it with `from conftest import ...`."""
  from experiments import quickstart
  c = quickstart.get_config()
  c.model.width = 64
  c.train.epochs = epochs
  c.train.log_every = 1000
  c.update_from_flattened_dict(overrides)
  return c


def bad_records_dir(tmp_path, bad_at=(7,)):
  """A `records` dataset of 24 12x12 PNGs in 2 classes, those at `bad_at` replaced by
  records whose bytes are not an image."""
  import numpy as np
  from lib.data import records
  rng = np.random.default_rng(0)
  examples = []
  for i in range(24):
    if i in bad_at:
      examples.append((b'\x00not an image', i % 2))
    else:
      image = (np.full((12, 12, 3), 40 + 150 * (i % 2), np.uint8)
               + rng.integers(0, 20, (12, 12, 3), dtype=np.uint8))
      examples.append((records.encode_image(image, 'PNG'), i % 2))
  d = tmp_path / 'bad'
  d.mkdir(exist_ok=True)
  records.write_records(str(d / 'train.array_record'), examples)
  records.write_meta(str(d), 2)
  return str(d)


# The metrics of a run that do not depend on the clock.
DETERMINISTIC = ('step', 'epoch', 'running_train_loss', 'running_train_accuracy', 'train_eval_loss',
                 'train_eval_accuracy', 'val_loss', 'val_accuracy', 'lr')


def assert_same_metrics(a_dir, b_dir, atol=1e-5):
  """Two runs logged the same evaluations with the same DETERMINISTIC metrics (within atol)."""
  from lib.runs.rundir import RunDir
  a, b = RunDir(a_dir).read_metrics(), RunDir(b_dir).read_metrics()
  assert a and [r['step'] for r in a] == [r['step'] for r in b]
  for ra, rb in zip(a, b):
    for key in DETERMINISTIC:
      assert ra[key] == pytest.approx(rb[key], abs=atol), (key, ra['step'])
