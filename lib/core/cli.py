"""Shared entry-point plumbing: bad input becomes one line on stderr, exit 1.

A process of a multi-process job that fails ends at once (`os._exit`, after the
callbacks given to `at_abort`): a normal exit would wait in JAX's distributed
shutdown (up to 300 s) for the other processes, which wait in their next collective
for this one, so a failure of one process (a full disk on process 0) hung the job."""
import os
import sys
import traceback
from typing import Callable, List

from absl import app, flags, logging

from lib.core import compile_cache, sharding
from lib.core.errors import UserError, WRITE_ERRNOS, failure_reason

_ABORT: List[Callable[[], None]] = []
_CACHE = flags.DEFINE_string(
    'compilation_cache', None, 'Persistent compilation cache directory (lib/core/compile_cache.py; '
    'default $JAX_COMPILATION_CACHE_DIR, else ~/.cache/jax-ablations/xla); none: no cache.')


def at_abort(fn: Callable[[], None]) -> None:
  """`fn` runs before a failed process of a multi-process job ends (atexit does not)."""
  _ABORT.append(fn)


def _exit(code: int, line: str = '') -> None:
  """Ends the process with `code`, `line` on stderr (and a traceback of the exception
  being handled where `code` is 1 and no line is given: a bug, not bad input)."""
  if not sharding.joined():
    sys.exit(line or code)
  if line:
    print(line, file=sys.stderr)
  elif code == 1:
    traceback.print_exc()
  for fn in _ABORT:
    try:
      fn()
    except Exception:   # noqa: BLE001 - ending anyway
      pass
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def _one_line(e: Exception) -> str:
  text = str(e)
  if 'Traceback (most recent call last)' in text:   # an exception inside get_config(arg)
    lines = [l for l in text.splitlines() if l.strip()]
    text = f'{lines[0].split(" Error whilst")[0]} {lines[-1].strip()}'
  text = text.replace('\\n', ' ').replace('\n', ' ').replace('\\', '').replace("'", '')
  return ' '.join(text.strip('" ').split())


def config(holder):
  """The --config value; a file that failed to load is one clear line."""
  try:
    value = holder.value
    value.keys()   # a config that failed to load raises on first use
    return value
  except OSError as e:
    first = next((l.strip() for l in str(e).splitlines() if 'No such file' in l or 'Error' in l),
                 str(e).splitlines()[0])
    raise UserError(f'cannot load --config: {first}') from None


def _parse(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f'error: {_one_line(e)}')
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    # ml_collections raises these for an unknown or mistyped --config.key, and
    # an experiment's get_config(arg) for an unknown variant.
    overrides = [a for a in argv[1:] if a.startswith('--config.')]
    where = f'override in {" ".join(overrides)}' if overrides else '--config'
    sys.exit(f'error: bad config {where}: {_one_line(e)}')


def run(main, report_compiles: bool = False) -> None:
  """Runs `main` as an absl app with the policies above, the persistent compilation
  cache on (lib/core/compile_cache.py) and, with `report_compiles`, a last line on what
  compiling cost (launchers whose last line is JSON leave it off)."""
  def guarded(argv):
    if not flags.FLAGS['verbosity'].present:
      logging.set_verbosity(logging.ERROR)   # Orbax/absl INFO lines drown the progress
    try:
      compile_cache.enable(_CACHE.value, log=lambda m: print(m, file=sys.stderr))
      stats = compile_cache.stats()
      result = main(argv)
      if report_compiles and stats.programs and sharding.is_primary():
        print(stats.line(), flush=True)
      return result
    except UserError as e:
      _exit(1, f'error: {e}')
    except OSError as e:   # a full disk, a read-only or forbidden directory: one line
      if e.errno not in WRITE_ERRNOS:
        if sharding.joined():
          _exit(1)
        raise
      _exit(1, f'error: {failure_reason(e)}')
    except KeyboardInterrupt:
      if sharding.joined():
        _exit(130, 'error: interrupted')
      raise
    except Exception:   # noqa: BLE001 - a bug: its traceback, then end without waiting
      if sharding.joined():
        _exit(1)
      raise
  app.run(guarded, flags_parser=_parse)
