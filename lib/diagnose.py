"""The six-step tuning recipe (docs: domain.md section 1) as checks on a config.

  initial_loss   loss at step 0, regularization off, against ln C (cross-entropy) or C-1 (hinge)
  overfit_small  a few batches, every regularizer and augmentation off, trained to 100%
  lr_range       log-spaced learning rates for ~100 steps each (or one exponential ramp)
  activations    per-layer activation statistics at init and after a few steps
  grad_check     analytic vs centred finite-difference gradients, float64, small instance
  curves         diagnoses of a run's learning curves (lib/curves.py)

Each check returns a `Result`: PASS / WARN / FAIL, one line with the numbers behind it,
the numbers themselves and the PNGs it wrote. Checks that train use the same compiled
step as launch.train (`lib/engine.py`), on the same mesh.
"""
import dataclasses
import math
import time
from typing import Any, Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lib import config as config_lib
from lib import losses, metrics, models, optim, regularize, sharding
from lib.engine import Engine
from lib.errors import UserError

PASS, WARN, FAIL = 'PASS', 'WARN', 'FAIL'
_ORDER = {PASS: 0, WARN: 1, FAIL: 2}


@dataclasses.dataclass
class Result:
  check: str
  verdict: str
  summary: str
  numbers: Dict[str, Any] = dataclasses.field(default_factory=dict)
  plots: List[str] = dataclasses.field(default_factory=list)

  def line(self) -> str:
    return f'{self.verdict} {self.check}: {self.summary}'


def worst(verdicts) -> str:
  return max(verdicts, key=_ORDER.__getitem__, default=PASS)


# ---------------------------------------------------------------- configs and data


def with_overrides(config, overrides: Dict[str, Any]):
  """A resolved copy of `config` with flat dotted overrides."""
  c = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    group, name = key.split('.')
    c[group][name] = value
  return config_lib.resolve(c)


def plain(config):
  """`config` with every regularizer and augmentation off (their base defaults), no
  decoupled decay and no TTA: what the recipe's first steps ask for."""
  c = ml_collections.ConfigDict(config.to_dict())
  base = config_lib.base_config()
  c.regularize = base.regularize
  c.augment = base.augment
  c.optim.weight_decay = 0.0
  c.train.eval_tta = 'none'
  return config_lib.resolve(c)


def _inputs(dataset, n: int, dtype=np.float32):
  """The first `n` training images, normalized as the train step does, and labels."""
  images, labels = dataset.train
  x = images[:n].astype(np.float64) / 255.0
  x = (x - dataset.mean) / dataset.std
  return x.astype(dtype), labels[:n]


def _train(eng: Engine, state, steps: int, read_every: int, on_read: Callable = None):
  """`steps` train steps from `state`; every `read_every` steps calls
  on_read(step, mean loss since the last read, train accuracy) and stops if it
  returns True. Returns (state, steps done)."""
  spe, sums, idx, done = eng.steps_per_epoch, eng.zero_sums(), None, 0
  for step in range(int(state.step), int(state.step) + steps):
    if idx is None or step % spe == 0:
      idx = eng.epoch_indices(step // spe)
    state, sums = eng.train_step(state, idx, sums)
    done += 1
    if on_read and (done % read_every == 0 or done == steps):
      host = jax.device_get(sums)
      loss = float(host['loss'] / max(host['steps'], 1))
      acc = float(host['correct'] / max(host['examples'], 1))
      sums = eng.zero_sums()
      if on_read(done, loss, acc):
        break
  return state, done


# ---------------------------------------------------------------- 1. initial loss


def expected_initial_loss(loss_name: str, num_classes: int) -> float:
  """ln C for softmax cross-entropy; C - 1 for the (squared) hinge at equal scores."""
  return math.log(num_classes) if loss_name == 'cross_entropy' else float(num_classes - 1)


def initial_loss(config, dataset, mesh, examples: int = 512,
                 loss_fn: Optional[Callable] = None) -> Result:
  """The data loss at step 0 (regularization off, batch statistics as at the first
  step) on the first `examples` training images. `loss_fn(logits, targets)` replaces
  the configured per-example loss (tests scramble it)."""
  c = plain(config)
  eng = Engine(c, dataset, mesh)
  state = eng.init_state()
  x, y = _inputs(dataset, examples)
  name, num_classes = c.train.loss, dataset.num_classes
  loss_fn = loss_fn or (lambda logits, targets: losses.loss(name, logits, targets))

  @jax.jit
  def measure(state, x, y):
    logits, _ = eng.model.apply({'params': state.params, 'batch_stats': state.batch_stats}, x,
                                train=True, mutable=['batch_stats'])
    loss = loss_fn(logits, jax.nn.one_hot(y, num_classes)).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == y), jnp.std(logits)

  loss, acc, logit_std = (float(v) for v in measure(state, x, y))
  expected = expected_initial_loss(name, num_classes)
  ratio = loss / expected
  numbers = {'loss': loss, 'expected': expected, 'ratio': ratio, 'accuracy': acc,
             'logit_std': logit_std, 'examples': len(y), 'loss_name': name}
  what = f'loss {loss:.4f} at step 0, expected {expected:.4f} ({_expected_name(name, num_classes)})'
  if not math.isfinite(loss) or not 0.5 <= ratio <= 2.0:
    verdict = FAIL
  elif not 0.8 <= ratio <= 1.25:
    verdict = WARN
  else:
    return Result('initial_loss', PASS, f'{what}; logit std {logit_std:.3f}', numbers)
  if not math.isfinite(loss) or ratio > 1:
    why = ('likely causes: large logits at init (scale of model.init / init_scale, the last '
           f'layer; logit std is {logit_std:.3g}), a loss summed instead of averaged, or the '
           'wrong number of classes')
  else:
    why = ('likely causes: the labels leak into the inputs, the loss is scaled down, or the '
           'targets are not one-hot')
  return Result('initial_loss', verdict, f'{what}, {ratio:.2f}x; {why}', numbers)


