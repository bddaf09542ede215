"""The tuning recipe's checks: each has a case that must PASS and one that must not."""
import glob
import json
import math
import os
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import quickstart
from lib.core import sharding
from lib.core.registry import Entry
from lib.data import datasets as data
from lib.diagnostics import curves, diagnose
from lib.model import models
from lib.runs.train import train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
quiet = lambda message: None


def digits(**overrides):
  """The quickstart MLP on digits, narrowed."""
  c = quickstart.get_config()
  c.model.width = 64
  for key, value in overrides.items():
    group, name = key.split('.')
    c[group][name] = value
  return c


@pytest.fixture(scope='module')
def dataset():
  return data.load(digits().data)


@pytest.fixture(scope='module')
def mesh(devices):
  return sharding.make_mesh(devices)


# ---------------------------------------------------------------- 1. initial loss


def test_expected_initial_losses():
  assert diagnose.expected_initial_loss('cross_entropy', 10) == pytest.approx(math.log(10))
  assert diagnose.expected_initial_loss('hinge', 10) == 9.0
  assert diagnose.expected_initial_loss('squared_hinge', 100) == 99.0


def test_initial_loss_passes_near_ln_c_and_fails_when_scrambled(dataset, mesh):
  small = digits(**{'model.init': 'xavier_normal', 'regularize.l2': 0.5})  # penalty excluded
  ok = diagnose.initial_loss(small, dataset, mesh)
  assert ok.verdict == diagnose.PASS, ok.line()
  assert abs(ok.numbers['loss'] - math.log(10)) < 0.25 * math.log(10)
  assert ok.numbers['accuracy'] < 0.3
  # A loss that sums over classes instead of picking the label's term.
  scrambled = lambda logits, targets: -jnp.sum(jax.nn.log_softmax(logits), -1)
  bad = diagnose.initial_loss(small, dataset, mesh, loss_fn=scrambled)
  assert bad.verdict == diagnose.FAIL and 'likely causes' in bad.summary
  assert bad.numbers['loss'] == pytest.approx(10 * ok.numbers['loss'], rel=0.1)
  # Huge initial logits (std 1 weights) are far above ln C too.
  huge = diagnose.initial_loss(digits(**{'model.init': 'normal', 'model.init_scale': 1.0}),
                               dataset, mesh)
  assert huge.verdict == diagnose.FAIL and huge.numbers['ratio'] > 2


# ---------------------------------------------------------------- 2. overfit a small sample


def test_overfit_small_fits_and_zero_init_cannot(dataset, mesh, tmp_path):
  ok = diagnose.overfit_small(digits(), dataset, mesh, batches=5, max_steps=400,
                              plot=str(tmp_path / 'o.png'))
  assert ok.verdict == diagnose.PASS, ok.line()
  assert ok.numbers['examples'] == 5 * 32 and 0 < ok.numbers['steps_to_100'] <= 400
  assert os.path.getsize(tmp_path / 'o.png') > 0
  zeros = diagnose.overfit_small(digits(**{'model.init': 'zeros'}), dataset, mesh, batches=5,
                                 max_steps=200)
  assert zeros.verdict == diagnose.FAIL and zeros.numbers['steps_to_100'] is None
  assert zeros.numbers['final_sample_accuracy'] < 0.5   # no symmetry breaking


def test_overfit_small_turns_regularization_off(dataset, mesh):
  # Dropout 0.9 and heavy cutout would keep a net from fitting; the check removes them.
  c = digits(**{'regularize.dropout': 0.9, 'regularize.dropout_at': 'hidden',
                'augment.cutout_size': 6, 'optim.weight_decay': 0.1})
  assert diagnose.plain(c).regularize.dropout == 0 and diagnose.plain(c).augment.cutout_size == 0
  assert diagnose.overfit_small(c, dataset, mesh, max_steps=400).verdict == diagnose.PASS


# ---------------------------------------------------------------- 3. lr range


def test_lr_range_grid_recommends_a_rate_that_lowers_the_loss(dataset, mesh, tmp_path):
  r = diagnose.lr_range(digits(), dataset, mesh, 1e-3, 30.0, points=6, steps=40,
                        plot=str(tmp_path / 'lr.png'))
  assert r.verdict in (diagnose.PASS, diagnose.WARN), r.line()
  runs = r.numbers['runs']
  best = max((x for x in runs if not x['diverged']), key=lambda x: x['drop'])
  assert r.numbers['recommended_lr'] == best['lr'] and best['drop'] > 0.3
  assert runs[-1]['diverged']                 # lr 30 blows up a plain MLP
  assert not runs[0]['diverged'] and runs[0]['drop'] < best['drop']
  assert os.path.getsize(tmp_path / 'lr.png') > 0
  too_small = diagnose.lr_range(digits(), dataset, mesh, 1e-7, 1e-6, points=3, steps=20)
  assert too_small.verdict == diagnose.FAIL


