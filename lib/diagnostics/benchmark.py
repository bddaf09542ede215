"""Speed of the compiled train step and of the loop around it.

* step throughput: examples/s of the jitted train step on a synthetic batch
  (timed after compilation, blocking once at the end), and compile time;
* loop overhead: the fraction of a real epoch's wall time (training, the
  evaluation and checkpoint at its end included) spent outside the compiled
  step: 1 - steps * step_time / epoch_wall_time;
* checkpoint pause: how long the loop stops at an evaluation (val, train_eval,
  the checkpoint save) with synchronous and asynchronous checkpoints;
* arms: N arms trained one by one (N calls of one arm's step) against N arms
  as one vectorized program (lib/training/vector_engine.py): examples/s summed over the
  arms, and the speedup N * t(one arm) / t(N arms);
* sweep wall time: N whole runs (train_and_evaluate, one after another) against
  the same N runs as one group (train_group), compile, evaluation and
  checkpoints included;
* repacking: a group of N runs of which half diverge at once, with train.repack
  off and on: wall time in all and over the epochs after the first evaluation,
  where repacking moves the live half into a program of its own;
* the streaming input pipeline (data.pipeline=stream): examples/s of the
  pipeline alone (read, decode, host transforms, put on the devices; no step),
  and the share of a real epoch's training time the step loop spends waiting for
  its next batch.
"""
import os
import re
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import jax
import numpy as np

from lib.core import cache, sharding
from lib.core.config import base_config
from lib.core.errors import UserError
from lib.data import datasets as data
from lib.data import device
from lib.runs import group_train
from lib.runs.rundir import RunDir
from lib.runs.train import train_and_evaluate
from lib.training import engine
from lib.training import vector_engine as ve
from lib.training.resolve import resolve


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
                    image_shape=(32, 32, 3), dtype: str = 'float32',
                    overrides: Optional[Dict[str, Any]] = None) -> Dict[str, float]:
  c = base_config()
  c.model.name, c.model.dtype = model, dtype
  c.update_from_flattened_dict(dict(overrides or {}))
  c.train.batch_size = batch_size
  c.augment.crop_padding, c.augment.flip = 4, True
  eng = engine.Engine(resolve(c), synthetic_dataset(batch_size * 4, image_shape),
                      mesh if mesh is not None else sharding.make_mesh())
  step_s, compile_s = _time_steps(eng, steps)
  return {'model': model, 'batch_size': batch_size, 'dtype': dtype,
          'image_size': image_shape[0], 'examples_per_sec': batch_size / step_s,
          'step_ms': 1000 * step_s, 'compile_s': compile_s}


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


