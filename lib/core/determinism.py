"""`train.deterministic=True`: the XLA settings under which a run is bit-reproducible.

What each backend needs:
  GPU  --xla_gpu_deterministic_ops=true: deterministic reductions, scatters and
       convolution algorithms (no atomics; autotuning keeps only deterministic
       kernels). It costs speed, by how much depends on the model (measure it with
       launch.benchmark's accelerator suite, once with and once without).
  CPU, TPU  nothing: XLA runs a compiled program the same way every time.
Everything else a run computes is already a function of its seed: the data order of
(seed, epoch), each step's random streams of (seed, step).

The flags are XLA_FLAGS, read once when JAX starts its backend, so they must be set
before that: the launchers call `request` first thing; a process whose backend
started without them cannot turn them on (one line: how to launch instead). The
setting in effect goes into W/provenance.json (`deterministic`, `xla_flags`).
"""
import os
from typing import Any, Dict

from lib.core.errors import UserError

FLAGS = ('--xla_gpu_deterministic_ops=true',)   # accepted (and a no-op) by every backend


def in_effect() -> bool:
  """Whether XLA_FLAGS holds every flag of FLAGS."""
  flags = os.environ.get('XLA_FLAGS', '').split()
  return all(f in flags for f in FLAGS)


def _backend_started() -> bool:
  from jax._src import xla_bridge
  return xla_bridge.backends_are_initialized()


def request(deterministic: bool) -> None:
  """Puts FLAGS into XLA_FLAGS (this process and the ones it starts) when asked for
  and the backend has not started; raises a one-line UserError when it has."""
  if not deterministic or in_effect():
    return
  if _backend_started():
    raise UserError('train.deterministic=True needs XLA flags set before JAX starts: pass '
                    '--config.train.deterministic=True to the launcher, or set '
                    f'XLA_FLAGS="{" ".join(FLAGS)}" before starting Python')
  os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', ''), *FLAGS]).strip()


def record() -> Dict[str, Any]:
  """What provenance records: whether the flags were in effect, and XLA_FLAGS."""
  return {'deterministic': in_effect(), 'xla_flags': os.environ.get('XLA_FLAGS', '')}
