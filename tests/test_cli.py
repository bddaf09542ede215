"""The launchers as a user runs them: bad input is one line and changes nothing."""
import json
import os
import subprocess
import sys

import pytest

from experiments import quickstart
from lib.runs.train import train_and_evaluate
from tests.conftest import ROOT

QUICK = ['--config=experiments/quickstart.py', '--config.train.epochs=1']


def launch(module, *args):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
  p = subprocess.run([sys.executable, '-m', f'launch.{module}', *args], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=300)
  return p.returncode, p.stdout, [l for l in p.stderr.splitlines() if l.strip()]


def snapshot(path):
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      full = os.path.join(root, f)
      st = os.stat(full)
      out[full] = (st.st_size, st.st_mtime_ns)
  return out


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('cli') / 'w')
  c = quickstart.get_config()
  c.train.epochs = 1
  train_and_evaluate(c, workdir, log=lambda m: None)
  return workdir


def test_train_then_eval_end_to_end(tmp_path):
  workdir = str(tmp_path / 'w')
  rc, out, err = launch('train', *QUICK, f'--workdir={workdir}')
  assert rc == 0, err
  assert 'ex/s' in out and 'ETA' in out
  rc, out, err = launch('eval', f'--workdir={workdir}', '--split=test', '--tta=flip')
  assert rc == 0, err
  result = json.loads(out.strip().splitlines()[-1])
  assert set(result) == {'accuracy', 'loss', 'num_examples', 'step'}
  assert result['num_examples'] == 360 and result['step'] == 40
  # Rerunning a finished run changes nothing and says so.
  before = snapshot(workdir)
  rc, out, err = launch('train', *QUICK, f'--workdir={workdir}')
  assert rc == 0 and 'already finished' in out
  assert snapshot(workdir) == before


def test_misspelled_config_key_is_one_line(run_dir):
  before = snapshot(run_dir)
  rc, _, err = launch('train', *QUICK, f'--workdir={run_dir}', '--config.optim.lrr=0.1')
  assert rc == 1 and len(err) == 1 and 'lrr' in err[0] and 'Did you mean "lr"' in err[0]
  assert snapshot(run_dir) == before


def test_missing_data_path_is_one_line_and_writes_nothing(tmp_path):
  workdir = tmp_path / 'w'
  rc, _, err = launch('train', *QUICK, f'--workdir={workdir}', '--config.data.source=cifar_dir',
                      f'--config.data.path={tmp_path / "missing"}')
  assert rc == 1 and len(err) == 1 and 'data.path' in err[0]
  assert not workdir.exists()


def test_workdir_of_another_config_is_one_line(run_dir):
  before = snapshot(run_dir)
  rc, _, err = launch('train', *QUICK, f'--workdir={run_dir}', '--config.optim.lr=0.3')
  assert rc == 1 and len(err) == 1 and 'optim.lr: 0.05 -> 0.3' in err[0] and '--fresh' in err[0]
  assert snapshot(run_dir) == before


def test_missing_checkpoint_is_one_line(run_dir):
  before = snapshot(run_dir)
  rc, _, err = launch('eval', f'--workdir={run_dir}', '--checkpoint=7')
  assert rc == 1 and len(err) == 1 and 'no checkpoint at step 7' in err[0]
  assert 'available: 40' in err[0]
  assert snapshot(run_dir) == before
  rc, _, err = launch('eval', f'--workdir={run_dir}/nope')
  assert rc == 1 and len(err) == 1 and 'config.json' in err[0]


def test_unknown_experiment_variant_is_one_line(tmp_path):
  rc, _, err = launch('train', '--config=experiments/cifar10_resnet.py:gpu',
                      f'--workdir={tmp_path / "w"}')
  assert rc == 1 and len(err) == 1 and 'unknown variant gpu; valid: local' in err[0]
  assert 'Traceback' not in err[0] and not (tmp_path / 'w').exists()


def test_unknown_benchmark_stream_is_one_line_before_anything_is_measured():
  rc, out, err = launch('benchmark', '--stream=imagenet_local,bogus')
  assert rc == 1 and err == ["error: unknown --stream entry 'bogus' (resnet20_cifar needs "
                             "--cifar_dir); valid: imagenet_local, resnet20_cifar"]
  assert out == ''
  rc, _, err = launch('benchmark', '--stream=resnet20_cifar')
  assert rc == 1 and len(err) == 1 and "'resnet20_cifar'" in err[0]
