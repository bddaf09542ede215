"""Speed of the compiled train step and of the loop around it.

* step throughput: examples/s of the jitted train step on a synthetic batch
  (timed after compilation, blocking once at the end), and compile time;
* loop overhead: the fraction of a real epoch's wall time (training, the
  evaluation and checkpoint at its end included) spent outside the compiled
  step: 1 - steps * step_time / epoch_wall_time.
"""
import os
import tempfile
import time
from typing import Dict

import jax
import numpy as np

from lib import data, engine, sharding
from lib.config import base_config, resolve
from lib.rundir import RunDir
from lib.train import train_and_evaluate


def synthetic_dataset(n: int, image_shape=(32, 32, 3), num_classes: int = 10) -> data.Dataset:
  rng = np.random.RandomState(0)
  images = rng.randint(0, 256, (n,) + tuple(image_shape)).astype(np.uint8)
  labels = rng.randint(0, num_classes, n).astype(np.int32)
  mean, std = data.channel_stats(images)
  return data.Dataset((images, labels), (images[:64], labels[:64]), None, num_classes, mean, std)


def _time_steps(eng, steps: int):
  state, sums, idx = eng.init_state(), eng.zero_sums(), eng.epoch_indices(0)
  images, labels = eng.split_on_device('train')
  t0 = time.perf_counter()
  compiled = eng._train_step.lower(state, eng.hparams, images, labels, idx, sums).compile()
  compile_s = time.perf_counter() - t0
  for _ in range(2):   # warm-up
    state, sums = compiled(state, eng.hparams, images, labels, idx, sums)
  jax.block_until_ready(state)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, sums = compiled(state, eng.hparams, images, labels, idx, sums)
  jax.block_until_ready(state)
  return (time.perf_counter() - t0) / steps, compile_s


def step_throughput(model: str, batch_size: int = 128, steps: int = 20, mesh=None,
                    image_shape=(32, 32, 3), dtype: str = 'float32') -> Dict[str, float]:
  c = base_config()
  c.model.name, c.model.dtype = model, dtype
  c.train.batch_size = batch_size
  c.augment.crop_padding, c.augment.flip = 4, True
  eng = engine.Engine(resolve(c), synthetic_dataset(batch_size * 4, image_shape),
                      mesh if mesh is not None else sharding.make_mesh())
  step_s, compile_s = _time_steps(eng, steps)
  return {'model': model, 'batch_size': batch_size, 'dtype': dtype,
          'examples_per_sec': batch_size / step_s, 'step_ms': 1000 * step_s,
          'compile_s': compile_s}


def loop_overhead(config, steps: int = 20) -> Dict[str, float]:
  """Trains `config` for 2 epochs in a scratch dir; compares epoch 2's wall time
  with the same number of back-to-back compiled steps."""
  config = resolve(config)
  with tempfile.TemporaryDirectory() as tmp:
    c = config.copy_and_resolve_references()
    c.unlock()
    c.train.epochs, c.train.eval_every = 2, 0
    train_and_evaluate(c, os.path.join(tmp, 'run'), log=lambda m: None)
    rows = RunDir(os.path.join(tmp, 'run')).read_metrics()
  epoch_s = rows[1]['wall_time'] - rows[0]['wall_time']
  eng = engine.Engine(config, data.load(config.data), sharding.make_mesh())
  step_s, _ = _time_steps(eng, min(steps, eng.steps_per_epoch))
  in_step = eng.steps_per_epoch * step_s
  return {'model': config.model.name, 'data': config.data.source,
          'steps_per_epoch': eng.steps_per_epoch, 'epoch_s': epoch_s,
          'in_step_s': in_step, 'outside_fraction': max(0.0, 1.0 - in_step / epoch_s)}
