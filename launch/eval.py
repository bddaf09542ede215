"""Evaluate a checkpoint: python -m launch.eval --workdir=W [--checkpoint=best|latest|STEP]
[--split=val|test] [--tta=none|flip|crops] [--weights=auto|ema|raw]
[--data_source=npz|cifar_dir --data_path=P]

Prints one JSON line last: {"accuracy", "loss", "num_examples", "step"} (+ "weights" for a
run with train.ema_decay on).
"""
import json
import sys

from absl import flags

from lib.core import cli, distributed, sharding
from lib.runs import evaluate

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory written by launch.train.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', 'best', 'best, latest or a step number.')
_SPLIT = flags.DEFINE_enum('split', 'val', ['val', 'test', 'train'], 'Split to evaluate.')
_TTA = flags.DEFINE_enum('tta', None, ['none', 'flip', 'crops'],
                         'Test-time augmentation: flip averaging, or 10 crops (corners + centre, '
                         'each with its flip). Default: the run\'s train.eval_tta.')
_WEIGHTS = flags.DEFINE_enum('weights', 'auto', ['auto', 'ema', 'raw'],
                             'raw: the trained weights; ema: their moving average (runs with '
                             'train.ema_decay on); auto: the ones that picked the best checkpoint '
                             '(train.select_by).')
_SOURCE = flags.DEFINE_string('data_source', None, 'Evaluate on another data source '
                              '(npz, cifar_dir, tfds) of the same image shape.')
_PATH = flags.DEFINE_string('data_path', None, 'Path for --data_source.')
_DISTRIBUTED = flags.DEFINE_enum('distributed', 'auto', ['auto', 'on', 'off'],
                                 'jax.distributed.initialize(), as for launch.train.')
_PROCESSES, _LOCAL_DEVICES = distributed.define_flags()
flags.mark_flag_as_required('workdir')


def main(argv):
  del argv
  status = distributed.run_as_processes('launch.eval', _PROCESSES.value, _LOCAL_DEVICES.value,
                                        _DISTRIBUTED.value)
  if status is not None:   # this was the launcher of N processes
    sys.exit(status)
  sharding.initialize_distributed(_DISTRIBUTED.value)
  result = evaluate.evaluate_checkpoint(_WORKDIR.value, _CHECKPOINT.value, _SPLIT.value,
                                        _TTA.value, _SOURCE.value, _PATH.value,
                                        weights=_WEIGHTS.value)
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  cli.run(main)
