"""Where metrics go: W/metrics.jsonl, TensorBoard (tensorboardX), the console."""
import datetime
import sys
from typing import Any, Dict, Optional

from tensorboardX import SummaryWriter

from lib.rundir import RunDir

# metrics.jsonl keys that are not TensorBoard scalars.
_NOT_SCALARS = ('step',)


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