def checkpoint_pause(config, dataset=None, evaluations: int = 5) -> List[Dict[str, float]]:
  """The pause of the train loop at each evaluation: from the end of the last train
  step before it to the start of the first after it (val and train_eval evaluated,
  the checkpoint saved, the next step dispatched), with checkpoints written before
  `save` returns (synchronous) and in the background (asynchronous, the default).
  Each is the median over `evaluations` evaluations, one train step apart. The
  asynchronous rows also give the step after the save, which the background write
  may slow (the next save waits for it)."""
  from lib.runs.checkpoint import Checkpoints
  from lib.runs.train import checkpoint_meta
  config = resolve(config)
  dataset = dataset if dataset is not None else data.load(config.data)
  eng = engine.Engine(config, dataset, sharding.make_mesh())
  images, labels = eng.split_on_device('train')
  idx, meta = eng.epoch_indices(0), checkpoint_meta(eng)
  out = []
  for asynchronous in (False, True):
    with tempfile.TemporaryDirectory() as tmp:
      ckpt = Checkpoints(os.path.join(tmp, 'checkpoints'), asynchronous=asynchronous)
      state, sums = eng.init_state(), eng.zero_sums()
      step = lambda st, sm: eng._train_step(st, eng.hparams, images, labels, idx, sm)
      for _ in range(2):   # compile the step and both evaluations, write a first save
        state, sums = step(state, sums)
        eng.evaluate(state, 'val'), eng.evaluate(state, device.TRAIN_EVAL)
      ckpt.save(0, state, meta, {'val_accuracy': 0.0, 'val_loss': 1.0})
      ckpt.wait()
      pauses, saves, after = [], [], []
      for i in range(1, evaluations + 1):
        state, sums = step(state, sums)
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        val = eng.evaluate(state, 'val')
        eng.evaluate(state, device.TRAIN_EVAL)
        t1 = time.perf_counter()
        ckpt.save(i, state, meta, {'val_accuracy': val['accuracy'], 'val_loss': val['loss']})
        t2 = time.perf_counter()
        state, sums = step(state, sums)   # donates the state just saved
        t3 = time.perf_counter()
        jax.block_until_ready(state)
        pauses.append(t3 - t0)
        saves.append(t2 - t1)
        after.append(time.perf_counter() - t2)
      ckpt.wait()
      ckpt.close()
    out.append({'model': config.model.name, 'data': config.data.source,
                'checkpoints': 'asynchronous' if asynchronous else 'synchronous',
                'pause_ms': 1000 * float(np.median(pauses)),
                'save_ms': 1000 * float(np.median(saves)),
                'next_step_ms': 1000 * float(np.median(after))})
  return out


def _time(call, state, sums, steps: int, repeats: int = 5):
  """Seconds per step: the fastest of `repeats` timings of `steps` steps (this is a
  shared machine; the minimum is the least disturbed)."""
  for _ in range(2):   # warm-up
    state, sums = call(state, sums)
  jax.block_until_ready(state)
  best = float('inf')
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(steps):
      state, sums = call(state, sums)
    jax.block_until_ready(state)
    best = min(best, (time.perf_counter() - t0) / steps)
  return best


def arms_throughput(config, dataset, arm_counts: Sequence[int], steps: int = 20, devices=None,
                    mode: str = 'auto') -> List[Dict[str, float]]:
  """For each N in arm_counts: examples/s summed over N arms of `config` (seeds
  0..N-1) trained one by one (one arm's compiled step, N times) and as one
  vectorized program, and the speedup of the latter. Both are timed as the
  fastest of 5 repeats, the one-arm step again next to each N."""
  config = resolve(config)
  devices = list(devices if devices is not None else jax.devices())
  eng = engine.Engine(config, dataset, sharding.make_mesh(devices))
  images, labels = eng.split_on_device('train')
  one_idx = eng.epoch_indices(0)
  one = lambda st, sm: eng._train_step(st, eng.hparams, images, labels, one_idx, sm)
  batch = config.train.batch_size
  out = []
  for n in arm_counts:
    configs = [resolve(c) for c in seeded(config, n)]
    veng = ve.VectorEngine(configs, dataset, devices, mode)
    t0 = time.perf_counter()
    compiled = veng._step(False)
    compile_s = time.perf_counter() - t0
    idx, active = veng.epoch_indices(0), veng._all_active
    state = veng.stack([veng.init_arm(i) for i in range(n)])
    step_s = _time(lambda st, sm: compiled(st, veng.hparams, images, labels, idx, sm, active),
                   state, veng.zero_sums(), steps)
    one_s = _time(one, eng.init_state(), eng.zero_sums(), steps)
    out.append({'model': config.model.name, 'arms': n, 'mode': veng.mode,
                'mesh': f'{veng.mesh.shape[sharding.ARMS]}x{veng.mesh.shape[sharding.DATA]}',
                'batch_per_arm': batch,
                'one_by_one_examples_per_sec': batch / one_s,
                'vectorized_examples_per_sec': n * batch / step_s,
                'speedup': n * one_s / step_s, 'step_ms': 1000 * step_s,
                'compile_s': compile_s})
  return out


