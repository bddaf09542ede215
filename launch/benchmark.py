"""Benchmark: python -m launch.benchmark [--models=mlp,resnet20] [--batch_size=128]
[--cifar_dir=../shared/data/cifar-10-batches-py]

Prints a table and, last, one JSON line with every number.
"""
import json
import platform

import jax
from absl import flags

from experiments import quickstart
from lib import benchmark, cli

_MODELS = flags.DEFINE_list('models', ['mlp', 'resnet20'], 'Models for the step benchmark.')
_BATCH = flags.DEFINE_integer('batch_size', 128, 'Global batch size.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps per model.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype.')
_CIFAR = flags.DEFINE_string('cifar_dir', None, 'Also measure the loop overhead of ResNet-20 '
                             'on this CIFAR "python version" directory.')


def main(argv):
  del argv
  devices = jax.devices()
  machine = f'{len(devices)} x {devices[0].device_kind} ({platform.processor() or platform.machine()})'
  print(f'machine: {machine}, jax {jax.__version__}', flush=True)
  steps = []
  print(f'{"model":<10} {"batch":>5} {"dtype":>8} {"examples/s":>11} {"step ms":>8} {"compile s":>9}')
  for model in _MODELS.value:
    r = benchmark.step_throughput(model, _BATCH.value, _STEPS.value, dtype=_DTYPE.value)
    steps.append(r)
    print(f'{model:<10} {r["batch_size"]:>5} {r["dtype"]:>8} {r["examples_per_sec"]:>11,.0f} '
          f'{r["step_ms"]:>8.1f} {r["compile_s"]:>9.1f}', flush=True)
  loops = [benchmark.loop_overhead(quickstart.get_config())]
  if _CIFAR.value:
    c = quickstart.get_config()
    c.data.source, c.data.path = 'cifar_dir', _CIFAR.value
    c.model.name, c.model.norm, c.model.width, c.model.depth = 'resnet20', 'batch', -1, -1
    c.train.batch_size = _BATCH.value
    c.augment.crop_padding, c.augment.flip = 4, True
    loops.append(benchmark.loop_overhead(c))
  print(f'\n{"real epoch":<22} {"steps":>5} {"epoch s":>8} {"in step s":>9} {"outside":>8}')
  for r in loops:
    print(f'{r["model"] + " on " + r["data"]:<22} {r["steps_per_epoch"]:>5} {r["epoch_s"]:>8.2f} '
          f'{r["in_step_s"]:>9.2f} {r["outside_fraction"]:>8.1%}', flush=True)
  print(json.dumps({'machine': machine, 'jax': jax.__version__, 'train_step': steps,
                    'epoch_loop': loops}))


if __name__ == '__main__':
  cli.run(main)