def test_lr_range_ramp(dataset, mesh):
  r = diagnose.lr_range(digits(), dataset, mesh, 1e-4, 100.0, steps=80, mode='ramp')
  assert r.verdict == diagnose.PASS, r.line()
  assert 1e-3 < r.numbers['recommended_lr'] < 10
  assert len(r.numbers['losses']) < 80        # stopped once the loss blew up


# ---------------------------------------------------------------- 4. activations


def deep_tanh(init, scale=0.01):
  return digits(**{'model.depth': 6, 'model.width': 256, 'model.activation': 'tanh',
                   'model.norm': 'none', 'model.init': init, 'model.init_scale': scale})


def test_small_normal_init_vanishes_in_a_deep_tanh_net_and_xavier_does_not(dataset, mesh,
                                                                          tmp_path):
  small = diagnose.activations(deep_tanh('normal'), dataset, mesh, steps=0,
                               plot=str(tmp_path / 'a.png'))
  assert small.verdict == diagnose.WARN and 'vanishing' in small.summary
  stds = [l['std'] for l in small.numbers['snapshots']['init']]
  assert len(stds) == 6 and all(b < a for a, b in zip(stds, stds[1:]))
  assert os.path.getsize(tmp_path / 'a.png') > 0
  xavier = diagnose.activations(deep_tanh('xavier_normal'), dataset, mesh, steps=5)
  assert xavier.verdict == diagnose.PASS, xavier.line()
  assert set(xavier.numbers['snapshots']) == {'init', 'step 5'}


def test_activation_judgements():
  layer = lambda std, sat=0.0, dead=0.0: {'name': 'x', 'std': std, 'saturated': sat,
                                          'dead': dead}
  assert diagnose.judge_activations([layer(1), layer(0.9), layer(0.8)]) == []
  assert 'exploding' in diagnose.judge_activations([layer(1), layer(5), layer(20)])[0]
  assert 'saturated' in diagnose.judge_activations([layer(1, sat=0.8)] * 3)[0]
  assert 'dead' in diagnose.judge_activations([layer(1, dead=0.7)] * 3)[0]
  assert 'zero' in diagnose.judge_activations([layer(0)] * 3)[0]
  blown = diagnose.activation_stats('b', np.array([[1.0, np.inf], [np.nan, 2.0]]), 'relu')
  assert blown['nonfinite'] == 0.5 and 'non-finite' in diagnose.judge_activations([blown])[0]
  h = np.array([[0.0, 1.0, -0.995], [0.0, 0.5, 0.999]])
  s = diagnose.activation_stats('t', h, 'tanh')
  assert s['saturated'] == pytest.approx(3 / 6)    # 1.0, -0.995, 0.999
  assert diagnose.activation_stats('r', np.maximum(h, 0), 'relu')['dead'] == pytest.approx(1 / 3)


# ---------------------------------------------------------------- 5. gradient check


def test_check_gradient_matches_a_right_gradient_and_fails_a_wrong_one():
  @jax.custom_jvp
  def wrong_square(x):
    return x ** 2

  @wrong_square.defjvp
  def _(primals, tangents):
    (x,), (t,) = primals, tangents
    return x ** 2, 2.2 * x * t                # 10% off

  with jax.enable_x64(True):
    p = {'a': jnp.linspace(-1.0, 1.0, 7), 'b': jnp.ones((2, 3))}
    good = diagnose.check_gradient(lambda q: jnp.sum(jnp.sin(q['a'])) + jnp.sum(q['b'] ** 3), p)
    bad = diagnose.check_gradient(lambda q: jnp.sum(wrong_square(q['a'])) + jnp.sum(q['b']), p)
  assert good['relative_error'] < 1e-8
  assert bad['relative_error'] > 1e-3 and bad['worst_param'] == "['a']"


@pytest.mark.parametrize('overrides', [
    {},
    {'model.name': 'resnet_cifar', 'model.depth': 8, 'model.norm': 'batch'},
    {'model.name': 'cnn', 'model.depth': 2, 'train.loss': 'squared_hinge', 'regularize.l1': 1e-3},
])
def test_grad_check_passes_on_real_models(dataset, overrides):
  r = diagnose.grad_check(digits(**overrides), dataset)
  assert r.verdict == diagnose.PASS, r.line()
  assert r.numbers['width'] <= 8


