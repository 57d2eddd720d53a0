"""Package layout: every module imports on its own, and the package's import graph has no cycles."""

import ast
import os
import subprocess
import sys

import mlm_flax

PACKAGE_DIR = os.path.dirname(mlm_flax.__file__)


def _modules() -> dict[str, str]:
  """{dotted module name: file} of every module under mlm_flax/ (packages by their __init__.py)."""
  out = {}
  for root, _, files in os.walk(PACKAGE_DIR):
    for name in files:
      if name.endswith('.py'):
        rel = os.path.relpath(os.path.join(root, name), os.path.dirname(PACKAGE_DIR))[:-3].split(os.sep)
        out['.'.join(rel[:-1] if rel[-1] == '__init__' else rel)] = os.path.join(root, name)
  return out


def _registry_edges() -> dict[str, set[str]]:
  """Imports done through `importlib` by name (the architecture registry), which `ast` cannot see."""
  from mlm_flax import models  # pylint: disable=g-import-not-at-top
  return {'mlm_flax.models': {f'mlm_flax.models.{m}' for m in getattr(models, 'ARCHITECTURES', {}).values()}}


def import_graph() -> dict[str, set[str]]:
  """{module: the package modules it imports}, top-level and inside functions alike. An import of a module's
  own ancestor package is not an edge (the package is always initialised before its submodules)."""
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    targets = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets.update(a.name for a in node.names)
      elif isinstance(node, ast.ImportFrom):
        assert node.level == 0, f'{path}: relative import; use absolute imports'
        targets.add(node.module)
        targets.update(f'{node.module}.{a.name}' for a in node.names)
    ancestors = {'.'.join(name.split('.')[:i]) for i in range(1, name.count('.') + 1)}
    graph[name] = {t for t in targets if t in modules and t != name and t not in ancestors}
  for name, extra in _registry_edges().items():
    if name in graph:
      graph[name] |= extra
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """A cycle [a, b, ..., a] of the graph, or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 'open':
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    state[node] = 'done'
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_find_cycle_finds_one():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': set()}) == ['a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set(), 'c': {'a', 'b'}}) is None


def test_the_package_has_no_import_cycles():
  graph = import_graph()
  cycle = find_cycle(graph)
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)
  assert 'mlm_flax.models.layers' in graph['mlm_flax.models.bert']  # the graph sees the imports
  assert 'mlm_flax.models.bert' in graph['mlm_flax.models']  # and the registry's


def test_every_module_imports_on_its_own():
  """Each module imported first, in a fresh package state (a cycle or a missing import fails here)."""
  names = sorted(n for n in _modules() if n != 'mlm_flax.__main__')
  script = ('import importlib, sys\n'
            f'for name in {names!r}:\n'
            '  for m in [m for m in sys.modules if m == "mlm_flax" or m.startswith("mlm_flax.")]:\n'
            '    del sys.modules[m]\n'
            '  importlib.import_module(name)\n'
            'print("imported", len(%r))\n' % (names,))
  done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f'imported {len(names)}' in done.stdout