def _expected_name(loss_name, c):
  return f'ln {c}' if loss_name == 'cross_entropy' else f'C - 1 for {c} classes'


# ---------------------------------------------------------------- 2. overfit a small sample


def overfit_small(config, dataset, mesh, batches: int = 5, max_steps: int = 1000,
                  check_every: int = 20, plot: Optional[str] = None,
                  log: Callable = lambda m: None) -> Result:
  """Trains on the first `batches` batches alone (regularization and augmentation
  off, constant learning rate) until they are classified 100% correctly in
  evaluation mode, or `max_steps`."""
  c = plain(config)
  b = c.train.batch_size
  n = batches * b
  if len(dataset.train[1]) < n:
    raise UserError(f'overfit_small needs {batches} batches of {b} = {n} training images; '
                    f'the dataset has {len(dataset.train[1])}: lower --overfit_batches')
  sample = (dataset.train[0][:n], dataset.train[1][:n])
  small = dataclasses.replace(dataset, train=sample, val=sample, test=None)
  c = with_overrides(c, {'schedule.name': 'constant', 'schedule.warmup_epochs': 0.0,
                         'train.epochs': -(-max_steps // batches)})
  eng = Engine(c, small, mesh)
  every = max(batches, -(-check_every // batches) * batches)   # whole passes
  history = []

  def on_read(step, loss, acc):
    history.append({'step': step, 'train_loss': loss, 'train_accuracy': acc})
    return not math.isfinite(loss)

  # Train `every` steps at a time, then evaluate the sample in eval mode.
  state, reached, step, start = eng.init_state(), None, 0, time.time()
  while step < max_steps and reached is None:
    n_steps = min(every, max_steps - step)
    state, done = _train(eng, state, n_steps, n_steps, on_read)
    step += done
    history[-1]['step'] = step
    if not math.isfinite(history[-1]['train_loss']):
      break
    history[-1]['sample_accuracy'] = eng.evaluate(state, 'val')['accuracy']
    if history[-1]['sample_accuracy'] >= 1.0:
      reached = step
    elapsed = time.time() - start
    log(f'  step {step}/{max_steps}: train_loss {history[-1]["train_loss"]:.4f} sample accuracy '
        f'{history[-1]["sample_accuracy"]:.4f} | {step * b / elapsed:,.0f} ex/s | at most '
        f'{metrics.format_duration(elapsed / step * (max_steps - step))} left')
  final = history[-1]
  numbers = {'batches': batches, 'examples': n, 'lr': c.optim.lr, 'steps_to_100': reached,
             'steps': step, 'final_sample_accuracy': final.get('sample_accuracy'),
             'final_train_loss': final['train_loss'], 'history': history}
  plots = [_plot_overfit(plot, history, n)] if plot else []
  if reached is not None:
    return Result('overfit_small', PASS, f'{n} examples ({batches} batches) fit 100% after '
                  f'{reached} steps at lr {c.optim.lr:g}', numbers, plots)
  if not math.isfinite(final['train_loss']):
    why = f'the loss diverged by step {step}: lower optim.lr'
  else:
    why = (f'sample accuracy {final.get("sample_accuracy", 0):.3f}, loss '
           f'{final["train_loss"]:.4f} after {step} steps: try another optim.lr, a larger '
           'model, or a symmetry-breaking init (zeros/constant never fit)')
  return Result('overfit_small', FAIL, f'{n} examples ({batches} batches) did not fit: {why}',
                numbers, plots)


def _plot_overfit(path, history, n):
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.5))
  steps = [h['step'] for h in history]
  ax.plot(steps, [h['train_loss'] for h in history], color='C0', label='train loss')
  ax.set_xlabel('step')
  ax.set_ylabel('train loss')
  ax2 = ax.twinx()
  ax2.plot(steps, [h.get('sample_accuracy', np.nan) for h in history], color='C1',
           label='accuracy on the sample')
  ax2.set_ylim(0, 1.05)
  ax2.set_ylabel('sample accuracy (eval mode)')
  ax.set_title(f'overfitting {n} examples')
  fig.legend(loc='center right')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


# ---------------------------------------------------------------- 3. learning-rate range


def lr_range(config, dataset, mesh, lr_min: float = 1e-4, lr_max: float = 10.0,
             points: int = 11, steps: int = 100, mode: str = 'grid',
             plot: Optional[str] = None, log: Callable = lambda m: None) -> Result:
  """grid: `points` log-spaced rates, each trained `steps` steps from the same init
  (constant rate, the config's regularization); the recommended rate is the one
  whose loss fell most: the lowest mean loss over the last tenth of its steps,
  against the common loss at step 0. A rate that ends above 1.5x that loss diverged. ramp: one run whose rate grows exponentially from lr_min
  to lr_max over `steps` steps; recommended where the smoothed loss falls fastest."""
  if not 0 < lr_min < lr_max:
    raise UserError(f'lr_range needs 0 < lr_min < lr_max; got {lr_min}, {lr_max}')
  if mode not in ('grid', 'ramp'):
    raise UserError(f'unknown lr_range mode {mode!r}; valid: grid, ramp')
  c = with_overrides(config, {'schedule.name': 'constant', 'schedule.warmup_epochs': 0.0})
  eng = Engine(c, dataset, mesh)
  fn = _lr_grid if mode == 'grid' else _lr_ramp
  return fn(eng, c, lr_min, lr_max, points, steps, plot, log)


def _set_lr(eng: Engine, lr: float) -> None:
  eng.hparams = {**eng.hparams, 'lr': sharding.to_global(np.float32(lr), eng.rep)}


def _lr_grid(eng, c, lr_min, lr_max, points, steps, plot, log):
  window = max(1, steps // 10)
  runs, start = [], time.time()
  for k, lr in enumerate(np.geomspace(lr_min, lr_max, points)):
    _set_lr(eng, lr)
    curve = []

    def on_read(step, loss, acc):
      curve.append((step, loss))
      return not math.isfinite(loss) or loss > 3 * curve[0][1]
    # Step 1's loss is computed before any update: the same initial loss for every
    # rate, which each rate's last window is compared with.
    state, _ = _train(eng, eng.init_state(), 1, 1, on_read)
    if math.isfinite(curve[0][1]):
      _train(eng, state, steps - 1, window, lambda s, l, a: on_read(s + 1, l, a))
    first, last = curve[0][1], curve[-1][1]
    diverged = not math.isfinite(last) or last > 1.5 * first or curve[-1][0] < steps
    drop = (first - last) / first if not diverged else -math.inf
    runs.append({'lr': float(lr), 'curve': curve, 'first_loss': first, 'last_loss': last,
                 'drop': drop, 'diverged': bool(diverged)})
    elapsed = time.time() - start
    log(f'  [{k + 1}/{points}] lr {lr:.3g}: loss {first:.4f} -> {last:.4f}'
        f'{" (diverged)" if diverged else ""} | '
        f'{(k + 1) * steps * c.train.batch_size / elapsed:,.0f} ex/s | ETA '
        f'{metrics.format_duration(elapsed / (k + 1) * (points - k - 1))}')
  ok = [r for r in runs if not r['diverged']]
  best = max(ok, key=lambda r: r['drop']) if ok else None
  numbers = {'mode': 'grid', 'steps': steps, 'runs': runs, 'configured_lr': c.optim.lr,
             'recommended_lr': best['lr'] if best else None}
  plots = [_plot_grid(plot, runs, best if best and best['drop'] >= 0.05 else None)] if plot \
      else []
  diverging = [r['lr'] for r in runs if r['diverged'] and (best is None or r['lr'] > best['lr'])]
  tail = f'; diverged from lr {min(diverging):.3g}' if diverging else ''
  if best is None or best['drop'] < 0.05:
    return Result('lr_range', FAIL, f'no learning rate in [{runs[0]["lr"]:.3g}, '
                  f'{runs[-1]["lr"]:.3g}] lowered the loss by 5% in {steps} steps{tail}: '
                  'check the data and the model (overfit_small) first', numbers, plots)
  what = (f'recommended lr {best["lr"]:.3g} (loss {best["first_loss"]:.3f} -> '
          f'{best["last_loss"]:.3f} in {steps} steps; config has {c.optim.lr:g}){tail}')
  if best is runs[0] or best is runs[-1]:
    return Result('lr_range', WARN, f'{what}; it is at the edge of the range tried: extend '
                  '--lr_min / --lr_max', numbers, plots)
  return Result('lr_range', PASS, what, numbers, plots)


def _lr_ramp(eng, c, lr_min, lr_max, points, steps, plot, log):
  lrs = np.geomspace(lr_min, lr_max, steps)
  state, sums, spe, losses_, smooth, avg = eng.init_state(), eng.zero_sums(), \
      eng.steps_per_epoch, [], [], 0.0
  idx = None
  for step, lr in enumerate(lrs):
    _set_lr(eng, lr)
    if idx is None or step % spe == 0:
      idx = eng.epoch_indices(step // spe)
    state, sums = eng.train_step(state, idx, sums)
    loss = float(jax.device_get(sums['loss']))
    sums = eng.zero_sums()
    if not math.isfinite(loss):
      break
    avg = 0.9 * avg + 0.1 * loss          # bias-corrected exponential average
    smooth.append(avg / (1 - 0.9 ** (step + 1)))
    losses_.append(loss)
    if smooth[-1] > 4 * min(smooth):
      break
  n = len(smooth)
  skip = max(1, n // 10)
  numbers = {'mode': 'ramp', 'steps': steps, 'lrs': lrs[:n].tolist(), 'losses': losses_,
             'smoothed': smooth, 'configured_lr': c.optim.lr, 'recommended_lr': None}
  if n < 2 * skip + 2:
    return Result('lr_range', FAIL, f'the loss diverged after {n} steps of the ramp from '
                  f'{lr_min:g}: lower --lr_min', numbers)
  slope = np.gradient(np.asarray(smooth), np.log(lrs[:n]))
  i = skip + int(np.argmin(slope[skip:n - skip]))
  numbers['recommended_lr'] = float(lrs[i])
  plots = [_plot_ramp(plot, lrs[:n], losses_, smooth, lrs[i])] if plot else []
  if slope[i] >= 0:
    return Result('lr_range', FAIL, f'the loss never fell over the ramp {lr_min:g} -> '
                  f'{lrs[n - 1]:.3g}', numbers, plots)
  return Result('lr_range', PASS, f'recommended lr {lrs[i]:.3g} (steepest fall of the smoothed '
                f'loss; config has {c.optim.lr:g}); the loss blew up at lr {lrs[n - 1]:.3g}'
                if n < steps else f'recommended lr {lrs[i]:.3g} (steepest fall of the smoothed '
                f'loss; config has {c.optim.lr:g})', numbers, plots)


def _plot_grid(path, runs, best):
  plt = _pyplot()
  fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
  ok = [r for r in runs if not r['diverged']]
  a.plot([r['lr'] for r in ok], [r['last_loss'] for r in ok], 'o-', label='loss after the run')
  top = 1.1 * max([max(r['first_loss'], r['last_loss']) for r in ok] or [1.0])
  bad = [r['lr'] for r in runs if r['diverged']]
  if bad:
    a.plot(bad, [top] * len(bad), 'rx', label='diverged (off the scale)')
  if best:
    a.axvline(best['lr'], color='C2', ls='--', label=f'recommended {best["lr"]:.3g}')
  a.set_xscale('log')
  a.set_xlabel('learning rate')
  a.set_ylabel('train loss (last window)')
  a.legend(fontsize=8)
  for r in ok:
    b.plot([s for s, _ in r['curve']], [l for _, l in r['curve']], label=f'{r["lr"]:.2g}')
  b.set_xlabel('step')
  b.set_ylabel('train loss')
  b.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _plot_ramp(path, lrs, raw, smooth, best):
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot(lrs, raw, alpha=0.3, label='loss')
  ax.plot(lrs, smooth, label='smoothed')
  ax.axvline(best, color='C2', ls='--', label=f'recommended {best:.3g}')
  ax.set_xscale('log')
  ax.set_xlabel('learning rate')
  ax.set_ylabel('train loss')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def _pyplot():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


# ---------------------------------------------------------------- 4. activations


def activation_stats(name: str, h: np.ndarray, activation: str) -> Dict[str, Any]:
  """Mean, std, histogram, dead-unit and saturation fractions of one layer's output
  (units: the last axis; a ReLU unit is dead when it is 0 for every example and
  position)."""
  h = np.asarray(h, np.float64)
  finite = np.isfinite(h)
  nonfinite = float(1 - finite.mean()) if h.size else 0.0
  h = np.where(finite, h, 0.0)
  lo, hi = {'tanh': (-1.0, 1.0), 'sigmoid': (0.0, 1.0)}.get(
      activation, (float(h.min()), float(h.max()) if h.max() > h.min() else float(h.min()) + 1))
  counts, edges = np.histogram(h, bins=40, range=(lo, hi))
  units = h.reshape(-1, h.shape[-1])
  stats = {'name': name, 'mean': float(h.mean()), 'std': float(h.std()),
           'hist': counts.tolist(), 'edges': [float(edges[0]), float(edges[-1])],
           'dead': float(np.mean(np.all(units == 0, axis=0))) if activation == 'relu' else 0.0,
           'saturated': 0.0, 'nonfinite': nonfinite}
  if activation == 'tanh':
    stats['saturated'] = float(np.mean(np.abs(h) > 0.99))
  elif activation == 'sigmoid':
    stats['saturated'] = float(np.mean((h < 0.01) | (h > 0.99)))
  return stats


def judge_activations(layers: List[Dict[str, Any]]) -> List[str]:
  """Problems of one snapshot: vanishing or exploding std over depth, saturated
  or dead layers."""
  problems = []
  if not layers:
    return problems
  bad = [l for l in layers if l.get('nonfinite', 0) > 0]
  if bad:
    return [f'non-finite activations (NaN/inf) from {bad[0]["name"]} on: lower optim.lr or the '
            'init scale']
  stds = [l['std'] for l in layers]
  if max(stds) == 0:
    return ['every activation is 0 (no signal: a zeros init?)']
  if len(layers) >= 3 and stds[-1] < 0.1 * stds[0]:
    problems.append(f'vanishing: std falls from {stds[0]:.3g} to {stds[-1]:.3g} over '
                    f'{len(layers)} layers')
  if len(layers) >= 3 and stds[-1] > 10 * stds[0]:
    problems.append(f'exploding: std grows from {stds[0]:.3g} to {stds[-1]:.3g} over '
                    f'{len(layers)} layers')
  sat = [l for l in layers if l['saturated'] > 0.5]
  if sat:
    problems.append(f'saturated: {len(sat)} layer(s) with most units at the flat ends '
                    f'(worst {max(l["saturated"] for l in sat):.0%}, {sat[0]["name"]})')
  dead = [l for l in layers if l['dead'] > 0.5]
  if dead:
    problems.append(f'dead ReLUs: {len(dead)} layer(s) with most units never active '
                    f'(worst {max(l["dead"] for l in dead):.0%}, {dead[0]["name"]})')
  return problems


def activations(config, dataset, mesh, steps: int = 20, examples: int = 256,
                plot: Optional[str] = None) -> Result:
  """Per-layer activation statistics for the configured init at step 0 and after
  `steps` train steps (regularization off), on the first `examples` images in
  training mode (batch statistics). WARN on vanishing / exploding std, saturation
  or dead ReLUs, as in the lectures' deep-tanh demonstration."""
  c = plain(config)
  eng = Engine(c, dataset, mesh)
  x, _ = _inputs(dataset, examples)
  names: List[str] = []

  @jax.jit
  def capture(state, x):
    acts = models.activations(eng.model, {'params': state.params,
                                          'batch_stats': state.batch_stats}, x)
    names[:] = [n for n, _ in acts]
    return [a for _, a in acts]

  act = c.model.activation
  state = eng.init_state()
  snapshots = {'init': [activation_stats(n, a, act)
                        for n, a in zip(names, jax.device_get(capture(state, x)))]}
  if steps:
    state, _ = _train(eng, state, steps, steps)
    snapshots[f'step {steps}'] = [activation_stats(n, a, act)
                                  for n, a in zip(names, jax.device_get(capture(state, x)))]
  problems = {k: judge_activations(v) for k, v in snapshots.items()}
  stds = ', '.join(f'{l["std"]:.2g}' for l in snapshots['init'])
  numbers = {'activation': act, 'init': c.model.init, 'layers': names,
             'snapshots': snapshots, 'problems': problems}
  plots = [_plot_activations(plot, snapshots, c)] if plot else []
  found = [f'{k}: {p}' for k, ps in problems.items() for p in ps]
  if found:
    return Result('activations', WARN, '; '.join(found) + f' (std per layer at init: {stds})',
                  numbers, plots)
  return Result('activations', PASS, f'{len(names)} layers; std per layer at init: {stds}',
                numbers, plots)


def _plot_activations(path, snapshots, c, max_layers: int = 10):
  plt = _pyplot()
  n = len(next(iter(snapshots.values())))
  show = sorted(set(np.linspace(0, n - 1, min(n, max_layers)).round().astype(int).tolist()))
  rows = len(snapshots) + 1
  fig, axes = plt.subplots(rows, len(show), figsize=(1.9 * len(show) + 1, 2.0 * rows),
                           squeeze=False)
  for r, (label, layers) in enumerate(snapshots.items()):
    for col, i in enumerate(show):
      l, ax = layers[i], axes[r][col]
      edges = np.linspace(l['edges'][0], l['edges'][1], len(l['hist']) + 1)
      ax.bar(edges[:-1], l['hist'], width=np.diff(edges), align='edge')
      ax.set_yticks([])
      ax.set_title(f'{l["name"]}\nmean {l["mean"]:.2g} std {l["std"]:.2g}', fontsize=7)
      ax.tick_params(labelsize=6)
      if col == 0:
        ax.set_ylabel(label)
  for col in range(len(show)):
    axes[-1][col].axis('off')
  ax = fig.add_subplot(rows, 1, rows)
  for label, layers in snapshots.items():
    ax.plot(range(1, n + 1), [l['std'] for l in layers], 'o-', label=label)
  ax.set_yscale('symlog', linthresh=1e-4)
  ax.set_xlabel('layer')
  ax.set_ylabel('std')
  ax.legend(fontsize=7)
  fig.suptitle(f'activations: {c.model.name}, {c.model.activation}, init {c.model.init}'
               f'{" " + str(c.model.init_scale) if c.model.init in ("normal", "uniform", "constant") else ""}',
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


# ---------------------------------------------------------------- 5. gradient check


def check_gradient(f: Callable, params, h: float = 1e-6, seed: int = 0) -> Dict[str, Any]:
  """Analytic vs centred finite-difference gradient of the scalar f(params), in
  float64, along one random unit direction per parameter tensor:
  a = <grad f, v>, n = (f(p + h v) - f(p - h v)) / 2h (with h and h/10). Returns the relative error
  max|a-n| / max(|a|+|n|) (domain.md section 9) and the worst tensor's own."""
  leaves, treedef = jax.tree.flatten(params)
  if any(l.dtype != jnp.float64 for l in leaves):
    raise ValueError('check_gradient needs float64 parameters (inside jax.enable_x64)')
  f = jax.jit(f)
  grads = jax.tree.leaves(jax.jit(jax.grad(f))(params))
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  rng = np.random.default_rng(seed)
  rows = []
  for i, (leaf, g) in enumerate(zip(leaves, grads)):
    v = rng.standard_normal(leaf.shape)
    v /= np.linalg.norm(v) or 1.0
    shifted = lambda s: jax.tree.unflatten(treedef, [l + s * v if j == i else l
                                                     for j, l in enumerate(leaves)])
    a = float(jnp.sum(g * v))
    # Two step sizes, the closer one counts: a ReLU / max-pool kink crossed by the
    # larger step is rarely crossed by the smaller, a wrong derivative is off at both.
    n = min((float((f(shifted(s)) - f(shifted(-s))) / (2 * s)) for s in (h, h / 10)),
            key=lambda d: abs(d - a))
    rows.append({'param': names[i], 'analytic': a, 'numeric': n})
  diff = max(abs(r['analytic'] - r['numeric']) for r in rows)
  scale = max(abs(r['analytic']) + abs(r['numeric']) for r in rows)
  for r in rows:   # a tensor's own error, against a floor for near-zero gradients
    r['relative_error'] = abs(r['analytic'] - r['numeric']) / max(
        abs(r['analytic']) + abs(r['numeric']), 1e-6 * scale, 1e-300)
  worst_row = max(rows, key=lambda r: r['relative_error'])
  return {'relative_error': diff / max(scale, 1e-300), 'worst_param': worst_row['param'],
          'worst_param_error': worst_row['relative_error'], 'tensors': len(rows), 'rows': rows}


def small_instance(config):
  """The configured model at width <= 8 (same depth, activation, norm, init), no
  train-time randomness: a float64 gradient check stays cheap."""
  c = plain(config)
  return with_overrides(c, {'model.width': min(c.model.width, 8)})


def grad_check(config, dataset, examples: int = 4, h: float = 1e-6) -> Result:
  """check_gradient on the objective of a small instance of the configured model
  (data loss + L2 + L1 penalties, batch statistics) on `examples` training images,
  at its initialization with every parameter jittered by 1e-3.
  FAIL above 1e-4 (a bug), WARN above 1e-7 (kinks such as ReLU or max-pool can
  explain it), PASS below."""
  c = small_instance(config)
  reg = config.regularize
  with jax.enable_x64(True):
    model = models.build(c.model, dataset.num_classes, None, dtype=jnp.float64)
    x, y = _inputs(dataset, examples, np.float64)
    variables = model.init(jax.random.PRNGKey(c.seed), x[:1], train=False)
    # Jittered by 1e-3 so that no unit sits exactly on a kink: a bias of 0 under an
    # all-zero (dead ReLU) input puts a pre-activation at exactly 0, where the
    # finite difference sees half the slope and the derivative none.
    jitter = np.random.default_rng(c.seed)
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64) + 1e-3 * jitter.standard_normal(
        p.shape), variables['params'])
    batch_stats = variables.get('batch_stats', {})
    targets = jax.nn.one_hot(y, dataset.num_classes, dtype=jnp.float64)
    mask = optim.decay_mask(params, reg.decay_all_params)

    def objective(p):
      logits, _ = model.apply({'params': p, 'batch_stats': batch_stats}, x, train=True,
                              mutable=['batch_stats'])
      value = losses.loss(c.train.loss, logits, targets).mean()
      if reg.l2:
        value += reg.l2 * optim.l2_penalty(p, mask)
      if reg.l1:
        value += reg.l1 * regularize.l1_penalty(p, mask)
      return value
    out = check_gradient(objective, params, h)
  err = out['relative_error']
  numbers = {k: v for k, v in out.items()}
  numbers.update(model=c.model.name, width=c.model.width, depth=c.model.depth, h=h,
                 examples=examples)
  what = (f'relative error {err:.2e} over {out["tensors"]} parameter tensors of '
          f'{c.model.name} (width {c.model.width}, float64); worst {out["worst_param"]} '
          f'{out["worst_param_error"]:.2e}')
  verdict = FAIL if not math.isfinite(err) or err > 1e-4 else WARN if err > 1e-7 else PASS
  if verdict == PASS and out['worst_param_error'] > 1e-4:   # wrong, but in a small gradient
    verdict = WARN
  hint = {FAIL: ': the analytic gradient is wrong (a custom gradient, a stop_gradient, or a '
                'non-differentiable op)',
          WARN: ': above 1e-7; kinks (ReLU, max-pool, hinge) crossed by the step can explain it',
          PASS: ''}[verdict]
  return Result('grad_check', verdict, what + hint, numbers)


# ---------------------------------------------------------------- 6. learning curves


def curves(path: str, plot: Optional[str] = None) -> Result:
  """lib/curves.py on the run at `path`, or on every run of the sweep at `path`."""
  import os
  from lib import curves as curves_lib
  from lib.rundir import RunDir
  runs = curves_lib.find_runs(path)
  if not runs:
    raise UserError(f'no run under {path} has a metrics.jsonl: pass a run or sweep directory '
                    'to --curves_from')
  series, findings = {}, {}
  for run in runs:
    name = os.path.relpath(run, path) if run != path else os.path.basename(os.path.normpath(run))
    try:
      series[name] = RunDir(run).read_metrics()
    except ValueError:   # a run killed while appending: its last line is partial
      series[name] = _read_complete(os.path.join(run, 'metrics.jsonl'))
    findings[name] = curves_lib.diagnose(series[name])
  short = {k: v for k, v in series.items() if len(v) < 4}
  numbers = {'path': path, 'runs': {k: {'evaluations': len(series[k]), 'findings': findings[k]}
                                    for k in series}}
  plots = [curves_lib.plot(plot, series, findings)] if plot else []
  flagged = {k: v for k, v in findings.items() if v}
  if len(short) == len(series):
    return Result('curves', WARN, f'no run under {path} has 4 or more evaluations: nothing to '
                  'judge yet', numbers, plots)
  if not flagged:
    note = f' ({len(short)} with fewer than 4 evaluations, not judged)' if short else ''
    return Result('curves', PASS, f'{len(runs)} run(s): no problem found{note}', numbers, plots)
  parts = [f'{k}: ' + '; '.join(f'{f["finding"]} ({f["evidence"]}; {f["advice"]})' for f in v)
           for k, v in flagged.items()]
  return Result('curves', WARN, f'{len(flagged)} of {len(runs)} run(s) flagged. ' +
                ' | '.join(parts), numbers, plots)


def _read_complete(path: str) -> List[Dict[str, Any]]:
  import json
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except ValueError:
        pass
  return out


# ---------------------------------------------------------------- running checks


CHECKS = ('initial_loss', 'overfit_small', 'lr_range', 'activations', 'grad_check', 'curves')
NEEDS_CONFIG = CHECKS[:5]


def run(checks: List[str], workdir: str, config=None, curves_from: Optional[str] = None,
        options: Optional[Dict[str, Any]] = None, mesh=None, log=print) -> List[Result]:
  """Runs `checks` in recipe order, printing a PASS / WARN / FAIL line per check;
  writes W/diagnose.json and the PNGs (an earlier diagnose.json and its PNGs are
  moved to W/archive/<time>/ first, never overwritten)."""
  import json
  import os
  from lib import data
  unknown = [c for c in checks if c not in CHECKS]
  if unknown:
    raise UserError(f'unknown check {unknown[0]!r}; valid: {", ".join(CHECKS)}')
  if config is None and any(c in NEEDS_CONFIG for c in checks):
    raise UserError(f'checks {", ".join(c for c in checks if c in NEEDS_CONFIG)} need '
                    '--config=experiments/<x>.py')
  if 'curves' in checks and not curves_from:
    raise UserError('the curves check needs --curves_from=<run or sweep directory>')
  o = options or {}
  _check_options(o)
  config = config_lib.resolve(config) if config is not None else None
  needs_data = any(c in NEEDS_CONFIG for c in checks)
  dataset = data.load(config.data) if needs_data else None   # may fail: nothing written yet
  if 'overfit_small' in checks:
    need = o.get('overfit_batches', 5) * config.train.batch_size
    if len(dataset.train[1]) < need:
      raise UserError(f'overfit_small needs {need} training images ({o.get("overfit_batches", 5)}'
                      f' batches of {config.train.batch_size}); the dataset has '
                      f'{len(dataset.train[1])}: lower --overfit_batches')
  mesh = mesh if mesh is not None else (sharding.make_mesh() if needs_data else None)
  _archive(workdir)
  os.makedirs(workdir, exist_ok=True)
  png = lambda name: os.path.join(workdir, name)
  calls = {
      'initial_loss': lambda: initial_loss(config, dataset, mesh),
      'overfit_small': lambda: overfit_small(config, dataset, mesh,
                                             o.get('overfit_batches', 5),
                                             o.get('overfit_steps', 1000),
                                             plot=png('overfit_small.png'), log=log),
      'lr_range': lambda: lr_range(config, dataset, mesh, o.get('lr_min', 1e-4),
                                   o.get('lr_max', 10.0), o.get('lr_points', 11),
                                   o.get('lr_steps', 100), o.get('lr_mode', 'grid'),
                                   plot=png('lr_range.png'), log=log),
      'activations': lambda: activations(config, dataset, mesh, o.get('activation_steps', 20),
                                         plot=png('activations.png')),
      'grad_check': lambda: grad_check(config, dataset),
      'curves': lambda: curves(curves_from, plot=png('curves.png')),
  }
  results = []
  for name in [c for c in CHECKS if c in checks]:
    log(f'running {name} ...')
    result = calls[name]()
    results.append(result)
    log(result.line())
  record = {'config': config_lib.to_json_dict(config) if config is not None else None,
            'curves_from': curves_from, 'options': o,
            'verdict': worst(r.verdict for r in results),
            'checks': [dataclasses.asdict(r) for r in results]}
  with open(os.path.join(workdir, 'diagnose.json'), 'w') as f:
    json.dump(_strict(record), f, indent=1, default=float, allow_nan=False)
    f.write('\n')
  plots = [p for r in results for p in r.plots]
  log(f'{sum(r.verdict == PASS for r in results)} passed, {sum(r.verdict == WARN for r in results)}'
      f' warned, {sum(r.verdict == FAIL for r in results)} failed; wrote '
      f'{os.path.join(workdir, "diagnose.json")}' + ''.join(f', {p}' for p in plots))
  return results


def _strict(x):
  """JSON without NaN / Infinity (null instead), which strict readers reject."""
  if isinstance(x, dict):
    return {k: _strict(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_strict(v) for v in x]
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(x) else None
  if isinstance(x, np.integer):
    return int(x)
  return x


def _check_options(o: Dict[str, Any]) -> None:
  positive = ('overfit_batches', 'overfit_steps', 'lr_points', 'lr_steps')
  for key in positive:
    if key in o and o[key] <= 0:
      raise UserError(f'--{key}={o[key]} must be positive')
  if o.get('lr_points', 2) < 2 and o.get('lr_mode', 'grid') == 'grid':
    raise UserError(f'--lr_points={o["lr_points"]} must be at least 2')
  if o.get('activation_steps', 0) < 0:
    raise UserError(f'--activation_steps={o["activation_steps"]} must be >= 0')
  if not 0 < o.get('lr_min', 1e-4) < o.get('lr_max', 10.0):
    raise UserError(f'--lr_min and --lr_max need 0 < lr_min < lr_max; got {o.get("lr_min")}, '
                    f'{o.get("lr_max")}')
  if o.get('lr_mode', 'grid') not in ('grid', 'ramp'):
    raise UserError(f'unknown --lr_mode={o["lr_mode"]}; valid: grid, ramp')


def _archive(workdir: str) -> None:
  """Moves every file this command would write (diagnose.json, the check PNGs)
  that already exists to W/archive/diagnose-<time>/."""
  import datetime
  import os
  import shutil
  names = ['diagnose.json'] + [f'{c}.png' for c in CHECKS]
  if not any(os.path.exists(os.path.join(workdir, n)) for n in names):
    return
  dest = os.path.join(workdir, 'archive',
                      datetime.datetime.now().strftime('diagnose-%Y%m%d-%H%M%S-%f'))
  os.makedirs(dest)
  for name in names:
    if os.path.exists(os.path.join(workdir, name)):
      shutil.move(os.path.join(workdir, name), os.path.join(dest, name))