def test_grad_check_fails_a_model_with_a_wrong_derivative(dataset, monkeypatch):
  @jax.custom_jvp
  def bad_tanh(x):
    return jnp.tanh(x)

  @bad_tanh.defjvp
  def _(primals, tangents):
    (x,), (t,) = primals, tangents
    return jnp.tanh(x), 0.9 * (1 - jnp.tanh(x) ** 2) * t

  monkeypatch.setitem(models.ACTIVATIONS._entries, 'bad_tanh', Entry(bad_tanh, {}))
  r = diagnose.grad_check(digits(**{'model.activation': 'bad_tanh'}), dataset)
  assert r.verdict == diagnose.FAIL and r.numbers['relative_error'] > 1e-4


# ---------------------------------------------------------------- 6. curves


def rows(train_loss, train_acc, val_acc, lr=None, val_loss=None):
  n = len(train_loss)
  lr = lr or [0.1] * n
  val_loss = val_loss or [l * 1.05 for l in train_loss]
  return [{'step': 10 * (i + 1), 'epoch': i + 1, 'train_loss': train_loss[i],
           'train_accuracy': train_acc[i], 'val_loss': val_loss[i], 'val_accuracy': val_acc[i],
           'lr': lr[i]} for i in range(n)]


def names(r):
  return [f['finding'] for f in curves.diagnose(r)]


CURVES = {
    'bad_init': rows([2.30, 2.30, 2.29, 2.29, 1.2, 0.8, 0.6, 0.5, 0.45, 0.42],
                     [.1, .1, .11, .12, .6, .75, .8, .86, .86, .865],
                     [.1, .1, .11, .12, .6, .74, .78, .81, .81, .815]),
    'plateau': rows([2.0, 1.2, 0.9, 0.8, 0.75, 0.74, 0.74, 0.74, 0.74, 0.74],
                    [.3, .6, .7, .74, .75, .76, .76, .76, .76, .76],
                    [.3, .6, .69, .73, .74, .75, .75, .75, .75, .75]),
    'decayed_too_early': rows([2.0, 1.6, 1.3, 1.1, 1.05, 1.04, 1.04, 1.03, 1.03, 1.03],
                              [.3, .45, .55, .6, .62, .62, .63, .63, .63, .63],
                              [.3, .45, .55, .6, .61, .62, .62, .62, .62, .62],
                              lr=[0.1] * 4 + [0.01] * 6),
    'overfitting': rows([1.5, 1.0, 0.7, 0.5, 0.35, 0.25, 0.15, 0.1, 0.06, 0.04],
                        [.5, .65, .75, .82, .88, .92, .95, .97, .98, .99],
                        [.5, .62, .68, .7, .71, .7, .69, .67, .66, .65]),
    'underfitting': rows([2.0, 1.9, 1.85, 1.83, 1.82, 1.81, 1.81, 1.8, 1.8, 1.8],
                         [.2, .3, .33, .34, .35, .35, .35, .355, .355, .355],
                         [.2, .3, .33, .34, .35, .35, .35, .35, .35, .35],
                         lr=[0.1 * (1 - i / 10) for i in range(10)]),
    'train_longer': rows([2.0, 1.6, 1.3, 1.1, 0.95, 0.85, 0.77, 0.7, 0.64, 0.59],
                         [.3, .42, .5, .56, .61, .65, .68, .71, .735, .755],
                         [.29, .4, .48, .53, .58, .62, .65, .68, .705, .725]),
}


@pytest.mark.parametrize('shape', sorted(CURVES))
def test_each_curve_shape_gets_its_diagnosis(shape):
  found = names(CURVES[shape])
  assert found == [shape], (shape, curves.diagnose(CURVES[shape]))
  assert all(f['evidence'] and f['advice'] for f in curves.diagnose(CURVES[shape]))


def test_a_healthy_run_has_no_finding():
  healthy = rows([2.0, 1.2, 0.8, 0.6, 0.45, 0.35, 0.28, 0.24, 0.22, 0.21],
                 [.3, .6, .72, .8, .85, .88, .9, .91, .915, .92],
                 [.3, .58, .7, .77, .81, .83, .845, .85, .852, .853],
                 lr=[0.1 * (1 + math.cos(math.pi * i / 10)) / 2 for i in range(10)])
  assert names(healthy) == []
  assert names(healthy[:3]) == []             # too few evaluations to judge
  # A cosine run rises fastest at its end, as the rate anneals: not "train longer".
  n = 100
  cosine = rows([1.0 - 0.9 * i / n for i in range(n)],
                [0.90 + 0.09 * (i / n) ** 3 for i in range(n)],
                [0.83 + 0.08 * (i / n) ** 3 for i in range(n)],
                lr=[0.1 * (1 + math.cos(math.pi * i / n)) / 2 for i in range(n)])
  assert 'train_longer' not in names(cosine)
  constant = rows([1.0 - 0.9 * i / n for i in range(n)],
                  [0.90 + 0.09 * (i / n) ** 3 for i in range(n)],
                  [0.83 + 0.08 * (i / n) ** 3 for i in range(n)])
  assert 'train_longer' in names(constant)


