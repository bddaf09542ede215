"""train.profile_steps (lib/core/profiling.py) traces exactly the steps asked for, and
train.deterministic (lib/core/determinism.py) sets its XLA flags before the backend starts
or says in one line why it cannot, and is recorded in provenance."""
import glob
import gzip
import json
import os

import pytest

from lib.core import determinism
from lib.core.errors import UserError
from lib.runs import provenance
from lib.runs.train import train_and_evaluate
from lib.training.resolve import resolve
from conftest import quickstart_mlp
from tests.test_cli import QUICK, launch


def _step_calls(workdir):
  """The train-step calls in the trace (each call is two nested events), and every other
  jitted program's name."""
  files = glob.glob(os.path.join(workdir, 'profile', 'plugins', 'profile', '*', '*.trace.json.gz'))
  assert len(files) == 1, files
  with gzip.open(files[0]) as f:
    events = [e for e in json.load(f)['traceEvents']
              if e.get('ph') == 'X' and e.get('name', '').startswith('PjitFunction(')]
  steps = sorted((e for e in events if e['name'] == 'PjitFunction(train_step)'),
                 key=lambda e: e['ts'])
  outer, end = 0, -1.0
  for e in steps:
    if e['ts'] >= end:   # not inside the previous call
      outer, end = outer + 1, e['ts'] + e['dur']
  return outer, {e['name'] for e in events} - {'PjitFunction(train_step)'}


def test_the_trace_holds_exactly_the_profiled_steps(tmp_path):
  lines = []
  workdir = str(tmp_path / 'w')
  status = train_and_evaluate(quickstart_mlp(1, **{'train.profile_steps': '3,4'}), workdir,
                              log=lines.append)
  assert status['status'] == 'done'
  calls, others = _step_calls(workdir)
  assert calls == 4 and not others, (calls, others)   # no evaluation: it runs at step 40
  assert any(l.startswith('profile of steps 3-6 written to') for l in lines), lines


def test_a_trace_past_the_last_step_stops_when_training_ends(tmp_path):
  c = quickstart_mlp(1, **{'train.profile_steps': '38,10'})   # 40 steps
  train_and_evaluate(c, str(tmp_path / 'a'), log=lambda m: None)
  calls, _ = _step_calls(str(tmp_path / 'a'))
  assert calls == 2
  # The profiler was stopped: another run of this process can trace again.
  train_and_evaluate(quickstart_mlp(1, **{'train.profile_steps': '0,1'}), str(tmp_path / 'b'),
                     log=lambda m: None)
  assert _step_calls(str(tmp_path / 'b'))[0] == 1


@pytest.mark.parametrize('value', ['3', 'a,b', '-1,2', '3,0', '1,2,3'])
def test_malformed_profile_steps_are_one_line(value):
  with pytest.raises(UserError, match='train.profile_steps=.* must be START,COUNT'):
    resolve(quickstart_mlp(1, **{'train.profile_steps': value}))


def test_deterministic_after_the_backend_started_is_one_line(tmp_path, monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=4')
  with pytest.raises(UserError, match='needs XLA flags set before JAX starts'):
    train_and_evaluate(quickstart_mlp(1, **{'train.deterministic': True}), str(tmp_path / 'w'),
                       log=lambda m: None)
  assert not os.path.exists(tmp_path / 'w')


def test_deterministic_launch_sets_the_flags_and_records_them(tmp_path):
  rc, out, err = launch('train', *QUICK, f'--workdir={tmp_path / "w"}',
                        '--config.train.deterministic=True')
  assert rc == 0, err
  with open(tmp_path / 'w' / 'provenance.json') as f:
    session = json.load(f)['sessions'][0]
  assert session['deterministic'] is True
  assert set(determinism.FLAGS) <= set(session['xla_flags'].split())
  # A record of a session from before `deterministic` was recorded reads as off.
  old = {k: v for k, v in session.items() if k not in ('deterministic', 'xla_flags')}
  assert provenance.differences(old, {**old, 'deterministic': False}) == []
  assert provenance.differences(old, session) == ['deterministic False -> True']
