"""Where metrics go: W/metrics.jsonl, TensorBoard (tensorboardX), the console."""
import datetime
import sys
from typing import Any, Dict, Optional

from tensorboardX import SummaryWriter
from tensorboardX.summary import hparams as hparams_summaries

from lib.runs.rundir import RunDir

# metrics.jsonl keys that are not TensorBoard scalars.
_NOT_SCALARS = ('step',)
# Scalars the HParams tab shows next to each run's hyperparameters.
HPARAM_METRICS = ('val_accuracy', 'val_loss', 'train_eval_accuracy', 'train_eval_loss')


class MetricsWriter:
  """Appends evaluation records to metrics.jsonl and the same scalars to TensorBoard.

  On resume TensorBoard events past the restored step are purged, so curves
  show one clean line.
  """

  def __init__(self, rundir: RunDir, purge_step: Optional[int] = None):
    self.rundir = rundir
    self.tb = SummaryWriter(logdir=rundir.tb_dir, purge_step=purge_step)

  def write(self, row: Dict[str, Any]) -> None:
    self.rundir.append_metrics(row)
    for key, value in row.items():
      if key not in _NOT_SCALARS and isinstance(value, (int, float)):
        self.tb.add_scalar(key, value, global_step=row['step'])
    self.tb.flush()

  def hparams(self, values: Dict[str, Any]) -> None:
    """The run's hyperparameters for TensorBoard's HParams tab, tied to the scalars
    this writer logs (tensorboard --logdir SWEEP compares every run of a sweep)."""
    clean = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
             for k, v in values.items()}
    for summary in hparams_summaries(clean, dict.fromkeys(HPARAM_METRICS, 0.0)):
      self.tb.file_writer.add_summary(summary)
    self.tb.flush()

  def histograms(self, step: int, params: Any, activations) -> None:
    """Histograms of every parameter tensor ('weights/<path>') and of every
    activation layer ('activations/<name>') at `step` (train.tb_histograms)."""
    import jax
    import numpy as np
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
      name = '/'.join(str(getattr(k, 'key', k)) for k in path)
      self.tb.add_histogram(f'weights/{name}', np.asarray(leaf, np.float32), global_step=step)
    for name, value in activations:
      self.tb.add_histogram(f'activations/{name}', np.asarray(value, np.float32),
                            global_step=step)
    self.tb.flush()

  def close(self) -> None:
    self.tb.close()


def format_duration(seconds: float) -> str:
  return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def progress_line(step: int, total: int, steps_per_epoch: int, train_loss: float,
                  train_accuracy: float, lr: float, examples_per_sec: float,
                  eta_seconds: float) -> str:
  return (f'step {step:>{len(str(total))}}/{total} | epoch {step / steps_per_epoch:6.2f} | '
          f'train_loss {train_loss:.4f} train_acc {train_accuracy:.4f} | lr {lr:.3g} | '
          f'{examples_per_sec:,.0f} ex/s | ETA {format_duration(eta_seconds)}')


def echo(message: str) -> None:
  print(message, file=sys.stdout, flush=True)
