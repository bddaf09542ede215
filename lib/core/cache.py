"""What one process keeps between runs, and for how long: one object, one policy.

A process trains one dataset at a time, often many runs of it (a sweep run in
this process, a vectorized group, the test evaluation after each run). Reading
the data, compiling a program and building an evaluation engine are the slow
parts those runs can share; everything else belongs to the run that made it.
The process's `Cache` (`process_cache()`) keeps:

  dataset   the most recent one (host arrays), keyed by its data config and the
            modification time of its path. Loading another replaces it, and the
            old one is dropped *before* the new one is read, so two never share
            the host's memory.
  engine    the most recent evaluation engine (lib/runs/evaluate.py), keyed by what
            its program depends on. It holds the dataset's splits on device, so
            it goes when the dataset is replaced, and when another engine is built.
  programs  compiled programs (lib/training/vector_engine.py), keyed by everything they
            depend on (config, arms, mode, mesh, data shapes and statistics), the
            `max_programs` most recently used (LRU). They take the data as
            arguments and hold none of its device arrays (tests/test_cache.py),
            so they outlive a dataset: another one of the same shapes and
            statistics reuses them.

Nothing else is kept, and nothing expires by time: an entry lives until it is
replaced or evicted as above, or until `clear()`, which drops every reference
(the device buffers are then freed, once the caller's own references are gone).
"""
import collections
from typing import Any, Callable, Hashable, List, Optional, Tuple

MAX_PROGRAMS = 8


class Cache:
  """The datasets, evaluation engine and compiled programs a process reuses (see
  the module docstring for the policy). `compiles` counts the programs compiled
  through it, so tests and benchmarks can tell a reuse from a compile."""

  def __init__(self, max_programs: int = MAX_PROGRAMS):
    self.max_programs = max_programs
    self._dataset: Optional[Tuple[Hashable, Any]] = None
    self._engine: Optional[Tuple[Hashable, Any]] = None
    self._programs: 'collections.OrderedDict[Hashable, Any]' = collections.OrderedDict()
    self.compiles = 0

  def dataset(self, key: Hashable, load: Callable[[], Any]):
    """The dataset of `key`, loaded by `load()` unless it is the one kept. A new
    one replaces the old, and the engine built on the old one goes with it."""
    if self._dataset is None or self._dataset[0] != key:
      self._dataset = self._engine = None   # freed before the new one is read
      self._dataset = (key, load())
    return self._dataset[1]

  def engine(self, key: Hashable, build: Callable[[], Any]):
    """The evaluation engine of `key`, built by `build()` unless it is the one kept."""
    if self._engine is None or self._engine[0] != key:
      self._engine = None
      self._engine = (key, build())
    return self._engine[1]

  def program(self, key: Hashable, compile_fn: Callable[[], Any]):
    """The compiled program of `key`, compiled by `compile_fn()` unless kept; the
    least recently used one is evicted beyond `max_programs`."""
    if key in self._programs:
      self._programs.move_to_end(key)
    else:
      self._programs[key] = compile_fn()
      self.compiles += 1
      while len(self._programs) > self.max_programs:
        self._programs.popitem(last=False)
    return self._programs[key]

  def program_keys(self) -> List[Hashable]:
    """The keys of the kept programs, least recently used first."""
    return list(self._programs)

  def clear(self) -> None:
    """Drops every entry, so their host and device memory can be freed."""
    self._dataset = self._engine = None
    self._programs.clear()


_PROCESS_CACHE = Cache()


def process_cache() -> Cache:
  """This process's cache (one per process: a spawned worker or a SLURM task has its own)."""
  return _PROCESS_CACHE
