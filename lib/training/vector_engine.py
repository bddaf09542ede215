"""Many arms of a sweep compiled as one program over an (arms, data) mesh.

Every leaf of the train state, the running train metrics and the strengths
(`steps.hparams`) carries a leading arm axis; the dataset is shared. One call
of the step advances every arm by one step of its own run: its own data order
(a function of its seed and the epoch), its own random streams (its seed and
the step), its own strengths. Two ways to vectorize the same single-arm step
(`steps.make_train_step`, the one launch.train compiles):

  vmap    jax.vmap over the arm axis: batched matmuls, grouped convolutions; the
          arm axis is sharded over the mesh's `arms` devices (each device group
          trains its arms data-parallel over `data`).
  unroll  the single-arm step written out once per arm in one program, arm
          after arm: no grouped convolutions, which XLA:CPU runs slowly.

`auto` picks unroll for convolutional models on CPU (XLA:CPU runs the grouped
convolutions of vmap about 4x slower per arm than plain ones, measured) and for a
single arm, vmap everywhere else.
A boolean `active` per arm freezes arms that have finished or have not caught
up yet (a group resumed from checkpoints of different steps). Arms that have
finished still cost their share of every step; `repacked` builds the program of
the live arms only and carries their states over (lib/runs/loop.py decides when).
"""
import json
from typing import Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from lib.core import cache, factors, sharding
from lib.core import config as config_lib
from lib.data.order import epoch_permutation
from lib.model import models
from lib.training import engine, steps
from lib.training import arms as arms_lib
from lib.training import state as state_lib

MODES = ('vmap', 'unroll')


def resolve_mode(mode: str, program, platform: str, n_arms: int = 2) -> str:
  """auto: unroll for one arm (the single-arm program itself) and for convolutional
  models on CPU; vmap everywhere else."""
  if mode != 'auto':
    return mode
  if n_arms == 1 or (platform == 'cpu' and program.model.name != 'mlp'):
    return 'unroll'
  return 'vmap'


