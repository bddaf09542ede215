"""The persistent compilation cache every launcher uses, and what compiling cost.

A program XLA compiled once is written to a directory and loaded, not compiled
again, by every later process that builds the same program: the next run of a
sweep, a resumed run, another sweep worker, `launch.eval` after training, a test.
The directory is, first found:

  --compilation_cache=DIR          a launcher's flag (`none`: no cache)
  $JAX_COMPILATION_CACHE_DIR       JAX's own variable
  $XDG_CACHE_HOME/jax-ablations/xla, else ~/.cache/jax-ablations/xla

Every program is cached, also the ones that compile fast (JAX's default skips
programs under 1 s, which is most CPU programs). The choice is put into the
environment too, so the processes a launcher starts (sweep workers, the N processes
of `--processes=N`, SLURM tasks, which inherit the environment) use the same cache.
The cache is keyed by the program, the devices, the XLA flags and the jax/jaxlib
version; a stale entry is never used, and the directory may be deleted at any time.
A directory that cannot be written is one warning line, then no cache.

`Stats` counts what compiling cost in this process (XLA compile seconds, programs
loaded from the cache and compiled), through jax.monitoring's events; the launchers
print it when they end.
"""
import os
import threading
from typing import Optional

import jax

ENV = 'JAX_COMPILATION_CACHE_DIR'
OFF = 'none'
_ENV_SETTINGS = {'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',   # CPU programs too
                 'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '-1'}
_BACKEND_COMPILE = '/jax/core/compile/backend_compile_duration'
_TRACE = '/jax/core/compile/jaxpr_trace_duration'
_HIT = '/jax/compilation_cache/cache_hits'
_MISS = '/jax/compilation_cache/cache_misses'


def default_dir() -> str:
  """$JAX_COMPILATION_CACHE_DIR, else the user's cache directory."""
  if os.environ.get(ENV):
    return os.environ[ENV]
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'jax-ablations', 'xla')


def enable(path: Optional[str] = None, log=print) -> Optional[str]:
  """Turns the cache on at `path` (None: `default_dir()`; 'none': off) for this
  process and the ones it starts. Returns the directory used, or None."""
  path = default_dir() if path is None else path
  if path.lower() == OFF:
    jax.config.update('jax_compilation_cache_dir', None)
    os.environ[ENV] = ''
    return None
  path = os.path.abspath(os.path.expanduser(path))
  # Checked without writing a file: the other processes of a multi-process job write
  # nothing (JAX writes entries from process 0 only; tests/test_multiprocess.py audits it).
  try:
    os.makedirs(path, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
      raise PermissionError(13, 'Permission denied')
  except OSError as e:
    log(f'warning: compilation cache {path} cannot be written ({e.strerror}); compiling '
        f'without it (set --compilation_cache=DIR or none)')
    jax.config.update('jax_compilation_cache_dir', None)
    return None
  for name, value in _ENV_SETTINGS.items():
    os.environ.setdefault(name, value)
  jax.config.update('jax_persistent_cache_min_compile_time_secs',
                    float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))
  jax.config.update('jax_persistent_cache_min_entry_size_bytes',
                    int(os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES']))
  jax.config.update('jax_compilation_cache_dir', path)
  os.environ[ENV] = path
  return path


class Stats:
  """XLA compile time, cache hits and misses in this process since `reset()`: from
  JAX's monitoring events (every program, whichever code compiles it)."""

  def __init__(self):
    self._lock = threading.Lock()
    self.reset()

  def reset(self) -> None:
    with self._lock:
      self.compile_s = self.trace_s = 0.0
      self.programs = self.hits = self.misses = 0

  def _duration(self, event: str, seconds: float, **kwargs) -> None:
    with self._lock:
      if event == _BACKEND_COMPILE:   # a compile, or a load from the persistent cache
        self.compile_s += seconds
        self.programs += 1
      elif event == _TRACE:
        self.trace_s += seconds

  def _event(self, event: str, **kwargs) -> None:
    with self._lock:
      if event == _HIT:
        self.hits += 1
      elif event == _MISS:
        self.misses += 1

  def line(self) -> str:
    """'XLA: 14 programs in 3.2 s (12 loaded from the cache, 2 compiled); tracing 1.1 s'."""
    cached = (f' ({self.hits} loaded from the cache, {self.programs - self.hits} compiled)'
              if self.hits or self.misses else ' (no persistent cache)')
    return (f'XLA: {self.programs} programs in {self.compile_s:.1f} s{cached}; tracing '
            f'{self.trace_s:.1f} s')


_STATS: Optional[Stats] = None


def stats() -> Stats:
  """This process's Stats, listening from the first call on."""
  global _STATS
  if _STATS is None:
    _STATS = Stats()
    jax.monitoring.register_event_duration_secs_listener(_STATS._duration)
    jax.monitoring.register_event_listener(_STATS._event)
  return _STATS