def seeded(config, n: int) -> List:
  """n unlocked copies of `config` with seeds 0..n-1."""
  out = []
  for seed in range(n):
    c = config.copy_and_resolve_references()
    c.unlock()
    c.seed = seed
    out.append(c)
  return out


def sweep_wall_time(config, n: int, devices=None) -> Dict[str, float]:
  """Wall seconds to train n runs of `config` (seeds 0..n-1) to the end, one after
  another (train_and_evaluate) and as one group (train_group), from scratch in a
  scratch directory: compile, evaluations and checkpoints included."""
  config = resolve(config)
  configs = seeded(config, n)
  mesh = sharding.make_mesh(devices) if devices is not None else None
  quiet = lambda message: None
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    for i, c in enumerate(configs):
      train_and_evaluate(c, os.path.join(tmp, f'one_{i}'), log=quiet, mesh=mesh)
    one_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    group_train.train_group(configs, [os.path.join(tmp, f'group_{i}') for i in range(n)],
                            log=quiet, devices=devices)
    group_s = time.perf_counter() - t0
  return {'model': config.model.name, 'data': config.data.source, 'arms': n,
          'epochs': config.train.epochs, 'one_by_one_s': one_s, 'group_s': group_s,
          'speedup': one_s / group_s}


def repack_wall_time(config, arms: int = 8, devices=None, mode: str = 'auto') -> Dict[str, float]:
  """A group of `arms` runs of `config` (seeds 0..arms-1) whose second half diverges in
  its first steps (optim.lr 1e6; found by the first evaluation), trained with
  train.repack off and on, each from an empty process cache (its compiles counted).
  Wall seconds in all, and over the epochs after the first evaluation: the ones a
  repack speeds up, read from a live arm's metrics.jsonl (the recompile included).
  `recompile_s`: the repack's own time, from its log line. Repacking shrinks the step
  and the evaluations, not each live arm's checkpoints and metrics: it shows where the
  step dominates (launch.benchmark widens the quickstart MLP to 1024, batch 128)."""
  config = resolve(config)
  configs = seeded(config, arms)
  for c in configs[arms - arms // 2:]:
    c.optim.lr = 1e6
  out = {'model': config.model.name, 'data': config.data.source, 'arms': arms,
         'epochs': config.train.epochs}
  with tempfile.TemporaryDirectory() as tmp:
    for repack in (False, True):
      name = 'on' if repack else 'off'
      lines = []
      cache.process_cache().clear()
      t0 = time.perf_counter()
      group_train.train_group(configs, [os.path.join(tmp, f'{name}_{i}') for i in range(arms)],
                              log=lines.append, devices=devices, mode=mode, repack=repack)
      out[f'{name}_s'] = time.perf_counter() - t0
      rows = RunDir(os.path.join(tmp, f'{name}_0')).read_metrics()
      out[f'{name}_remaining_s'] = rows[-1]['wall_time'] - rows[0]['wall_time']
      out['mode'] = re.search(r'as one program \((\w+);', '\n'.join(lines)).group(1)
    done = [re.search(r'in ([0-9.]+) s$', l) for l in lines if l.startswith('repacked')]
    out['recompile_s'] = float(done[0].group(1)) if done else None   # None: it did not repack
  out['remaining_speedup'] = out['off_remaining_s'] / out['on_remaining_s']
  out['speedup'] = out['off_s'] / out['on_s']
  return out


def stream_input(config, epochs: int = 2) -> Dict[str, float]:
  """The streaming pipeline of `config` (data.pipeline forced to stream):

  pipeline_examples_per_sec  an epoch of batches read and put on the devices with
                             no train step: what the input side alone delivers;
  wait_fraction              of the last of `epochs` epochs trained (steps
                             dispatched as the loop does, evaluation excluded), the
                             share of wall time spent waiting in `step_inputs` for
                             the next batch (on several simulated CPU devices each
                             step blocks, so its time is outside the wait).
  """
  config = config.copy_and_resolve_references()
  config.unlock()
  config.data.pipeline = 'stream'
  config = resolve(config)
  eng = engine.Engine(config, data.load(config.data), sharding.make_mesh(), log=lambda m: None)
  spe = eng.steps_per_epoch
  try:
    eng.step_inputs(0)   # start the workers: their start-up is not throughput
    t0 = time.perf_counter()
    for step in range(1, spe):
      jax.block_until_ready(eng.step_inputs(step))
    pipeline_s = time.perf_counter() - t0
    state, sums = eng.init_state(), eng.zero_sums()
    wait = wall = 0.0
    for step in range(epochs * spe):
      t0 = time.perf_counter()
      inputs = eng.step_inputs(step)
      t1 = time.perf_counter()
      state, sums = eng.train_step(state, inputs, sums)
      if step == 0:
        jax.block_until_ready(state)   # compile outside the measured epoch
      if step >= (epochs - 1) * spe:
        wait += t1 - t0
        wall += time.perf_counter() - t0
    jax.block_until_ready(state)
  finally:
    eng.close()
  batch = config.train.batch_size
  return {'model': config.model.name, 'data': config.data.source,
          'image_size': config.data.image_size, 'workers': eng.data.workers,
          'pipeline_examples_per_sec': (spe - 1) * batch / pipeline_s,
          'train_examples_per_sec': spe * batch / wall, 'wait_fraction': wait / wall}


def arms_table(name: str, quickstart, counts: Sequence[int], batch: int, steps: int, dtype: str,
               mode: str, log=print) -> List[Dict[str, Any]]:
  """`launch.benchmark --arms`: arms_throughput of `name` (mlp_digits: `quickstart`, the
  quickstart config, its MLP on digits, 200 steps; resnet20: ResNet-20 on synthetic 32x32
  images at `batch`, 3 steps; `steps` > 0 overrides), printed as a table; the rows, each
  with its benchmark name."""
  c = quickstart.copy_and_resolve_references()
  if name == 'mlp_digits':
    dataset, n_steps = data.load(c.data), steps or 200
  elif name == 'resnet20':
    c.model.name, c.model.norm, c.model.width, c.model.depth = 'resnet20', 'batch', -1, -1
    c.train.batch_size = batch
    c.augment.crop_padding, c.augment.flip = 4, True
    dataset, n_steps = synthetic_dataset(batch * 4), steps or 3
  else:
    raise UserError(f'unknown --arm_models entry {name!r}; valid: mlp_digits, resnet20')
  c.model.dtype = dtype
  log(f'\n{name}: arms one by one vs one vectorized program')
  log(f'{"arms":>4} {"mode":>6} {"mesh":>5} {"one-by-one ex/s":>15} {"vectorized ex/s":>15} '
      f'{"speedup":>7} {"step ms":>8} {"compile s":>9}')
  out = []
  for r in arms_throughput(c, dataset, counts, n_steps, mode=mode):
    out.append({**r, 'benchmark': name})
    log(f'{r["arms"]:>4} {r["mode"]:>6} {r["mesh"]:>5} {r["one_by_one_examples_per_sec"]:>15,.0f} '
        f'{r["vectorized_examples_per_sec"]:>15,.0f} {r["speedup"]:>6.2f}x '
        f'{r["step_ms"]:>8.1f} {r["compile_s"]:>9.1f}')
  return out


def repack_line(r: Dict[str, Any]) -> str:
  """One repack_wall_time result in words."""
  return (f'repack: {r["arms"]} {r["model"]} runs, {r["epochs"]} epochs ({r["mode"]}), half '
          f'diverged: after the 1st evaluation {r["off_remaining_s"]:.1f} s -> repacked '
          f'{r["on_remaining_s"]:.1f} s ({r["remaining_speedup"]:.2f}x, recompile '
          f'{r["recompile_s"]} s); in all {r["off_s"]:.1f} s -> {r["on_s"]:.1f} s')
