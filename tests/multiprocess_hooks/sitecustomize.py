"""Test hooks in the processes of a `--processes=N` launch (tests/test_multiprocess.py puts
this folder on PYTHONPATH). Inert unless this is a child of the launcher (ABLATE_PROCESS_ID
set) and a variable below asks for it:

  MP_TEST_AUDIT=DIR     every write this process makes through Python (a file opened for
                        writing, a rename, a directory made, a file removed) is listed in
                        DIR/p<process id>.txt, one a line: who wrote what
  MP_TEST_DELAY=SUFFIX|N|PATH|SECONDS
                        process 1, at its N-th opening of a file whose path ends with
                        SUFFIX, waits until PATH exists (at most SECONDS): a process that
                        lags behind process 0 at that point, deterministically

Writes by C++ (tensorstore's checkpoint shards) are not seen; the run files are Python's.
"""
import os
import sys
import time

_ID = os.environ.get('ABLATE_PROCESS_ID')
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_EVENTS = ('os.rename', 'os.mkdir', 'os.remove', 'os.rmdir', 'os.link', 'os.symlink',
           'os.truncate', 'shutil.rmtree')


def _audit(directory):
  log = open(os.path.join(directory, f'p{_ID}.txt'), 'a', buffering=1)

  def hook(event, args):
    if event == 'open':
      path, mode, flags = args
      if isinstance(path, (str, bytes)) and (
          (mode and any(c in mode for c in 'wax+')) or (flags or 0) & _WRITE_FLAGS):
        log.write(f'open {os.fsdecode(path)}\n')
    elif event in _EVENTS:
      log.write(f'{event} {os.fsdecode(args[0]) if isinstance(args[0], (str, bytes)) else ""}\n')
  sys.addaudithook(hook)


def _delay(spec):
  suffix, n, until, seconds = spec.split('|')
  seen = [0]

  def hook(event, args):
    if event == 'open' and isinstance(args[0], str) and args[0].endswith(suffix):
      seen[0] += 1
      if seen[0] == int(n):
        deadline = time.time() + float(seconds)
        while not os.path.exists(until) and time.time() < deadline:
          time.sleep(0.02)
  sys.addaudithook(hook)


if _ID is not None:
  if os.environ.get('MP_TEST_AUDIT'):
    _audit(os.environ['MP_TEST_AUDIT'])
  if os.environ.get('MP_TEST_DELAY') and _ID == '1':
    _delay(os.environ['MP_TEST_DELAY'])