# ---------------------------------------------------------------- the command, TensorBoard


def _run(*args):
  return subprocess.run([sys.executable, '-m', 'launch.diagnose', *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=600,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''})


def test_diagnose_command_writes_json_and_pngs_and_archives(tmp_path):
  run = str(tmp_path / 'run')
  c = digits()
  c.train.epochs = 4
  train_and_evaluate(c, run, log=quiet)
  w = str(tmp_path / 'diag')
  args = ['--config=experiments/quickstart.py', f'--workdir={w}', '--curves_from=' + run,
          '--checks=initial_loss,overfit_small,curves', '--overfit_steps=300']
  p = _run(*args)
  assert p.returncode == 0, p.stderr
  lines = p.stdout.splitlines()
  assert any(l.startswith('PASS initial_loss: loss') for l in lines)
  assert any(l.startswith('PASS overfit_small:') for l in lines)
  assert any(l.split(' ')[1] == 'curves:' for l in lines if l[:4] in ('PASS', 'WARN'))
  record = json.loads(open(os.path.join(w, 'diagnose.json')).read(),
                      parse_constant=lambda c: pytest.fail(f'non-strict JSON: {c}'))
  assert [c['check'] for c in record['checks']] == ['initial_loss', 'overfit_small', 'curves']
  assert record['config']['model']['name'] == 'mlp'
  assert os.path.exists(os.path.join(w, 'overfit_small.png'))
  assert os.path.exists(os.path.join(w, 'curves.png'))
  first = open(os.path.join(w, 'diagnose.json')).read()
  assert _run(*args[:2], '--checks=initial_loss').returncode == 0
  archived = glob.glob(os.path.join(w, 'archive', 'diagnose-*', 'diagnose.json'))
  assert len(archived) == 1 and open(archived[0]).read() == first   # kept, not overwritten


def test_diagnose_command_fails_clearly(tmp_path):
  p = _run(f'--workdir={tmp_path}', '--checks=grad_check')
  assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].startswith('error: checks')
  p = _run(f'--workdir={tmp_path}', '--config=experiments/quickstart.py', '--checks=speed')
  assert p.returncode == 1 and 'unknown check' in p.stderr and 'Traceback' not in p.stderr
  p = _run(f'--workdir={tmp_path}', '--config=experiments/quickstart.py', '--overfit_batches=0')
  assert p.returncode == 1 and 'overfit_batches=0 must be positive' in p.stderr
  p = _run(f'--workdir={tmp_path}', '--checks=curves', f'--curves_from={tmp_path}/none')
  assert p.returncode == 1 and 'no run under' in p.stderr
  assert not os.path.exists(tmp_path / 'diagnose.json')


def _event_tags(tb_dir):
  """{tag: kinds} of a TensorBoard event file, read without TensorFlow."""
  from tensorboardX.proto import event_pb2
  out = {}
  for path in glob.glob(os.path.join(tb_dir, 'events.*')):
    raw, i = open(path, 'rb').read(), 0
    while i < len(raw):
      n = struct.unpack('<Q', raw[i:i + 8])[0]
      event = event_pb2.Event()
      event.ParseFromString(raw[i + 12:i + 12 + n])
      i += 16 + n
      for v in event.summary.value:
        out.setdefault(v.tag, set()).add(v.WhichOneof('value'))
  return out


def test_tb_histograms_switch_writes_weight_and_activation_histograms(tmp_path, devices):
  c = digits()
  c.train.epochs = 2
  c.train.tb_histograms = True
  train_and_evaluate(c, str(tmp_path / 'on'), mesh=sharding.make_mesh(devices), log=quiet)
  tags = _event_tags(str(tmp_path / 'on' / 'tb'))
  assert tags['weights/Dense_0/kernel'] == {'histo'} and tags['activations/act0'] == {'histo'}
  assert 'activations/act1' in tags and 'val_accuracy' in tags
  c.train.tb_histograms = False
  train_and_evaluate(c, str(tmp_path / 'off'), log=quiet)
  assert not any(t.startswith('weights/') for t in _event_tags(str(tmp_path / 'off' / 'tb')))
