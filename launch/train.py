"""Train one model: python -m launch.train --config=experiments/x.py[:arg] --workdir=W

Rerunning the same command on the same workdir resumes from the latest
checkpoint. A workdir that holds another config is refused unless --fresh.
"""
import sys

from absl import flags
from ml_collections import config_flags

from lib.core import cli, determinism, distributed, sharding

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file[:arg].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (created if absent).')
_FRESH = flags.DEFINE_bool('fresh', False, 'Move an earlier run in --workdir to '
                           'W/archive/<time>/ and start over (nothing is deleted).')
_DISTRIBUTED = flags.DEFINE_enum('distributed', 'auto', ['auto', 'on', 'off'],
                                 'jax.distributed.initialize(): auto = when launched '
                                 'as several SLURM/MPI tasks or a coordinator is set.')
_STOP = flags.DEFINE_integer('debug_stop_after_step', None, 'Stop (as if killed) after the '
                             'first checkpoint at or past this step; for testing resume.')
_PROCESSES, _LOCAL_DEVICES = distributed.define_flags()
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  determinism.request(cli.config(_CONFIG).train.deterministic)   # before JAX's backend starts
  status = distributed.run_as_processes('launch.train', _PROCESSES.value, _LOCAL_DEVICES.value,
                                        _DISTRIBUTED.value)
  if status is not None:   # this was the launcher of N processes
    sys.exit(status)
  sharding.initialize_distributed(_DISTRIBUTED.value)
  from lib.runs import train  # after distributed init
  try:
    status = train.train_and_evaluate(cli.config(_CONFIG), _WORKDIR.value, fresh=_FRESH.value,
                                      stop_after_step=_STOP.value)
  except train.Preempted as e:
    sys.exit(f'stopped: {e}')
  if status.get('status') == 'diverged':
    sys.exit(f'error: diverged: {status["reason"]}')


if __name__ == '__main__':
  cli.run(main, report_compiles=True)
