"""The plots of a sweep's report:

  W/curves.png    train (train_eval where recorded, else running) and val accuracy per arm
                  (mean over seeds) against epochs
  W/accuracy.png  each arm's mean with its 95% CI, and every seed
  W/search.png    searches: (log lr, log wd) or the first two searched keys, coloured by
                  val accuracy
"""
import math
import os
from typing import List, Tuple

import numpy as np

from lib.sweeps.stats import NAN, _finite


def _train_curve(curves) -> Tuple[str, str]:
  """(metrics key, title) of the train-accuracy panel: train_eval_accuracy where every
  plotted evaluation has it, else the running mean (train_accuracy in older runs)."""
  records = [row for c in curves for row in c]
  if records and all(_finite(row.get('train_eval_accuracy')) for row in records):
    return 'train_eval_accuracy', 'train accuracy (fixed train subset, eval mode)'
  if records and all('running_train_accuracy' in row for row in records):
    return 'running_train_accuracy', 'train accuracy (running mean, augmented)'
  return 'train_accuracy', 'train accuracy (running mean, augmented)'


def _plots(workdir, rows, summary, metric, manifest) -> List[str]:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  names = []
  ranked = [e['arm'] for e in summary if e['n']][:10]   # the top ten arms, for legibility
  if ranked:
    plotted = [r['_curve'] for r in rows if r['arm'] in ranked and r['status'] == 'done']
    train_key, train_title = _train_curve(plotted)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for arm in ranked:
      curves = [r['_curve'] for r in rows if r['arm'] == arm and r['status'] == 'done']
      n = min(len(c) for c in curves)
      epochs = [row['epoch'] for row in curves[0][:n]]
      for ax, key in zip(axes, (train_key, 'val_accuracy')):
        y = np.mean([[row.get(key, NAN) for row in c[:n]] for c in curves], axis=0)
        ax.plot(epochs, y, label=arm)
    for ax, title in zip(axes, (train_title, 'val accuracy')):
      ax.set_title(title)
      ax.set_xlabel('epoch')
      ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle('mean over seeds')
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, 'curves.png'), dpi=100)
    plt.close(fig)
    names.append('curves.png')

    fig, ax = plt.subplots(figsize=(7, 0.45 * len(ranked) + 1.5))
    for i, e in enumerate(e for e in summary if e['arm'] in ranked):
      ax.scatter(e['values'], [i] * len(e['values']), color='gray', s=12, zorder=2)
      err = e['ci'] if _finite(e['ci']) else 0
      ax.errorbar(e['mean'], i, xerr=err, fmt='o', color='C0', capsize=4, zorder=3)
    ax.set_yticks(range(len(ranked)))
    ax.set_yticklabels(ranked)
    ax.invert_yaxis()
    ax.set_xlabel(f'{metric.replace("_", " ")}: mean, 95% CI, seeds (gray)')
    ax.grid(axis='x', alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, 'accuracy.png'), dpi=100)
    plt.close(fig)
    names.append('accuracy.png')

  keys = (manifest or {}).get('searched_keys', [])
  if manifest and manifest['kind'] in ('search_space', 'grid') and len(keys) >= 2:
    x_key, y_key = (('optim.lr', 'optim.weight_decay') if {'optim.lr', 'optim.weight_decay'}
                    <= set(keys) else keys[:2])
    pts = [(r[x_key], r[y_key], r['best_val_accuracy'], r['stage']) for r in rows
           if r['status'] == 'done' and _finite(r['best_val_accuracy'])]
    pts = [p for p in pts if isinstance(p[0], (int, float)) and isinstance(p[1], (int, float))]
    if pts:
      fig, ax = plt.subplots(figsize=(6, 4.5))
      log = lambda v: math.log10(v) if v > 0 else NAN
      for stage, marker in ((1, 'o'), (2, '^')):
        s = [p for p in pts if p[3] == stage]
        if s:
          sc = ax.scatter([log(p[0]) for p in s], [log(p[1]) for p in s], c=[p[2] for p in s],
                          marker=marker, cmap='viridis', vmin=min(p[2] for p in pts),
                          vmax=max(p[2] for p in pts), s=50, edgecolors='k',
                          label='coarse' if stage == 1 else 'fine')
      fig.colorbar(sc, label='best val accuracy')
      ax.set_xlabel(f'log10 {x_key}')
      ax.set_ylabel(f'log10 {y_key}')
      if any(p[3] == 2 for p in pts):
        ax.legend()
      fig.tight_layout()
      fig.savefig(os.path.join(workdir, 'search.png'), dpi=100)
      plt.close(fig)
      names.append('search.png')
  return names
