"""The accelerator check, `python -m launch.benchmark --suite=accelerator`: a fixed set of
lib/diagnostics/benchmark.py's measurements sized for one GPU in under 10 minutes
(ACCELERATOR_SPEC), the fast baseline's epoch time, and what train.deterministic costs
(measured in a process started with its XLA flags, which apply to a whole process).
"""
import json
import subprocess
import sys
import time
from typing import Any, Dict

import jax

from lib.core import sharding
from lib.core.config import base_config
from lib.diagnostics import benchmark
from lib.training import engine
from lib.training.resolve import resolve


def epoch_time(config, examples: int = 50000) -> Dict[str, float]:
  """Seconds per training epoch of `config` on `examples` synthetic 32x32 images (its
  own batch size, augmentation and model; the first step, with its compile, excluded)."""
  config = resolve(config)
  dataset = benchmark.synthetic_dataset(examples)
  eng = engine.Engine(config, dataset, sharding.make_mesh(), log=lambda m: None)
  spe = eng.steps_per_epoch
  state, sums = eng.init_state(), eng.zero_sums()
  state, sums = eng.train_step(state, eng.step_inputs(0), sums)   # compiles
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for step in range(1, spe + 1):
    state, sums = eng.train_step(state, eng.step_inputs(step), sums)
  jax.block_until_ready(state)
  seconds = time.perf_counter() - t0
  batch = config.train.batch_size
  return {'model': config.model.name, 'examples': examples, 'batch_size': batch,
          'steps_per_epoch': spe, 'epoch_s': seconds,
          'examples_per_sec': spe * batch / seconds}


# What `launch.benchmark --suite=accelerator` measures, sized for one GPU in under 10
# minutes. Tests run it with a tiny spec (the same code, other sizes).
ACCELERATOR_SPEC = {
    # (model, batch, image side, config overrides), each at every dtype
    'steps': [('resnet20', 128, 32, {}), ('resnet50', 128, 224, {})],
    'dtypes': ('float32', 'bfloat16'),
    'step_count': 20,
    # vectorized arms of ResNet-20 (batch 128 per arm), both modes
    'arm_model': ('resnet20', {}), 'arms': (1, 2, 4, 8, 16), 'arm_modes': ('vmap', 'unroll'),
    'arm_batch': 128, 'arm_steps': 10,
    'fast_examples': 50000,   # the fast baseline's epoch: CIFAR-10's training set size
}


def accelerator_suite(spec: Dict[str, Any], stream_config=None, fast_config=None,
                      log=print) -> Dict[str, Any]:
  """Every measurement of `spec` (ACCELERATOR_SPEC's keys): train-step throughput per
  model and dtype, vectorized arms per count and mode, the streaming pipeline of
  `stream_config` and the epoch time of `fast_config` (each skipped when None). Rows are
  logged as they are measured, with the elapsed time, so a run cut short still shows
  what it measured."""
  start = time.perf_counter()
  elapsed = lambda: f'[{time.perf_counter() - start:5.0f} s]'
  out = {'train_step': [], 'arms': [], 'stream': [], 'fast_baseline': []}
  log(f'{"train step":<12} {"image":>5} {"batch":>5} {"dtype":>8} {"examples/s":>11} '
      f'{"step ms":>8} {"compile s":>9}')
  for model, batch, side, overrides in spec['steps']:
    for dtype in spec['dtypes']:
      r = benchmark.step_throughput(model, batch, spec['step_count'],
                                    image_shape=(side, side, 3), dtype=dtype, overrides=overrides)
      out['train_step'].append(r)
      log(f'{model:<12} {side:>5} {batch:>5} {dtype:>8} {r["examples_per_sec"]:>11,.0f} '
          f'{r["step_ms"]:>8.1f} {r["compile_s"]:>9.1f} {elapsed()}')
  model, overrides = spec['arm_model']
  c = base_config()
  c.model.name = model
  c.update_from_flattened_dict(dict(overrides))
  c.train.batch_size = spec['arm_batch']
  c.augment.crop_padding, c.augment.flip = 4, True
  dataset = benchmark.synthetic_dataset(spec['arm_batch'] * 4)
  log(f'\n{"arms of " + model:<16} {"mode":>6} {"mesh":>5} {"one arm ex/s":>12} '
      f'{"all arms ex/s":>13} {"speedup":>7} {"compile s":>9}')
  for mode in spec['arm_modes']:
    for r in benchmark.arms_throughput(c, dataset, spec['arms'], spec['arm_steps'],
                                       mode=mode):
      out['arms'].append(r)
      log(f'{r["arms"]:>16} {r["mode"]:>6} {r["mesh"]:>5} '
          f'{r["one_by_one_examples_per_sec"]:>12,.0f} {r["vectorized_examples_per_sec"]:>13,.0f} '
          f'{r["speedup"]:>6.2f}x {r["compile_s"]:>9.1f} {elapsed()}')
  if stream_config is not None:
    r = benchmark.stream_input(stream_config)
    out['stream'].append(r)
    log(f'\nstream input: {r["model"]} on {r["data"]}, {r["workers"]} workers: pipeline '
        f'{r["pipeline_examples_per_sec"]:,.0f} ex/s, training {r["train_examples_per_sec"]:,.0f} '
        f'ex/s, waiting {r["wait_fraction"]:.1%} {elapsed()}')
  if fast_config is not None:
    r = epoch_time(fast_config, spec['fast_examples'])
    out['fast_baseline'].append(r)
    log(f'\nfast baseline: {r["model"]}, batch {r["batch_size"]}: {r["epoch_s"]:.2f} s per '
        f'epoch of {r["examples"]:,} images ({r["examples_per_sec"]:,.0f} ex/s) {elapsed()}')
  out['seconds'] = time.perf_counter() - start
  return out


def deterministic_cost(plain: Dict[str, Any]) -> Dict[str, Any]:
  """ResNet-20's step in a process started with train.deterministic's XLA flags (they
  apply to a whole process), against `plain`, the same step measured in this one."""
  cmd = [sys.executable, '-m', 'launch.benchmark', '--models=resnet20',
         f'--batch_size={plain["batch_size"]}', '--stream=', '--nocheckpoint_pause',
         '--deterministic']
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  if out.returncode != 0:
    return {'error': (out.stderr.strip().splitlines() or ['?'])[-1]}
  r = json.loads(out.stdout.strip().splitlines()[-1])['train_step'][0]
  return {'model': 'resnet20', 'plain_examples_per_sec': plain['examples_per_sec'],
          'deterministic_examples_per_sec': r['examples_per_sec'],
          'slowdown': plain['examples_per_sec'] / r['examples_per_sec']}


def accelerator_check(stream_config, fast_config, log=print) -> Dict[str, Any]:
  """`launch.benchmark --suite=accelerator`: ACCELERATOR_SPEC's suite, then what
  train.deterministic costs for ResNet-20 at float32."""
  result = accelerator_suite(ACCELERATOR_SPEC, stream_config=stream_config,
                             fast_config=fast_config, log=log)
  plain = next(r for r in result['train_step']
               if r['model'] == 'resnet20' and r['dtype'] == 'float32')
  cost = deterministic_cost(plain)
  result['deterministic'] = [cost]
  log('\ntrain.deterministic: ' + (
      f'ResNet-20 {cost["deterministic_examples_per_sec"]:,.0f} ex/s vs '
      f'{cost["plain_examples_per_sec"]:,.0f} without, {cost["slowdown"]:.2f}x slower'
      if 'error' not in cost else f'not measured: {cost["error"]}'))
  return result
