"""The experiment and benchmark scripts call only library names that exist.

They are not run by the default suite (each takes minutes to an hour), so a renamed or moved library function
would otherwise break them silently (as `train.write_json` did when `workdir_json` took it over).
"""

import ast
import importlib
import os
import pathlib

import pytest

_ROOT = pathlib.Path(__file__).resolve().parent.parent
_SCRIPTS = sorted(str(p.relative_to(_ROOT)) for p in (_ROOT / 'experiments').rglob('*.py'))


def _library_attributes(tree: ast.AST) -> list[tuple[int, str, str]]:
  """(line, module, attribute) for every `NAME.attr` where NAME is imported from the mlm_flax package."""
  names = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split('.')[0] == 'mlm_flax':
      for alias in node.names:
        names[alias.asname or alias.name] = f'{node.module}.{alias.name}'
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split('.')[0] == 'mlm_flax' and alias.asname:
          names[alias.asname] = alias.name
  return [(n.lineno, names[n.value.id], n.attr) for n in ast.walk(tree)
          if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id in names]


def test_there_are_scripts_to_check():
  assert any(s.endswith(os.path.join('objectives', 'run.py')) for s in _SCRIPTS)


@pytest.mark.parametrize('script', _SCRIPTS)
def test_script_uses_only_existing_library_names(script):
  tree = ast.parse((_ROOT / script).read_text(encoding='utf-8'))
  missing = []
  for line, module, attr in _library_attributes(tree):
    try:
      target = importlib.import_module(module)
    except ModuleNotFoundError:  # `from mlm_flax.pkg import function`: not a module, nothing to look into
      continue
    if not hasattr(target, attr):
      missing.append(f'{script}:{line}: {module}.{attr}')
  assert not missing, 'names the library no longer has: ' + ', '.join(missing)
