"""Benchmark: python -m launch.benchmark [--models=mlp,resnet20] [--batch_size=128]
[--cifar_dir=../shared/data/cifar-10-batches-py] [--arms=1,2,4,8,16] [--nocheckpoint_pause]
[--stream=imagenet_local,resnet20_cifar] [--repack=8] [--deterministic]

Prints tables and, last, one JSON line with every number. With --arms: arms
trained one by one against one vectorized program, for the quickstart MLP on
digits and ResNet-20 on 32x32 images (--arm_models), and the wall time of a
whole sweep of the MLP both ways (--sweep_arms). With --repack=N: N MLP runs as one
group, half of them diverging at once, with train.repack off and on.

  python -m launch.benchmark --suite=accelerator

is the accelerator check (lib/diagnostics/accelerator.py ACCELERATOR_SPEC, under 10
minutes on one GPU): ResNet-20 and ResNet-50 steps at float32 and bfloat16, 1-16
vectorized ResNet-20 arms (vmap and unroll), the streaming pipeline, the fast CIFAR
baseline's epoch, and what train.deterministic costs (ResNet-20's step measured again
in a process started with its XLA flags).
"""
import json
import platform

import jax
from absl import flags

from experiments import imagenet_resnet, quickstart
from lib.core import cli, determinism
from lib.core.errors import UserError
from lib.diagnostics import accelerator, benchmark

_MODELS = flags.DEFINE_list('models', ['mlp', 'resnet20'], 'Models for the step benchmark.')
_BATCH = flags.DEFINE_integer('batch_size', 128, 'Global batch size.')
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps per model.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype.')
_CIFAR = flags.DEFINE_string('cifar_dir', None, 'Also measure the loop overhead of ResNet-20 '
                             'on this CIFAR "python version" directory.')
_PAUSE = flags.DEFINE_bool('checkpoint_pause', True, 'Measure the pause of the train loop at '
                           'an evaluation (val, train_eval, checkpoint save) with synchronous '
                           'and asynchronous checkpoints, for the quickstart MLP (and ResNet-20 '
                           'with --cifar_dir).')
_ARMS = flags.DEFINE_list('arms', [], 'Arm counts for the vectorized-arms benchmark, e.g. '
                          '1,2,4,8,16 (empty: skip it).')
_ARM_MODELS = flags.DEFINE_list('arm_models', ['mlp_digits', 'resnet20'],
                                'mlp_digits: the quickstart MLP on digits (batch 32); resnet20: '
                                'ResNet-20 on synthetic 32x32 images (batch --batch_size).')
_ARM_STEPS = flags.DEFINE_integer('arm_steps', 0, 'Timed steps per arm count (0: 200 for the '
                                  'MLP, 3 for ResNet-20).')
_MODE = flags.DEFINE_enum('vectorize_mode', 'auto', ['auto', 'vmap', 'unroll'],
                          'How arms are vectorized (train.vectorize_mode).')
_STREAM = flags.DEFINE_list('stream', ['imagenet_local'],
                            'Streaming input pipeline benchmarks: imagenet_local (the ImageNet '
                            'module\'s local variant: variable-size JPEGs, 2 workers), '
                            'resnet20_cifar (ResNet-20 on --cifar_dir, streamed); empty: skip.')
_SWEEP_ARMS = flags.DEFINE_integer('sweep_arms', 8, 'With --arms: also time a whole sweep of '
                                   'this many quickstart runs, one by one and as one group '
                                   '(0: skip).')
_REPACK = flags.DEFINE_integer('repack', 0, 'Time a group of this many MLP runs on digits, half '
                               'diverging at once, with train.repack off and on (0: skip).')
_SUITE = flags.DEFINE_enum('suite', 'default', ['default', 'accelerator'],
                           'default: the measurements the flags above choose; accelerator: the '
                           'fixed accelerator check (see the module docstring).')
_DETERMINISTIC = flags.DEFINE_bool('deterministic', False, 'Measure with train.deterministic\'s '
                                   'XLA flags (lib/core/determinism.py).')

STREAMS = ('imagenet_local', 'resnet20_cifar')


def run_accelerator_check(machine: str) -> None:
  from experiments import fast_cifar
  result = accelerator.accelerator_check(imagenet_resnet.get_config('local'),
                                         fast_cifar.get_config())
  print(json.dumps({'machine': machine, 'jax': jax.__version__, 'suite': 'accelerator', **result}))


