"""The structure of lib/ (docs/architecture.md): packages by concept on floors,
imports only downward (no cycles), the old config path kept as an alias."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A package imports only packages on lower floors, and itself.
FLOORS = {'core': 0, 'data': 1, 'model': 1, 'training': 2, 'runs': 3, 'sweeps': 4,
          'diagnostics': 4}


def lib_modules():
  """'lib.pkg.mod' -> its file, for every module in a package of lib/."""
  out = {}
  for package in FLOORS:
    folder = os.path.join(ROOT, 'lib', package)
    for name in os.listdir(folder):
      if name.endswith('.py'):
        module = f'lib.{package}' + ('' if name == '__init__.py' else f'.{name[:-3]}')
        out[module] = os.path.join(folder, name)
  return out


def imports(path):
  """The lib modules `path` imports, at any depth (a function's import counts too)."""
  with open(path) as f:
    tree = ast.parse(f.read())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('lib'):
      for alias in node.names:   # `from lib.core import cli` names a module
        found.add(f'{node.module}.{alias.name}')
    elif isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.startswith('lib'))
  return found


def resolve_module(name, modules):
  """The longest prefix of `name` that is a module of lib (a name inside a module
  resolves to the module)."""
  parts = name.split('.')
  for n in range(len(parts), 1, -1):
    if '.'.join(parts[:n]) in modules:
      return '.'.join(parts[:n])
  return None


def test_lib_is_packages_and_the_one_alias():
  loose = sorted(f for f in os.listdir(os.path.join(ROOT, 'lib'))
                 if f.endswith('.py') and f != '__init__.py')
  # One-release aliases of old homes: lib.config, lib.runner (pickled SLURM tasks), lib.train.
  assert loose == ['config.py', 'runner.py', 'train.py'], loose
  packages = sorted(d for d in os.listdir(os.path.join(ROOT, 'lib'))
                    if os.path.isdir(os.path.join(ROOT, 'lib', d)) and not d.startswith('__'))
  assert packages == sorted(FLOORS)


def test_imports_only_go_down_and_have_no_cycles():
  modules = lib_modules()
  graph = {}
  for module, path in modules.items():
    own = module.split('.')[1]
    targets = {resolve_module(name, modules) for name in imports(path)} - {None, module}
    for target in targets:
      other = target.split('.')[1]
      assert other == own or FLOORS[other] < FLOORS[own], \
          f'{module} imports {target}: lib/{other} is not below lib/{own}'
    graph[module] = targets
  state = {}

  def visit(node, stack):
    state[node] = 'open'
    for nxt in graph.get(node, ()):
      if state.get(nxt) == 'open':
        raise AssertionError('import cycle: ' + ' -> '.join(stack[stack.index(nxt):] + [nxt]))
      if nxt not in state:
        visit(nxt, stack + [nxt])
    state[node] = 'done'
  for module in sorted(graph):
    if module not in state:
      visit(module, [module])


def test_the_checker_sees_an_upward_import(tmp_path):
  bad = tmp_path / 'x.py'
  bad.write_text('def f():\n  from lib.runs import train\n')
  assert 'lib.runs.train' in imports(str(bad))


def test_launch_stays_thin():
  for name in os.listdir(os.path.join(ROOT, 'launch')):
    if name.endswith('.py'):
      with open(os.path.join(ROOT, 'launch', name)) as f:
        text = f.read()
      assert len(text.splitlines()) <= 150, name
      assert 'class ' not in text, f'launch/{name} defines a class: logic belongs in lib/'


def test_the_old_paths_still_work_for_one_release():
  from lib.config import base_config, resolve   # experiment modules written against it
  from lib.core import config
  from lib.training import resolve as resolve_lib
  assert base_config is config.base_config and resolve is resolve_lib.resolve
  from lib.runs import train
  from lib.train import train_and_evaluate
  assert train_and_evaluate is train.train_and_evaluate
  # A SLURM task pickled before the move (class lib.runner.ArrayTask) still loads.
  import pickle
  from lib.sweeps.slurm import ArrayTask
  old = pickle.dumps(ArrayTask.__new__(ArrayTask), protocol=0)
  assert b'lib.sweeps.slurm' in old
  assert type(pickle.loads(old.replace(b'lib.sweeps.slurm', b'lib.runner'))) is ArrayTask


def test_repo_root_is_the_folder_launchers_run_from():
  # Modules one package deeper than before must not compute it from their own path.
  from lib.core import config
  from lib.runs import chaos, provenance
  assert config.REPO_ROOT == ROOT and os.path.isdir(os.path.join(ROOT, 'launch'))
  assert chaos.ROOT == provenance.ROOT == ROOT
