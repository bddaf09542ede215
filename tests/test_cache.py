"""The process cache's policy (lib/core/cache.py): one dataset, one evaluation engine that
goes with it, compiled programs shared by key and LRU-bounded, clear() frees."""
import gc
import weakref

import jax
import pytest

from lib.core import cache, sharding
from lib.core import config as config_lib
from lib.data import datasets as data
from lib.runs import evaluate, train
from lib.training import resolve as resolve_lib
from lib.training import vector_engine as ve
from conftest import quickstart_mlp


def quiet(*_):
  pass


@pytest.fixture
def fresh():
  """The process cache, emptied (and its compile count zeroed: earlier tests of this
  worker compiled through it) before and after the test."""
  c = cache.process_cache()
  c.clear()
  c.compiles = 0
  yield c
  c.clear()


def _digits(val_fraction: float):
  c = config_lib.base_config()
  c.data.source = 'digits'
  c.data.val_fraction = val_fraction
  return c.data


def test_a_second_dataset_replaces_the_first_and_frees_it(fresh):
  first = data.load(_digits(0.1))
  assert data.load(_digits(0.1)).train[0] is first.train[0]   # read once
  images = weakref.ref(first.train[0])
  del first
  second = data.load(_digits(0.2))
  gc.collect()
  assert images() is None
  assert data.load(_digits(0.2)).train[0] is second.train[0]


def test_two_engines_of_one_program_compile_it_once_and_hold_no_data(fresh):
  configs = [resolve_lib.resolve(quickstart_mlp(1, seed=s)) for s in range(4)]
  dataset = data.load(configs[0].data)
  ve.VectorEngine(configs[:2], dataset, jax.devices()[:1])._step(False)
  assert fresh.compiles == 1
  ve.VectorEngine(configs[2:], dataset, jax.devices()[:1])._step(False)   # other seeds
  assert fresh.compiles == 1
  ve.VectorEngine(configs[:3], dataset, jax.devices()[:1])._step(False)   # another size
  assert fresh.compiles == 2
  # The programs take the data as arguments: a dataset's arrays outlive no engine.
  gc.collect()
  before = sum(a.nbytes for a in jax.live_arrays())
  data.load(_digits(0.2))
  del dataset
  gc.collect()
  assert len(fresh.program_keys()) == 2
  assert sum(a.nbytes for a in jax.live_arrays()) <= before


def test_the_least_recently_used_program_is_evicted():
  c = cache.Cache(max_programs=2)
  c.program('a', lambda: 'A')
  c.program('b', lambda: 'B')
  assert c.program('a', lambda: 'A again') == 'A'   # used: now the most recent
  c.program('c', lambda: 'C')
  assert c.program_keys() == ['a', 'c'] and c.compiles == 3


def _kept_engine(c: cache.Cache):
  return c._engine[1] if c._engine else None


def test_a_new_dataset_and_clear_free_the_evaluation_engine(tmp_path, fresh):
  mesh = sharding.make_mesh(jax.devices()[:1])
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(quickstart_mlp(1), workdir, mesh=mesh, log=quiet)
  gc.collect()
  base = sum(a.nbytes for a in jax.live_arrays())
  evaluate.evaluate_checkpoint(workdir, 'best', 'val', mesh=mesh)
  eng = weakref.ref(_kept_engine(fresh))
  evaluate.evaluate_checkpoint(workdir, 'latest', 'val', mesh=mesh)
  assert _kept_engine(fresh) is eng()   # reused
  assert sum(a.nbytes for a in jax.live_arrays()) > base
  data.load(_digits(0.2))   # another dataset: the engine holding the old one goes
  gc.collect()
  assert eng() is None
  evaluate.evaluate_checkpoint(workdir, 'best', 'val', mesh=mesh)
  eng = weakref.ref(_kept_engine(fresh))
  fresh.clear()
  gc.collect()
  assert eng() is None
  assert sum(a.nbytes for a in jax.live_arrays()) <= base
