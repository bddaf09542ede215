"""Steps 2 and 3 of the tuning recipe (lib/diagnostics/diagnose.py), the checks of the
training dynamics, each with its plot:

  overfit_small  a few batches, every regularizer and augmentation off, trained to 100%
  lr_range       log-spaced learning rates for ~100 steps each (or one exponential ramp)

Both train with the same compiled step as launch.train (`lib/training/engine.py`), on
the same mesh.
"""
import dataclasses
import math
import time
from typing import Callable, Optional

import jax
import numpy as np

from lib.core import sharding
from lib.core.errors import UserError
from lib.diagnostics.checks import (FAIL, PASS, WARN, Result, plain, pyplot, train_steps,
                                    with_overrides)
from lib.runs import metrics
from lib.training.engine import Engine


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
