"""The six-step tuning recipe (docs: domain.md section 1) as checks on a config.

  initial_loss   loss at step 0, regularization off, against ln C (cross-entropy) or C-1 (hinge)
  overfit_small  a few batches, every regularizer and augmentation off, trained to 100%
  lr_range       log-spaced learning rates for ~100 steps each (or one exponential ramp)
  activations    per-layer activation statistics at init and after a few steps
  grad_check     analytic vs centred finite-difference gradients, float64, small instance
  curves         diagnoses of a run's learning curves (lib/diagnostics/curves.py)

Each check returns a `Result`: PASS / WARN / FAIL, one line with the numbers behind it,
the numbers themselves and the PNGs it wrote. Checks that train use the same compiled
step as launch.train (`lib/training/engine.py`), on the same mesh.
"""
import dataclasses
import math
import time
from typing import Any, Callable, Dict, List, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lib.core import sharding
from lib.core import config as config_lib
from lib.diagnostics.activation_check import activation_stats, activations, judge_activations  # noqa: F401
from lib.runs import metrics
from lib.training import losses
from lib.diagnostics.checks import (FAIL, PASS, WARN, Result, inputs, plain, pyplot,  # noqa: F401
                        train_steps, with_overrides, worst)
from lib.core.errors import UserError
from lib.diagnostics.gradcheck import check_gradient, grad_check, small_instance  # noqa: F401
from lib.training import resolve as resolve_lib
from lib.training.engine import Engine


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
  x, y = inputs(dataset, examples)
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
    state, done = train_steps(eng, state, n_steps, n_steps, on_read)
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
  plt = pyplot()
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
    state, _ = train_steps(eng, eng.init_state(), 1, 1, on_read)
    if math.isfinite(curve[0][1]):
      train_steps(eng, state, steps - 1, window, lambda s, l, a: on_read(s + 1, l, a))
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
  plt = pyplot()
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
  plt = pyplot()
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


# ---------------------------------------------------------------- 6. learning curves


def curves(path: str, plot: Optional[str] = None) -> Result:
  """lib/diagnostics/curves.py on the run at `path`, or on every run of the sweep at `path`."""
  import os
  from lib.diagnostics import curves as curves_lib
  from lib.runs.rundir import RunDir
  runs = curves_lib.find_runs(path)
  if not runs:
    raise UserError(f'no run under {path} has a metrics.jsonl: pass a run or sweep directory '
                    'to --curves_from')
  series, findings = {}, {}
  for run in runs:
    name = os.path.relpath(run, path) if run != path else os.path.basename(os.path.normpath(run))
    series[name] = RunDir(run).read_metrics()
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
  from lib.data import datasets as data
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
  config = resolve_lib.resolve(config) if config is not None else None
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