def main(argv):
  del argv
  for name in _STREAM.value:   # checked before anything is measured
    if name not in STREAMS or (name == 'resnet20_cifar' and not _CIFAR.value):
      raise UserError(f'unknown --stream entry {name!r} (resnet20_cifar needs --cifar_dir); '
                      f'valid: {", ".join(STREAMS)}')
  determinism.request(_DETERMINISTIC.value)   # before the backend starts
  devices = jax.devices()
  machine = f'{len(devices)} x {devices[0].device_kind} ({platform.processor() or platform.machine()})'
  print(f'machine: {machine}, jax {jax.__version__}' +
        (' (deterministic XLA flags)' if _DETERMINISTIC.value else ''), flush=True)
  if _SUITE.value == 'accelerator':
    return run_accelerator_check(machine)
  steps = []
  print(f'{"model":<10} {"batch":>5} {"dtype":>8} {"examples/s":>11} {"step ms":>8} {"compile s":>9}')
  for model in _MODELS.value:
    r = benchmark.step_throughput(model, _BATCH.value, _STEPS.value, dtype=_DTYPE.value)
    steps.append(r)
    print(f'{model:<10} {r["batch_size"]:>5} {r["dtype"]:>8} {r["examples_per_sec"]:>11,.0f} '
          f'{r["step_ms"]:>8.1f} {r["compile_s"]:>9.1f}', flush=True)
  real = [quickstart.get_config()]
  if _CIFAR.value:
    c = quickstart.get_config()
    c.data.source, c.data.path = 'cifar_dir', _CIFAR.value
    c.model.name, c.model.norm, c.model.width, c.model.depth = 'resnet20', 'batch', -1, -1
    c.train.batch_size = _BATCH.value
    c.augment.crop_padding, c.augment.flip = 4, True
    real.append(c)
  loops = [benchmark.loop_overhead(c) for c in real]
  print(f'\n{"real epoch":<22} {"steps":>5} {"epoch s":>8} {"in step s":>9} {"outside":>8}')
  for r in loops:
    print(f'{r["model"] + " on " + r["data"]:<22} {r["steps_per_epoch"]:>5} {r["epoch_s"]:>8.2f} '
          f'{r["in_step_s"]:>9.2f} {r["outside_fraction"]:>8.1%}', flush=True)
  pauses = []
  print(f'\n{"pause per evaluation":<22} {"checkpoints":>12} {"pause ms":>9} {"save ms":>8} '
        f'{"next step ms":>12}')
  for c in (real if _PAUSE.value else []):
    for r in benchmark.checkpoint_pause(c):
      pauses.append(r)
      print(f'{r["model"] + " on " + r["data"]:<22} {r["checkpoints"]:>12} {r["pause_ms"]:>9.1f} '
            f'{r["save_ms"]:>8.1f} {r["next_step_ms"]:>12.1f}', flush=True)
  arms, sweeps = [], []
  counts = [int(a) for a in _ARMS.value]
  for name in (_ARM_MODELS.value if counts else []):
    arms += benchmark.arms_table(name, quickstart.get_config(), counts, _BATCH.value,
                                 _ARM_STEPS.value, _DTYPE.value,
                                 _MODE.value)
  if counts and _SWEEP_ARMS.value:
    r = benchmark.sweep_wall_time(quickstart.get_config(), _SWEEP_ARMS.value)
    sweeps.append(r)
    print(f'\nwhole sweep: {r["arms"]} quickstart runs ({r["epochs"]} epochs each): one by one '
          f'{r["one_by_one_s"]:.1f} s, as one group {r["group_s"]:.1f} s, '
          f'speedup {r["speedup"]:.2f}x', flush=True)
  repacks = []
  if _REPACK.value:   # the quickstart MLP made compute-bound: its step, not the loop, dominates
    c = quickstart.get_config()
    c.model.width, c.train.batch_size, c.train.epochs = 1024, 128, 10
    repacks.append(benchmark.repack_wall_time(c, _REPACK.value, mode=_MODE.value))
    print('\n' + benchmark.repack_line(repacks[-1]), flush=True)
  streams = []
  if _STREAM.value:
    print(f'\n{"stream input":<30} {"workers":>7} {"pipeline ex/s":>13} {"train ex/s":>10} '
          f'{"waiting":>8}')
  for name in _STREAM.value:
    c = imagenet_resnet.get_config('local') if name == 'imagenet_local' else real[-1]
    r = benchmark.stream_input(c)
    streams.append({**r, 'benchmark': name})
    print(f'{r["model"] + " on " + r["data"]:<30} {r["workers"]:>7} '
          f'{r["pipeline_examples_per_sec"]:>13,.0f} {r["train_examples_per_sec"]:>10,.0f} '
          f'{r["wait_fraction"]:>8.1%}', flush=True)
  print(json.dumps({'machine': machine, 'jax': jax.__version__, 'train_step': steps,
                    'epoch_loop': loops, 'checkpoint_pause': pauses, 'arms': arms,
                    'sweep': sweeps, 'repack': repacks, 'stream': streams}))


if __name__ == '__main__':
  cli.run(main)
