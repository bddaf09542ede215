"""Draws docs/architecture.png: the data flow of a run and the package map of lib/.

  python docs/architecture.py

The package map is read from the tree (lib/<package>/*.py with their line counts),
so rerunning it after adding a module keeps the picture true.
"""
import os

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Lowest floor first: a package imports only the floors below it.
FLOORS = [['core'], ['data', 'model'], ['training'], ['runs'], ['sweeps', 'diagnostics']]
FLOW = [
    ('experiment module', 'experiments/*.py: get_config(arg), get_sweep(arg)'),
    ('resolved config', 'training/resolve.py: every key checked; core/factors.py: the factors'),
    ('data', 'data/datasets.py: arrays or record sources, statistics;\n'
             'data/device.py: resident or streamed (stream.py, grain) batches'),
    ('compiled step', 'training/engine.py (one run), vector_engine.py (arms):\n'
                      'augment -> model -> loss + penalties -> optimizer'),
    ('the loop', 'runs/loop.py: steps, evaluation cadence, early stopping, divergence'),
    ('run directory', 'runs/runbook.py: metrics.jsonl, TensorBoard, status.json,\n'
                      'Orbax checkpoints (runs/checkpoint.py), lock, provenance'),
    ('report', 'sweeps/report.py: report.md; collect.py: results.csv;\n'
              'stats.py: CIs, paired tests; plots.py: curves.png'),
]


def modules(package):
  folder = os.path.join(ROOT, 'lib', package)
  out = []
  for name in sorted(os.listdir(folder)):
    if name.endswith('.py') and name != '__init__.py':
      with open(os.path.join(folder, name)) as f:
        out.append((name[:-3], sum(1 for _ in f)))
  return out


def box(ax, x, y, w, h, title, body, color):
  ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle='round,pad=0.01,rounding_size=0.015',
                              fc=color, ec='#333333', lw=1))
  ax.text(x + 0.015, y + h - 0.012, title, weight='bold', fontsize=9.5, va='top')
  ax.text(x + 0.015, y + h - 0.042, body, fontsize=7.8, va='top', family='monospace')


def arrow(ax, a, b):
  ax.add_patch(FancyArrowPatch(a, b, arrowstyle='-|>', mutation_scale=12, lw=1.2,
                               color='#333333'))


def main():
  fig, (left, right) = plt.subplots(1, 2, figsize=(15, 8.6),
                                    gridspec_kw={'width_ratios': [1, 1.1]})
  for ax in (left, right):
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.axis('off')
  left.set_title('A run: config -> data -> step -> metrics / checkpoints -> report', fontsize=11)
  h, gap = 0.105, 0.033
  for i, (title, body) in enumerate(FLOW):
    y = 1 - (i + 1) * (h + gap) + gap / 2
    box(left, 0.02, y, 0.96, h, title, body, '#e8f0fa' if i % 2 else '#f5f5f5')
    if i:
      arrow(left, (0.5, y + h + gap - 0.004), (0.5, y + h + 0.004))

  right.set_title('lib/ by floor: each package imports only the floors below it', fontsize=11)
  fh, fgap = 0.17, 0.025
  colors = ['#f5f5f5', '#eef7ea', '#e8f0fa', '#fdf1e4', '#f3eafa']
  for level, packages in enumerate(FLOORS):
    y = level * (fh + fgap) + 0.02
    width = 0.96 / len(packages)
    for j, package in enumerate(packages):
      mods = modules(package)
      lines, row = [], ''
      for name, n in mods:
        item = f'{name} {n}'
        if len(row) + len(item) > (62 if len(packages) == 1 else 28):
          lines.append(row.rstrip(', '))
          row = ''
        row += item + ', '
      lines.append(row.rstrip(', '))
      box(right, 0.02 + j * width, y, width - 0.02, fh, f'lib/{package}/',
          '\n'.join(lines), colors[level])
    if level:
      arrow(right, (0.5, y + 0.002), (0.5, y - fgap + 0.004))
  right.text(0.02, 1.0, 'launch/ (thin absl entry points) sits on top; numbers are lines',
             fontsize=8, va='top')
  fig.tight_layout()
  out = os.path.join(ROOT, 'docs', 'architecture.png')
  fig.savefig(out, dpi=110)
  print(out)


if __name__ == '__main__':
  main()
