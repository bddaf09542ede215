"""The activations check: per-layer statistics of every activation layer at init and
after a few steps, as in the lectures' deep-tanh demonstration."""
from typing import Any, Dict, List, Optional

import jax
import numpy as np

from lib.diagnostics.checks import PASS, Result, WARN, inputs, plain, pyplot, train_steps
from lib.model import models
from lib.training.engine import Engine


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
  x, _ = inputs(dataset, examples)
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
    state, _ = train_steps(eng, state, steps, steps)
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
  plt = pyplot()
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
