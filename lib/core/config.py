"""The keys every experiment shares, their defaults, and config resolution.

Experiment modules start from `base_config()` and change values; they never
add keys the training code does not read, so a locked config catches typos.
Model depth/width of -1 mean "the registry default for this model" and are
filled in by `lib.training.resolve.resolve()`, so `config.json` always records what really ran.
"""
import copy
import json
from typing import Any, Dict, List

import ml_collections

import os

from lib.core import factors
from lib.core.errors import UserError

# The repository root (launchers run from here; relative paths in a config, such as
# data.path, are relative to it).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Keys that change how a run is watched, not what it computes: a workdir may be
# resumed with different values of these, and arms differing in them share a program.
WATCH_KEYS = ('train.log_every', 'train.tb_histograms', 'train.vectorize',
              'train.vectorize_mode', 'train.max_arms', 'train.repack',
              'train.checkpoint_every_s', 'train.profile_steps', 'train.deterministic',
              # Both input pipelines feed the same batches (lib/data/device.py).
              'data.pipeline', 'data.workers', 'data.prefetch', 'data.max_bad_records')
NON_SEMANTIC_KEYS = frozenset(WATCH_KEYS)


def base_config() -> ml_collections.ConfigDict:
  """Every key a run reads, at its default. The ablation factors (lib/core/factors.py)
  come from their table, at their off values; the rest are declared here."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.source = 'digits'      # digits | cifar_dir | npz | tfds | records | synthetic_jpeg
  c.data.path = ''              # directory / file / tfds data_dir
  c.data.name = ''              # tfds dataset name, e.g. cifar10
  c.data.val_fraction = 0.1     # held out of the training split, fixed per split_seed
  c.data.split_seed = 0         # the train/val split does not move with `seed`
  # Input pipeline (lib/data/device.py): resident = whole splits on the devices; stream =
  # batches read by host worker processes (grain); auto = resident when the data fits.
  c.data.pipeline = 'auto'
  c.data.image_size = 0         # >0: decode and resize on the host to this size (stream)
  c.data.workers = 2            # stream: grain worker processes (0 = threads of this one)
  c.data.prefetch = 2           # stream: batches read and put on the devices ahead
  c.data.max_bad_records = 100  # stream: distinct unreadable records skipped before failing

  c.model = ml_collections.ConfigDict()
  c.model.name = 'mlp'
  c.model.depth = -1            # -1: the model's default (see README table)
  c.model.width = -1            # -1: the model's default
  c.model.dtype = 'float32'     # compute dtype: float32 | bfloat16 (params stay f32)
  c.model.stem = 'auto'         # residual nets: auto (ImageNet's above 64 px) | imagenet | cifar

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'momentum'     # sgd momentum nesterov adagrad rmsprop adam adamw
  c.optim.momentum = 0.9        # momentum / nesterov
  c.optim.rms_decay = 0.9       # rmsprop: decay of the squared-gradient average
  c.optim.b1 = 0.9              # adam / adamw
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.clip_norm = 0.0       # global-norm clipping; 0 = off

  c.regularize = ml_collections.ConfigDict()   # every key a factor

  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = 'cosine'    # constant step cosine linear inverse_sqrt
  c.schedule.warmup_epochs = 0.0
  c.schedule.milestone_fractions = (0.5, 0.75)  # step schedule: at these fractions of training
  c.schedule.milestone_epochs = ()  # step schedule: at these epochs instead, e.g. (30, 60, 80)
  c.schedule.factor = 0.1       # step schedule: multiply at each milestone
  c.schedule.final_fraction = 0.0  # cosine/linear: end at lr * final_fraction

  c.augment = ml_collections.ConfigDict()      # every key a factor

  c.train = ml_collections.ConfigDict()
  c.train.epochs = 10
  c.train.batch_size = 128      # global batch, split over devices
  c.train.eval_every = 0        # steps between evaluations; 0 = once per epoch
  c.train.eval_batch_size = 500
  c.train.log_every = 50        # steps between console progress lines
  c.train.tb_histograms = False  # weight and activation histograms to TensorBoard at each eval
  # Seconds between resume checkpoints (lib/runs/loop.py); 0 = a checkpoint at every evaluation.
  c.train.checkpoint_every_s = 60.0
  # Sweeps: train compatible arms together in one compiled program (lib/training/arms.py).
  c.train.vectorize = False
  c.train.vectorize_mode = 'auto'  # auto | vmap (batched ops) | unroll (arm after arm, one program)
  c.train.max_arms = 0          # arms per program at most; 0 = as many as fit in memory
  # Once a quarter of a program's arms ended (early stop, divergence), with an epoch or more
  # left: recompile for the live arms at the next evaluation (lib/runs/loop.py).
  c.train.repack = True
  # 'START,COUNT': a jax.profiler trace of steps START..START+COUNT-1 to W/profile
  # (TensorBoard's profile tab; lib/core/profiling.py). '' = off.
  c.train.profile_steps = ''
  # Bit-reproducible runs: the XLA flags each backend needs (lib/core/determinism.py), set
  # before the backend starts and recorded in W/provenance.json.
  c.train.deterministic = False
  for f in factors.FACTORS.values():
    c[f.section][f.field] = f.initial
  return c


def _mark_resolved(config: ml_collections.ConfigDict,
                   config_dict: Dict[str, Any]) -> ml_collections.ConfigDict:
  """Records on `config` (outside its fields) its values now and its JSON dict."""
  object.__setattr__(config, '_resolved_as', (config.to_dict(), config_dict))
  return config


def is_resolved(config) -> bool:
  """Whether `config` is one `resolve` returned (or `from_resolved_json_dict` rebuilt)
  and unchanged since: a value set after resolving makes it unresolved again."""
  marker = getattr(config, '__dict__', {}).get('_resolved_as')
  return marker is not None and marker[0] == config.to_dict()


def flatten(d: Dict[str, Any], prefix: str = '') -> Dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(flatten(v, key + '.'))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def to_json_dict(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """A JSON round-trippable dict (tuples become lists). A resolved config's is a copy
  of the one computed when it was resolved (a caller's change cannot reach config.json)."""
  if is_resolved(config):
    return copy.deepcopy(config.__dict__['_resolved_as'][1])
  return json.loads(json.dumps(config.to_dict(), default=list))


def diff(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
  """Keys whose values differ, as 'key: old -> new', ignoring NON_SEMANTIC_KEYS."""
  a, b = flatten(old), flatten(new)
  defaults = flatten(base_config().to_dict())
  out = []
  for key in sorted(set(a) | set(b)):
    if key in NON_SEMANTIC_KEYS:
      continue
    if key not in a and key in defaults and b.get(key) == defaults[key]:
      continue   # a key added after `old` was written, at its default (off) value
    if a.get(key, '<absent>') != b.get(key, '<absent>'):
      out.append(f'{key}: {a.get(key, "<absent>")} -> {b.get(key, "<absent>")}')
  return out


def from_json_dict(d: Dict[str, Any]) -> ml_collections.ConfigDict:
  """Rebuilds a locked config from config.json (lists back to tuples). Keys added
  to base_config after the run was written get their defaults (their off values)."""
  def fix(x):
    if isinstance(x, dict):
      return {k: fix(v) for k, v in x.items()}
    return tuple(x) if isinstance(x, list) else x

  def merge(base, over):
    out = dict(base)
    for k, v in over.items():
      out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out
  config = ml_collections.ConfigDict(merge(base_config().to_dict(), fix(d)))
  config.lock()
  return config


def from_resolved_json_dict(d: Dict[str, Any]) -> ml_collections.ConfigDict:
  """Rebuilds a resolved config from the JSON dict `to_json_dict` made of it (a sweep
  task's config, which crosses to a worker process or a SLURM task as JSON), marked
  resolved so it is not resolved again: `runner.plan` resolved it, in this code. A
  dict whose keys are not exactly today's base_config's (written by an older or
  another version), or whose factor values are out of range, is not marked:
  whoever uses it resolves it, and so validates it."""
  config = from_json_dict(d)
  if set(flatten(d)) != set(flatten(base_config().to_dict())):
    return config
  try:
    factors.check(config)
  except UserError:
    return config
  return _mark_resolved(config, copy.deepcopy(d))
