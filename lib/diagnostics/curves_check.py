"""Step 6 of the tuning recipe (lib/diagnostics/diagnose.py) as a check: the diagnoses of
lib/diagnostics/curves.py on a run's learning curves, or on every run of a sweep."""
from typing import Optional

from lib.core.errors import UserError
from lib.diagnostics.checks import PASS, WARN, Result


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
