"""A self-describing run directory.

  W/config.json      the resolved config        W/status.json  running|done|diverged|failed
  W/metrics.jsonl    one record per evaluation  W/tb/          TensorBoard events
  W/checkpoints/     Orbax checkpoints          W/archive/     earlier runs moved aside by
  W/provenance.json  what produced the run                     --fresh, unreadable checkpoints
  W/lock.json        the process training it (lib/runs/lock.py), while one does

Nothing here deletes results: starting fresh in a used workdir moves the old
files into W/archive/<timestamp>/.
"""
import datetime
import json
import os
import shutil
from typing import Any, Dict, List, Optional

from lib.core import config as config_lib
from lib.core.errors import UserError
from lib.runs import faults

RUN_FILES = ('config.json', 'status.json', 'metrics.jsonl', 'tb', 'checkpoints',
             'provenance.json')
# metrics.jsonl names of runs written before the running train figures were renamed.
LEGACY_METRICS = {'train_loss': 'running_train_loss', 'train_accuracy': 'running_train_accuracy'}


class RunDir:

  def __init__(self, path: str):
    self.path = path
    self.config_path = os.path.join(path, 'config.json')
    self.status_path = os.path.join(path, 'status.json')
    self.metrics_path = os.path.join(path, 'metrics.jsonl')
    self.tb_dir = os.path.join(path, 'tb')
    self.checkpoint_dir = os.path.join(path, 'checkpoints')
    self.archive_dir = os.path.join(path, 'archive')
    self.provenance_path = os.path.join(path, 'provenance.json')

  def has_run(self) -> bool:
    return os.path.exists(self.config_path)

  def read_config(self) -> Dict[str, Any]:
    if not self.has_run():
      raise UserError(f'no run in {self.path}: config.json is missing (is --workdir right?)')
    with open(self.config_path) as f:
      return json.load(f)

  def check_config(self, config_dict: Dict[str, Any], fresh: bool) -> bool:
    """True if the workdir holds a run of this same config (resume). Reads only."""
    if not self.has_run():
      return False
    differences = config_lib.diff(self.read_config(), config_dict)
    if differences and not fresh:
      raise UserError(
          f'workdir {self.path} holds a run of another config ({"; ".join(differences)}); '
          'use another --workdir, or pass --fresh to archive that run and start over')
    return not fresh

  def archive(self) -> str:
    """Moves the run's files to archive/<time>/. config.json goes last: a kill half-way
    leaves a directory that still says it holds a run (and --fresh again finishes the
    move), never run files without their config that a new run would start over."""
    dest = os.path.join(self.archive_dir, timestamp())
    os.makedirs(dest)
    for name in sorted(RUN_FILES, key=lambda n: n == 'config.json'):
      if os.path.exists(os.path.join(self.path, name)):
        shutil.move(os.path.join(self.path, name), os.path.join(dest, name))
    return dest

  def orphans(self) -> List[str]:
    """Run files present without a config.json (what a new run must not start over).
    A status.json alone is not one: a run that failed before it started (its data
    missing, say) records that, and a rerun simply starts."""
    return [n for n in RUN_FILES if n not in ('config.json', 'status.json') and
            os.path.exists(os.path.join(self.path, n))] if not self.has_run() else []

  def write_config(self, config_dict: Dict[str, Any]) -> None:
    os.makedirs(self.path, exist_ok=True)
    write_json(self.config_path, config_dict)

  def set_status(self, status: str, reason: str = '', **extra) -> None:
    record = {'status': status, 'reason': reason,
              'updated': datetime.datetime.now().isoformat(timespec='seconds'), **extra}
    faults.hit('status_write', self.status_path)
    write_json(self.status_path, record)

  def read_status(self) -> Dict[str, Any]:
    if not os.path.exists(self.status_path):
      return {}
    with open(self.status_path) as f:
      return json.load(f)

  def read_metrics(self) -> List[Dict[str, Any]]:
    """The rows of metrics.jsonl (a partial last line, left by a kill mid-append, is
    skipped), with the names of today (LEGACY_METRICS renamed)."""
    return [{LEGACY_METRICS.get(k, k): v for k, v in row.items()} for row in self._rows()[0]]

  def _rows(self):
    """(rows as written, the file's text)."""
    if not os.path.exists(self.metrics_path):
      return [], ''
    with open(self.metrics_path) as f:
      text = f.read()
    lines = [line for line in text.splitlines() if line.strip()]
    rows = [json.loads(line) for line in lines[:-1]]
    try:   # a process killed while appending leaves a partial last line
      rows += [json.loads(line) for line in lines[-1:]]
    except ValueError:
      pass
    return rows, text

  def append_metrics(self, row: Dict[str, Any]) -> None:
    line = json.dumps(row) + '\n'
    with open(self.metrics_path, 'a') as f:
      def half():   # a kill in the middle of the write (lib/runs/faults.py)
        f.write(line[:len(line) // 2])
        f.flush()
      faults.hit('metrics_write', self.metrics_path, before_kill=half)
      f.write(line)

  def drop_metrics_after(self, step: int) -> None:
    """On resume: rows past the restored checkpoint are dropped (they are recomputed,
    identically), and so is a partial last line, so that the next row starts a line
    of its own. The file is rewritten (atomically) only if that changes it."""
    rows, text = self._rows()
    kept = ''.join(json.dumps(r) + '\n' for r in rows if r['step'] <= step)
    if kept != text:
      tmp = self.metrics_path + '.tmp'
      with open(tmp, 'w') as f:
        f.write(kept)
      os.replace(tmp, self.metrics_path)


def timestamp() -> str:
  """A name for an archived item: the local time to the microsecond."""
  return datetime.datetime.now().strftime('%Y%m%d-%H%M%S-%f')


def read_json(path: str) -> Optional[Dict[str, Any]]:
  """The JSON object in `path`; None if there is no such file."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_json(path: str, obj: Dict[str, Any]) -> None:
  """Writes `obj` atomically: a kill never leaves half a file (the temporary name is
  the process's own, so concurrent writers do not mix)."""
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write('\n')
  os.replace(tmp, path)

