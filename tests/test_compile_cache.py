"""The persistent compilation cache every launcher uses (lib/core/compile_cache.py): a second
run of the same program loads it instead of compiling, `none` turns it off, an unwritable
directory is a warning and no cache, and the launchers say what compiling cost."""
import os

import jax
import pytest

from lib.core import compile_cache
from tests.test_cli import QUICK, launch


def test_the_directory_is_the_flag_then_jaxs_variable_then_the_users_cache(monkeypatch, tmp_path):
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / 'env'))
  assert compile_cache.default_dir() == str(tmp_path / 'env')
  monkeypatch.delenv(compile_cache.ENV)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
  assert compile_cache.default_dir() == str(tmp_path / 'xdg' / 'jax-ablations' / 'xla')
  monkeypatch.delenv('XDG_CACHE_HOME')
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert compile_cache.default_dir() == str(tmp_path / 'home' / '.cache' / 'jax-ablations' / 'xla')


def test_stats_count_the_programs_this_process_compiles():
  stats = compile_cache.stats()
  stats.reset()
  jax.jit(lambda x: x * 3.0 + 0.123456)(jax.numpy.ones(7)).block_until_ready()
  assert stats.programs >= 1 and stats.compile_s > 0
  assert f'{stats.programs} programs' in stats.line()


def test_a_second_run_loads_every_program_from_the_cache(tmp_path):
  cache = tmp_path / 'cache'
  rc, out, err = launch('train', *QUICK, f'--workdir={tmp_path / "a"}', f'--compilation_cache={cache}')
  assert rc == 0, err
  first = [l for l in out.splitlines() if l.startswith('XLA:')]
  assert len(first) == 1 and ' compiled)' in first[0] and ' 0 compiled' not in first[0], out
  assert os.listdir(cache)   # programs written
  rc, out, err = launch('train', *QUICK, f'--workdir={tmp_path / "b"}', f'--compilation_cache={cache}')
  assert rc == 0, err
  second = [l for l in out.splitlines() if l.startswith('XLA:')][0]
  assert ' 0 compiled' in second and 'loaded from the cache' in second, second


@pytest.mark.parametrize('where', ['none', 'unwritable'])
def test_no_cache_or_an_unwritable_one_still_trains(tmp_path, where):
  if where == 'unwritable':   # a file where the directory would be (unwritable even for root)
    (tmp_path / 'file').write_text('')
    where = str(tmp_path / 'file' / 'cache')
  rc, out, err = launch('train', *QUICK, f'--workdir={tmp_path / "w"}', f'--compilation_cache={where}')
  assert rc == 0, err
  assert [l for l in out.splitlines() if l.startswith('XLA:')][0].split(' s')[1].startswith(
      ' (no persistent cache)'), out
  if where != 'none':
    assert len(err) == 1 and err[0].startswith('warning: compilation cache') and 'cannot be written' in err[0]
