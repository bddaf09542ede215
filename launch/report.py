"""The ablation report of a sweep: python -m launch.report W [--metric=...]

Writes W/results.csv, W/report.md, W/curves.png, W/accuracy.png (and W/search.png
for searches) and prints the ranked table; with two or more finished seeds per arm,
the ensemble of each arm's seeds too (W/ensembles.csv; --noensembles skips it). Also run at the end of launch.sweep.
"""
from absl import flags

from lib.core import cli

_METRIC = flags.DEFINE_enum('metric', None, ['best_val_accuracy', 'final_val_accuracy',
                                              'test_accuracy'],
                            'Rank by this (default: best val accuracy, the selection metric; '
                            'test_accuracy ranks on the test split, and the report warns).')
_ENSEMBLES = flags.DEFINE_bool('ensembles', True, 'Per arm with two or more finished seeds, '
                               'evaluate the ensemble of its seeds (restores their checkpoints '
                               'on this machine\'s devices; W/ensembles.csv).')


def main(argv):
  if len(argv) != 2:
    from lib.core.errors import UserError
    raise UserError('usage: python -m launch.report W (one sweep directory)')
  from lib.sweeps import report
  report.write_and_print(argv[1], _METRIC.value, ensembles=_ENSEMBLES.value)


if __name__ == '__main__':
  cli.run(main)
