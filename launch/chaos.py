"""Kill -9 a run or a sweep at random moments and check it resumes to identical results.

  python -m launch.chaos --config=experiments/x.py[:arg] --workdir=W --kills=N
      [--mode=auto|train|sweep] [--vectorize] [--seeds=N] [--parallel=N] [--seed=S]
      [--config.a.b=v ...]

Runs the command once uninterrupted (W/reference), then again (W/chaos), killing
it N times (kill -9 of its process group: at random times, half-way through a
metrics write, during a checkpoint save) and relaunching it until it ends, and
compares every run directory with the reference (lib/runs/chaos.py). Exits 1 on any
difference. The run needs more evaluations than kills (train.eval_every).
"""
import sys

from absl import flags
from ml_collections import config_flags

from lib.core import cli
from lib.core.errors import UserError
from lib.runs import chaos

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config or sweep module.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Holds W/reference and W/chaos.')
_KILLS = flags.DEFINE_integer('kills', 10, 'Kills before the last, uninterrupted launch.')
_MODE = flags.DEFINE_enum('mode', 'auto', ['auto', 'train', 'sweep'],
                          'train: launch.train; sweep: launch.sweep; auto: sweep if the module '
                          'has get_sweep.')
_VECTORIZE = flags.DEFINE_bool('vectorize', None, 'sweep: pass --vectorize / --novectorize.')
_SEEDS = flags.DEFINE_integer('seeds', None, 'sweep: seeds per arm (default: the module\'s).')
_PARALLEL = flags.DEFINE_integer('parallel', 1, 'sweep: worker processes (then kills at random '
                                 'times only: a fault would kill a worker, not the sweep).')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the random kill times.')
_TIMEOUT = flags.DEFINE_integer('timeout_s', 3600, 'Longest one launch may take.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  cli.config(_CONFIG)   # a bad module or override fails here, in one line
  config = config_flags.get_config_filename(flags.FLAGS['config'])
  mode = _MODE.value
  if mode == 'auto':
    from lib.sweeps import sweep as sweep_lib
    module = config.partition(':')[0]
    mode = 'sweep' if sweep_lib.has_sweep(module) else 'train'
  if _KILLS.value < 1:
    raise UserError(f'--kills={_KILLS.value} must be at least 1')
  args = [a for a in sys.argv[1:] if a.startswith('--config.')]
  if mode == 'sweep':
    if _VECTORIZE.value is not None:
      args.append('--vectorize' if _VECTORIZE.value else '--novectorize')
    if _SEEDS.value is not None:
      args.append(f'--seeds={_SEEDS.value}')
    if _PARALLEL.value > 1:
      args.append(f'--parallel={_PARALLEL.value}')
  result = chaos.run(mode, config, _WORKDIR.value, _KILLS.value, args, seed=_SEED.value,
                     timeout_s=_TIMEOUT.value)
  for line in result['differences']:
    print(f'  {line}')
  print(chaos.summary(result))
  if result['differences']:
    sys.exit(1)


if __name__ == '__main__':
  cli.run(main)
