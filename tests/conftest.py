"""4 CPU devices for every test, set before JAX is imported."""
import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=4').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402  (after the flags above)
import pytest  # noqa: E402

SHARED_CIFAR = os.path.join(ROOT, '..', 'shared', 'data', 'cifar-10-batches-py')


@pytest.fixture(scope='session')
def devices():
  d = jax.devices()
  assert len(d) == 4, 'tests expect 4 CPU devices (see conftest.py)'
  return d
