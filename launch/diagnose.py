"""The tuning recipe's checks on an experiment config (and on finished runs' curves):

  python -m launch.diagnose --config=experiments/x.py[:arg] --workdir=W [--checks=LIST]
  python -m launch.diagnose --checks=curves --curves_from=runs/sweep --workdir=W

Prints PASS / WARN / FAIL per check with its numbers, writes W/diagnose.json and PNGs.
Exits 1 when a check fails.
"""
import sys

from absl import flags
from ml_collections import config_flags

from lib.core import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file[:arg].',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where diagnose.json and the PNGs go.')
_CHECKS = flags.DEFINE_list('checks', None, 'Checks to run (default: all that apply: the five '
                            'config checks with --config, curves with --curves_from): '
                            'initial_loss, overfit_small, lr_range, activations, grad_check, '
                            'curves.')
_CURVES = flags.DEFINE_string('curves_from', None, 'A run or sweep directory whose '
                              'metrics.jsonl the curves check reads.')
_BATCHES = flags.DEFINE_integer('overfit_batches', 5, 'overfit_small: batches in the sample.')
_OVERFIT_STEPS = flags.DEFINE_integer('overfit_steps', 1000, 'overfit_small: step budget.')
_LR_MIN = flags.DEFINE_float('lr_min', 1e-4, 'lr_range: lowest rate.')
_LR_MAX = flags.DEFINE_float('lr_max', 10.0, 'lr_range: highest rate.')
_LR_POINTS = flags.DEFINE_integer('lr_points', 11, 'lr_range grid: rates tried (log-spaced).')
_LR_STEPS = flags.DEFINE_integer('lr_steps', 100, 'lr_range: steps per rate (grid) or of the '
                                 'whole ramp.')
_LR_MODE = flags.DEFINE_enum('lr_mode', 'grid', ['grid', 'ramp'], 'lr_range: a run per rate, '
                             'or one exponential ramp.')
_ACT_STEPS = flags.DEFINE_integer('activation_steps', 20, 'activations: train steps before the '
                                  'second snapshot.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  del argv
  from lib.diagnostics import diagnose
  config = cli.config(_CONFIG) if flags.FLAGS['config'].present else None
  checks = _CHECKS.value or ([c for c in diagnose.NEEDS_CONFIG] if config is not None else []) \
      + (['curves'] if _CURVES.value else [])
  if not checks:
    from lib.core.errors import UserError
    raise UserError('nothing to check: pass --config=experiments/<x>.py and/or --curves_from=DIR')
  options = {'overfit_batches': _BATCHES.value, 'overfit_steps': _OVERFIT_STEPS.value,
             'lr_min': _LR_MIN.value, 'lr_max': _LR_MAX.value, 'lr_points': _LR_POINTS.value,
             'lr_steps': _LR_STEPS.value, 'lr_mode': _LR_MODE.value,
             'activation_steps': _ACT_STEPS.value}
  results = diagnose.run(checks, _WORKDIR.value, config, _CURVES.value, options)
  if any(r.verdict == diagnose.FAIL for r in results):
    sys.exit(1)


if __name__ == '__main__':
  cli.run(main)
