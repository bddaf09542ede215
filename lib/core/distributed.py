"""Several processes of one job on this machine: `--processes=N` starts N copies of
the same command over localhost, joined by jax.distributed, and watches them.

Why a launcher of our own: JAX's multi-process path (each process feeding its
slice of every global array, process 0 alone writing the run's files, choices
broadcast from process 0) is the path of every multi-host run, and it can be
exercised, and tested, on one machine only by really starting several processes.

The parent (`spawn`) picks a free port on 127.0.0.1, starts N children running the
same command line with ENV_* below set (process ids 0..N-1) and each its share of
the devices: on CPU `JAX_NUM_CPU_DEVICES` (any `--xla_force_host_platform_device_count`
of the parent's XLA_FLAGS is removed, so that it does not count instead), on GPUs
its own CUDA_VISIBLE_DEVICES. It prints process 0's output as it comes (its stderr
HOLD_S late, see `_Watch`); the others' is kept (their last lines) and shown only if
that process fails. The child joins in lib/core/sharding.py:initialize_distributed
(gloo collectives on CPU).

Faults. When a child dies or fails, the parent stops the others (SIGKILL) at once
(after GRACE_S for a failure with an exit status, which every process may meet
alike) and exits with the first failing child's status (128 + N for signal N),
saying in one line which process ended and how; the run resumes when the same
command is rerun. A child whose launcher died exits within a second
(`watch_launcher`). Processes started by another launcher (SLURM, MPI) have no such
parent: there JAX's own heartbeat ends them, `heartbeat_timeout_s()` seconds
(ABLATE_HEARTBEAT_TIMEOUT_S, default HEARTBEAT_TIMEOUT_S) after a process stopped
beating.
"""
import collections
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

from lib.core.errors import UserError

ENV_COORDINATOR = 'ABLATE_COORDINATOR'      # host:port of process 0's coordination service
ENV_NUM_PROCESSES = 'ABLATE_NUM_PROCESSES'
ENV_PROCESS_ID = 'ABLATE_PROCESS_ID'
ENV_LAUNCHER = 'ABLATE_LAUNCHER_PID'        # the parent: a child exits when it is gone
ENV_HEARTBEAT = 'ABLATE_HEARTBEAT_TIMEOUT_S'
HEARTBEAT_TIMEOUT_S = 60   # JAX's default is 100
GRACE_S = 3.0              # a child that failed with an exit status: the others may end alike
TAIL_LINES = 40            # of a process other than 0, shown if it fails
HOLD_S = 0.5               # process 0's stderr is shown this late (see _Watch)
# gloo's notice of its connected peers, written by C++ to the same stdout as Python's
# lines, so that it may land in the middle of one of them.
_NOISE = re.compile(r'\[Gloo\] Rank |\d+ is connected to \d+ peer ranks\. Expected number of '
                    r'connected peer ranks is : \d+')
_DEVICE_FLAG = re.compile(r'--xla_force_host_platform_device_count=\S*')


def spawned() -> Optional[Tuple[str, int, int]]:
  """(coordinator, num_processes, process_id) of a child of `spawn`, else None."""
  if ENV_PROCESS_ID not in os.environ:
    return None
  return (os.environ[ENV_COORDINATOR], int(os.environ[ENV_NUM_PROCESSES]),
          int(os.environ[ENV_PROCESS_ID]))


def heartbeat_timeout_s() -> int:
  """Seconds without a heartbeat after which JAX declares a process dead and ends
  the others (the only bound on a hang when no launcher of ours watches them)."""
  return int(os.environ.get(ENV_HEARTBEAT, HEARTBEAT_TIMEOUT_S))


def watch_launcher() -> None:
  """In a child of `spawn`: exit when the launcher is gone (killed itself), so that no
  process is left waiting in a collective for peers that will never come."""
  parent = os.environ.get(ENV_LAUNCHER)
  if not parent:
    return

  def watch():
    while True:
      time.sleep(0.5)
      if os.getppid() != int(parent):
        os._exit(1)
  threading.Thread(target=watch, name='launcher-watch', daemon=True).start()


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def cpu_devices(env: Dict[str, str]) -> int:
  """The CPU devices a process started with `env` would have (JAX's default: 1)."""
  if env.get('JAX_NUM_CPU_DEVICES'):
    return int(env['JAX_NUM_CPU_DEVICES'])
  found = _DEVICE_FLAG.findall(env.get('XLA_FLAGS', ''))
  return int(found[-1].split('=')[1]) if found else 1


