"""Evaluate a checkpoint: python -m launch.eval --workdir=W [--checkpoint=best|latest|STEP]
[--split=val|test] [--tta=none|flip|crops|flip_translate] [--weights=auto|ema|raw]
[--data_source=npz|cifar_dir --data_path=P]

Prints one JSON line last: {"accuracy", "loss", "num_examples", "step"} (+ "weights" for a
run with train.ema_decay on).

An ensemble: python -m launch.eval --ensemble=DIR[,DIR...] (a DIR holding seed_<k> runs,
a sweep's arm, stands for them): the mean of the members' softmax outputs
(lib/runs/ensemble.py), on val and test (or --split), a table of each member's accuracy
and loss and the ensemble's, then one JSON line {"members": [...], "ensemble": {...}}.
"""
import json
import sys

from absl import flags

from lib.core import cli, distributed, factors, sharding
from lib.core.errors import UserError
from lib.runs import evaluate

_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory written by launch.train.')
_ENSEMBLE = flags.DEFINE_list('ensemble', None, 'Run directories (or sweep arm directories, '
                              'for their seeds) whose softmax outputs are averaged.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', 'best', 'best, latest or a step number.')
_SPLIT = flags.DEFINE_enum('split', 'val', ['val', 'test', 'train'], 'Split to evaluate.')
_TTA = flags.DEFINE_enum('tta', None, list(factors.FACTORS['train.eval_tta'].choices),
                         'Test-time augmentation: flip averaging, 10 crops (corners + centre, '
                         'each with its flip), or flip_translate (the image and its flip, each '
                         'also shifted 1 px both ways; airbench\'s). Default: the run\'s '
                         'train.eval_tta.')
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


def main(argv):
  del argv
  if bool(_WORKDIR.value) == bool(_ENSEMBLE.value):
    raise UserError('give --workdir=W (one run) or --ensemble=DIR[,DIR...] (several)')
  status = distributed.run_as_processes('launch.eval', _PROCESSES.value, _LOCAL_DEVICES.value,
                                        _DISTRIBUTED.value)
  if status is not None:   # this was the launcher of N processes
    sys.exit(status)
  sharding.initialize_distributed(_DISTRIBUTED.value)
  if _ENSEMBLE.value:
    from lib.runs import ensemble
    splits = [_SPLIT.value] if flags.FLAGS['split'].present else list(ensemble.SPLITS)
    result = ensemble.evaluate_ensemble(_ENSEMBLE.value, splits, _CHECKPOINT.value, _TTA.value,
                                        _SOURCE.value, _PATH.value)
    print('\n'.join(ensemble.table(result)), flush=True)
    print(json.dumps(result), flush=True)
    return
  result = evaluate.evaluate_checkpoint(_WORKDIR.value, _CHECKPOINT.value, _SPLIT.value,
                                        _TTA.value, _SOURCE.value, _PATH.value,
                                        weights=_WEIGHTS.value)
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  cli.run(main)