def arm_axis_size(n_devices: int, n_arms: int, batch: int, mode: str) -> int:
  """Devices on the arm axis: the most that divide both the devices and the arms
  while the rest still divide the batch (vmap); 1 for unroll."""
  if mode == 'unroll':
    return 1
  for a in range(n_devices, 0, -1):
    if n_devices % a == 0 and n_arms % a == 0 and batch % (n_devices // a) == 0:
      return a
  return 1


def splits_batch(n_devices: int, n_arms: int, batch: int, mode: str) -> bool:
  """Whether the mesh `arm_axis_size` picks for `n_arms` splits the batch over its data
  axis (it falls back to all devices on the data axis where nothing divides)."""
  return batch % (n_devices // arm_axis_size(n_devices, n_arms, batch, mode)) == 0


def _stack(trees):
  if len(trees) == 1:   # a reshape, not a copy
    return jax.tree.map(lambda x: x[None], trees[0])
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _take(tree, i):
  return jax.tree.map(lambda x: x[i], tree)


def _stacked_shapes(tree, n: int, sharding):
  """Abstract values of `tree` (shapes) with a leading arm axis of n and `sharding`."""
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct((n,) + s.shape, s.dtype, sharding=sharding),
                      tree)


class VectorEngine:
  """Compiled train / eval steps of `configs` (resolved, sharing one program:
  see lib/training/arms.py) as arms over `devices`, with `dataset` on device."""
  grouped = True   # a group's log lines; an arm's error ends that arm only (lib/runs/loop.py)

  def __init__(self, configs: Sequence, dataset, devices=None, mode: str = 'auto'):
    self.configs = list(configs)
    self.n = len(self.configs)
    self.program = arms_lib.program_config(self.configs)
    devices = list(devices if devices is not None else jax.devices())
    self.devices, self.mode_setting = devices, mode   # what a repacked engine is built with
    self.mode = resolve_mode(mode, self.program, devices[0].platform, self.n)
    batch = self.program.train.batch_size
    self.mesh = sharding.make_arm_mesh(
        devices, arm_axis_size(len(devices), self.n, batch, self.mode))
    # The program's single-arm engine: model, optimizer, schedule, data on device,
    # evaluation batches. Its steps are the ones vectorized here.
    self.base = engine.Engine(self.program, dataset, self.mesh)
    self.dataset = dataset
    self.steps_per_epoch, self.total_steps = self.base.steps_per_epoch, self.base.total_steps
    self.rep = sharding.replicated(self.mesh)
    self.by_arm = NamedSharding(self.mesh, P(sharding.ARMS))
    self._indices_sharding = NamedSharding(self.mesh, P(sharding.ARMS, None, sharding.DATA))
    hps = [arms_lib.arm_hparams(c, self.program) for c in self.configs]
    self.hparams = {k: sharding.to_global(np.stack([h[k] for h in hps]), self.by_arm)
                    for k in hps[0]}
    self._single_step = steps.make_train_step(
        self.base.model, self.base.tx_build, self.program, self.mesh, self.base.mean,
        self.base.std, dataset.num_classes, self.steps_per_epoch,
        coarse_of_class=self.base.coarse_of_class)
    self._steps: Dict[bool, object] = {}
    self._evals: Dict[tuple, object] = {}
    self._init_fns: Dict[models.Options, object] = {}
    self._arm_shapes = None
    self._serialize = self.base._serialize
    self._all_active = sharding.to_global(np.ones((self.n,), bool), self.by_arm)
    self._stack = jax.jit(lambda *s: _stack(s), out_shardings=self.by_arm)
    self._arm_state = jax.jit(_take, out_shardings=self.rep)
    self._active = (None, None)   # the last mask uploaded: (host values, device array)
    self._epoch = (None, None)    # the current epoch and its indices
    # Running metrics and evaluation totals are small: replicated, so every process
    # of a multi-host job can read all arms' values.
    self._zero_sums = jax.jit(lambda: _stack([state_lib.zero_sums()] * self.n),
                              out_shardings=self.rep)

  # ----- vectorizing a single-arm function -----
  def _vectorize(self, fn, in_axes):
    """fn over the arm axis of the arguments whose in_axes entry is 0."""
    if self.mode == 'vmap':
      return jax.vmap(fn, in_axes=in_axes, spmd_axis_name=sharding.ARMS)

    def unrolled(*args):
      take = (lambda a, i: jax.tree.map(lambda x: x.reshape(x.shape[1:]), a)) \
          if self.n == 1 else _take   # one arm: reshapes, the single-arm program itself
      outs = [fn(*[take(a, i) if ax == 0 else a for a, ax in zip(args, in_axes)])
              for i in range(self.n)]
      return _stack(outs)
    return unrolled

  # ----- state -----
  def _init_fn(self, options: models.Options):
    """The jitted init of a model with these init options, one per options value
    (kept by this engine, not by a cache on the method that would keep every engine)."""
    if options not in self._init_fns:
      model = self.base.model.clone(opts=options)

      def init(hp, seed, reference):
        return state_lib.init_state(model, self.base.tx_build, hp, seed, self.dataset.image_shape,
                                    ema=state_lib.has_ema(self.program),
                                    tie=state_lib.has_anchor(self.program), reference=reference,
                                    whitening=self.base.whitening_filters())
      self._init_fns[options] = jax.jit(init, out_shardings=self.rep)
    return self._init_fns[options]

  def init_arm(self, i: int, reference=None):
    """Arm i's initial state, exactly as its own run would make it (`reference`: the
    params it is tied to, see Engine.init_state)."""
    c = self.configs[i]
    options = models.Options.from_config(c.model, self.program.regularize)
    return self._init_fn(options)(self.base.hparams, jnp.int32(c.seed), reference)

  def abstract_arm_state(self):
    """One arm's state shapes with the replicated sharding: a restore target (the
    base engine's, traced once and kept on this engine)."""
    if self._arm_shapes is None:
      self._arm_shapes = self.base.abstract_state()
    return self._arm_shapes

  def stack(self, arm_states: Sequence) -> state_lib.TrainState:
    return self._stack(*arm_states)

  def arm_state(self, state, i: int) -> state_lib.TrainState:
    """Arm i's state as its own (replicated) arrays, e.g. to save it."""
    return self._arm_state(state, jnp.int32(i))

  def can_repack(self, n_arms: int) -> bool:
    """Whether a program of `n_arms` of these arms splits the batch over its mesh
    (fewer arms can put fewer devices on the arm axis, so more on the data axis)."""
    mode = resolve_mode(self.mode_setting, self.program, self.devices[0].platform, n_arms)
    return splits_batch(len(self.devices), n_arms, self.program.train.batch_size, mode)

  def repacked(self, state, arms: Sequence[int]) -> Tuple['VectorEngine', state_lib.TrainState]:
    """(engine, state): the program of `arms` only (in this order) and their states,
    carried over exactly: every field of each arm's TrainState (params, optimizer
    state, batch statistics, EMA, anchor, root key, step). The engine is the one a
    group of those arms' configs gets (their program config, the mesh their count
    picks, this engine's mode setting), so a resumed group of the same arms shares
    its compiled step (the process cache). Nothing an arm computes depends on its
    place in the program: its strengths, seed and so its init, data order and
    random streams come from its own config. This engine's data leaves the devices
    before the new engine's arrives (one copy at a time); the new step is compiled
    here, so the caller can time the recompilation."""
    kept = [self.arm_state(state, i) for i in arms]
    new = VectorEngine([self.configs[i] for i in arms], self.dataset, self.devices,
                       self.mode_setting)   # nothing on the devices yet
    self.base.drop_device_data()
    self._epoch = (None, None)
    new._step(False)
    return new, new.stack([jax.device_put(s, new.rep) for s in kept])

  # ----- training -----
  def _step_fn(self, masked: bool):
    single = self._single_step

    def arm_step(state, hp, images, labels, idx, sums, active):
      new_state, new_sums = single(state, hp, images, labels, idx, sums)
      if masked:   # a frozen arm keeps its state and its sums
        keep = lambda new, old: jnp.where(active, new, old)
        new_state = jax.tree.map(keep, new_state, state)
        new_sums = jax.tree.map(keep, new_sums, sums)
      return new_state, new_sums

    fn = self._vectorize(arm_step, (0, 0, None, None, 0, 0, 0))
    return jax.jit(fn, donate_argnums=(0, 5), out_shardings=(self.by_arm, self.rep))

  def _step(self, masked: bool):
    """The step compiled ahead of time for the arm-stacked shapes (so the memory
    check and training share one compilation, and so do programs of the same
    size: see `_compiled`)."""
    if masked not in self._steps:
      self._steps[masked] = _compiled(
          self._program_key('step', masked),
          lambda: self._step_fn(masked).lower(*self._abstract_args()).compile())
    return self._steps[masked]

  def _program_key(self, *what) -> str:
    """Everything the compiled programs depend on: the program config without what
    only its arguments carry (seeds, strengths, init keys), which strengths are on,
    the arms, the mode, the mesh and the data's shapes and statistics."""
    flat = config_lib.flatten(config_lib.to_json_dict(self.program))
    varying = set(arms_lib.varying_keys())
    static = {k: v for k, v in flat.items() if k not in varying}
    switches = {k: factors.is_on(k, flat[k]) for k in factors.hparam_keys().values()}
    coarse = self.base.coarse_of_class   # baked into the step (regularize.aux_coarse)
    data = [self.dataset.image_shape, self.dataset.num_examples('train'), self.dataset.num_classes,
            self.base.mean.tolist(), self.base.std.tolist(),
            None if coarse is None else coarse.tolist()]
    return json.dumps([what, static, switches, self.n, self.mode, repr(self.mesh), data],
                      sort_keys=True, default=str)

  def _abstract_args(self):
    state = _stacked_shapes(self.abstract_arm_state(), self.n, self.by_arm)
    sums = _stacked_shapes(jax.eval_shape(state_lib.zero_sums), self.n, self.rep)
    hp = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.by_arm),
                      self.hparams)
    images, labels = self.base.split_on_device('train')
    idx = jax.ShapeDtypeStruct((self.n, self.steps_per_epoch, self.program.train.batch_size),
                               jnp.int32, sharding=self._indices_sharding)
    active = jax.ShapeDtypeStruct((self.n,), jnp.bool_, sharding=self.by_arm)
    return state, hp, images, labels, idx, sums, active

  def epoch_indices(self, epoch: int) -> jax.Array:
    """(arms, steps, batch): each arm's own shuffle of this epoch (of its own bootstrap
    resample where the arm has data.bootstrap)."""
    per_arm = [epoch_permutation(c.seed, epoch, self.dataset.num_examples('train'),
                                 self.steps_per_epoch, c.train.batch_size,
                                 bool(c.data.bootstrap))
               for c in self.configs]
    return sharding.to_global(np.stack(per_arm), self._indices_sharding)

  def step_inputs(self, step: int) -> jax.Array:
    """The arms' indices of step `step`'s epoch (uploaded once per epoch)."""
    epoch = step // self.steps_per_epoch
    if self._epoch[0] != epoch:
      self._epoch = (epoch, self.epoch_indices(epoch))
    return self._epoch[1]

  def zero_sums(self):
    return self._zero_sums()

  def train_step(self, state, epoch_indices, sums, active: Optional[np.ndarray] = None):
    """One step of every arm; arms with active False stay as they are."""
    images, labels = self.base.split_on_device('train')
    masked = active is not None and not bool(np.all(active))
    args = (state, self.hparams, images, labels, epoch_indices, sums)
    if masked:
      if not np.array_equal(self._active[0], active):   # it changes at evaluations only
        self._active = (np.array(active, bool), sharding.to_global(np.asarray(active, bool),
                                                                  self.by_arm))
      out = self._step(True)(*args, self._active[1])
    else:
      out = self._step(False)(*args, self._all_active)
    return jax.block_until_ready(out) if self._serialize else out

  def learning_rates(self, step: int) -> List[float]:
    m = float(self.base.lr_multiplier(step))
    return [float(c.optim.lr * m) for c in self.configs]

  # ----- evaluation -----
  def _eval(self, tta: str, split: str):
    """The evaluation of every arm over a split, compiled ahead of time (once per
    tta and split: the memory check compiles the one of 'val')."""
    key = (tta, split)
    if key not in self._evals:
      inputs = self.base.eval_inputs(split)

      def compile_():
        fn = jax.jit(self._vectorize(self.base.eval_split_fn(tta), (0, None, None, None, None)),
                     out_shardings=self.rep)
        state = _stacked_shapes(self.abstract_arm_state(), self.n, self.by_arm)
        return fn.lower(state, *inputs).compile()
      self._evals[key] = _compiled(
          self._program_key('eval', tta, [list(x.shape) for x in inputs]), compile_)
    return self._evals[key]

  def evaluate(self, state, split: str = 'val', tta: Optional[str] = None) -> List[Dict]:
    """Loss and accuracy of every arm over a whole split, in one launch."""
    tta = self.base.check_tta(tta)
    totals = jax.device_get(self._eval(tta, split)(state, *self.base.eval_inputs(split)))
    return [engine.eval_result(_take(totals, i)) for i in range(self.n)]

  # ----- memory -----
  def bytes_per_device(self) -> Optional[int]:
    """Device memory the larger of the compiled train step and evaluation needs
    (arguments, outputs, temporaries), from XLA's memory analysis of the programs;
    None where the backend gives none."""
    need = 0
    try:
      for compiled in (self._step(False), self._eval(self.base.check_tta(None), 'val')):
        m = compiled.memory_analysis()
        if m is None:
          return None
        need = max(need, int(m.argument_size_in_bytes + m.output_size_in_bytes
                             - m.alias_size_in_bytes + m.temp_size_in_bytes))
    except Exception:   # noqa: BLE001 - an estimate; training will tell
      return None
    return need


def _compiled(key: str, compile_fn):
  """A compiled program, shared by engines of the same program (the programs a
  group is split into for memory), kept by the process cache (lib/core/cache.py)."""
  return cache.process_cache().program(key, compile_fn)