def visible_gpus(env: Dict[str, str]) -> List[str]:
  """The GPU ids a process started with `env` would see ([] on a machine without)."""
  platforms = [p.strip() for p in env.get('JAX_PLATFORMS', '').split(',') if p.strip()]
  if platforms and not set(platforms) & {'cuda', 'gpu', 'rocm'}:
    return []
  if env.get('CUDA_VISIBLE_DEVICES') is not None:
    return [g for g in env['CUDA_VISIBLE_DEVICES'].split(',') if g.strip()]
  try:
    out = subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True, timeout=20)
  except (OSError, subprocess.SubprocessError):
    return []
  return [str(i) for i, l in enumerate(out.stdout.splitlines()) if l.startswith('GPU')]


def plan(processes: int, local_devices: int = 0,
         env: Optional[Dict[str, str]] = None) -> Tuple[str, List[Dict[str, str]]]:
  """(a description, each child's environment less the ENV_* settings): the devices
  of this machine split evenly, or `local_devices` each (CPU devices are simulated,
  so any number goes; GPUs are dealt out and must suffice)."""
  env = dict(os.environ if env is None else env)
  if processes < 1:
    raise UserError(f'--processes={processes}: use 1 or more')
  if local_devices < 0:
    raise UserError(f'--local_devices={local_devices}: use 1 or more (0 = the machine\'s '
                    'devices split evenly)')
  gpus = visible_gpus(env)
  if gpus:
    per = local_devices or len(gpus) // processes
    if per < 1 or per * processes > len(gpus):
      raise UserError(f'--processes={processes} x --local_devices={per or 1} needs '
                      f'{processes * max(per, 1)} GPUs; {len(gpus)} visible')
    envs = [{**env, 'CUDA_VISIBLE_DEVICES': ','.join(gpus[i * per:(i + 1) * per])}
            for i in range(processes)]
    return f'{processes} processes x {per} GPU(s)', envs
  per = local_devices or max(1, cpu_devices(env) // processes)
  flags = _DEVICE_FLAG.sub('', env.get('XLA_FLAGS', '')).strip()
  child = {**env, 'JAX_NUM_CPU_DEVICES': str(per), 'XLA_FLAGS': flags}
  return f'{processes} processes x {per} CPU device(s)', [dict(child) for _ in range(processes)]


def _describe_end(code: int) -> str:
  if code < 0:
    try:
      name = f', {signal.Signals(-code).name}'
    except ValueError:
      name = ''
    return f'died (signal {-code}{name})'
  return f'failed (exit status {code})'


def exit_status(code: int) -> int:
  """A child's return code as a shell reports it: 128 + N for signal N."""
  return 128 - code if code < 0 else code


def spawn(module: str, argv: List[str], processes: int, local_devices: int = 0,
          out=None, err=None) -> int:
  """Runs `python -m module *argv` as `processes` processes joined by jax.distributed
  on this machine; returns the exit status (0, or the first failing child's)."""
  out, err = out or sys.stdout, err or sys.stderr
  what, envs = plan(processes, local_devices)
  port = free_port()
  children = []
  for i, env in enumerate(envs):
    env.update({ENV_COORDINATOR: f'127.0.0.1:{port}', ENV_NUM_PROCESSES: str(processes),
                ENV_PROCESS_ID: str(i), ENV_LAUNCHER: str(os.getpid()),
                'PYTHONUNBUFFERED': '1'})
    children.append(subprocess.Popen([sys.executable, '-m', module, *argv], env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1))
  print(f'{what} on this machine (coordinator 127.0.0.1:{port}; pids '
        f'{", ".join(str(c.pid) for c in children)})', file=out, flush=True)
  return _Watch(children, out, err).run()


class _Watch:
  """Streams the children's output and ends them all when one fails: process 0's
  lines (less gloo's connection notices), its stderr HOLD_S late, the others' last
  lines kept, shown only if that process is the one that failed.

  Why stderr waits: when a process dies, process 0's next collective fails at once
  and its traceback (a consequence, not the cause) can be under way before the
  death is seen here; held back, it is dropped with the rest, and the one line
  that names the dead process is what the user reads."""

  def __init__(self, children, out, err):
    self.children, self.out, self.err = children, out, err
    self.lines: 'queue.Queue' = queue.Queue()
    self.tails = [collections.deque(maxlen=TAIL_LINES) for _ in children]
    self.late: List[Tuple[float, str]] = []   # process 0's stderr: (when due, line)
    self.held: List[Tuple[str, str]] = []     # process 0's lines after a failure
    self.readers = []
    for i, c in enumerate(children):
      for stream, name in ((c.stdout, 'out'), (c.stderr, 'err')):
        t = threading.Thread(target=self._read, args=(i, stream, name), daemon=True)
        t.start()
        self.readers.append(t)

  def _read(self, i, stream, name):
    noisy = False   # the notice's own newline may come after a line of ours: dropped
    for line in stream:
      clean = _NOISE.sub('', line)
      if clean.strip() or not (line.strip() or noisy):
        self.lines.put((i, name, clean))
      noisy = clean != line
    self.lines.put((i, name, None))   # wakes the watch: this child may have ended

  def _write(self, name, line):
    target = self.out if name == 'out' else self.err
    target.write(line)
    target.flush()

  def _drain(self, live: bool, wait: float = 0.0) -> None:
    """Passes the queued lines on, waiting up to `wait` seconds for the first; when
    `live`, process 0's stdout is shown and its stderr once HOLD_S old."""
    while True:
      try:
        i, name, line = self.lines.get(timeout=wait) if wait else self.lines.get_nowait()
      except queue.Empty:
        break
      wait = 0.0
      if line is None:
        continue
      if i:
        self.tails[i].append(line)
      elif live and name == 'out':
        self._write(name, line)
      elif live:
        self.late.append((time.time() + HOLD_S, line))
      else:
        self.held.append((name, line))
    now = time.time()
    while live and self.late and self.late[0][0] <= now:
      self._write('err', self.late.pop(0)[1])

  def run(self) -> int:
    try:
      failed = self._wait_for_failure()
    except KeyboardInterrupt:
      self._kill(range(len(self.children)))
      print('error: interrupted; stopped every process; rerun the same command to resume',
            file=self.err, flush=True)
      return 130
    if failed is None:
      return 0
    i, code = failed
    self.held, self.late = [('err', line) for _, line in self.late], []
    if code > 0:   # an error that every process may meet alike (bad input): let them end
      deadline = time.time() + GRACE_S
      while time.time() < deadline and any(c.poll() is None for c in self.children):
        self._drain(live=False, wait=0.1)
    self._kill(range(len(self.children)))
    for t in self.readers:
      t.join(timeout=2)
    self._drain(live=False)
    first = self.children[0].returncode
    if code > 0 and first is not None and first > 0:   # process 0 failed and said why
      for name, line in self.held:
        self._write(name, line)
      return exit_status(first)
    if code > 0:
      for line in self.tails[i]:
        self.err.write(f'[p{i}] {line}')
    hint = '; rerun the same command to resume' if code < 0 else ''
    print(f'error: process {i} {_describe_end(code)}; stopped the other processes{hint}',
          file=self.err, flush=True)
    return exit_status(code)

  def _wait_for_failure(self) -> Optional[Tuple[int, int]]:
    """(process, return code) of the first child found ended unsuccessfully (a
    death by a signal before an exit status), or None once all ended with 0."""
    while True:
      self._drain(live=True, wait=0.1)
      codes = [c.poll() for c in self.children]
      bad = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
      if bad:
        return min(bad, key=lambda b: (b[1] > 0, b[0]))
      if all(c == 0 for c in codes):
        for t in self.readers:
          t.join(timeout=5)
        self._drain(live=True)
        for _, line in self.late:
          self._write('err', line)
        return None

  def _kill(self, which) -> None:
    """SIGKILL: JAX's preemption notifier takes SIGTERM, and a process blocked in a
    collective would not act on it anyway. The run is left as any kill leaves it
    (its checkpoints are atomic; a rerun resumes)."""
    for j in which:
      if self.children[j].poll() is None:
        self.children[j].kill()
    for j in which:
      self.children[j].wait()


def define_flags():
  """--processes and --local_devices, for a launcher (launch/train.py and others)."""
  from absl import flags
  return (flags.DEFINE_integer('processes', 1, 'Run as N processes on this machine, joined by '
                               'jax.distributed (each with its share of the devices); the '
                               'others are stopped when one dies.'),
          flags.DEFINE_integer('local_devices', 0, 'Devices per process with --processes (0 = '
                               'the machine\'s split evenly; CPU devices are simulated, any '
                               'number goes).'))


def run_as_processes(module: str, processes: int, local_devices: int,
                     distributed_mode: str = 'auto') -> Optional[int]:
  """In a launcher given --processes=N (N > 1): runs the command as N processes and
  returns their exit status. None in one of those processes, or without the flag:
  the launcher then does its work itself."""
  if spawned():
    return None
  if processes < 1:
    raise UserError(f'--processes={processes}: use 1 or more')
  if processes == 1:
    if local_devices:
      raise UserError('--local_devices sets the devices of each of --processes=N (N > 1); '
                      'one process uses the devices it sees')
    return None
  if distributed_mode == 'off':
    raise UserError('--processes needs jax.distributed: drop --distributed=off')
  return spawn(module, sys.argv[1:], processes, local_devices)
