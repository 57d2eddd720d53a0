"""Packaging: what `pip install` puts in site-packages, and that an installed package finds its configs.

The module list is setuptools' own (`build_py.find_all_modules`, what a wheel holds), read without building.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _installed_modules() -> list[tuple[str, str, str]]:
  """(package, module, source file relative to the repository) for every module the install ships."""
  pytest.importorskip('setuptools')
  from setuptools.dist import Distribution  # pylint: disable=g-import-not-at-top
  cwd = os.getcwd()
  os.chdir(ROOT)  # setup.cfg paths are relative to the project
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')  # setuptools' deprecation notices about metadata fields
      dist = Distribution({'script_name': 'setup.py'})
      dist.parse_config_files(['setup.cfg'])
      build_py = dist.get_command_obj('build_py')
      build_py.ensure_finalized()
      return sorted(build_py.find_all_modules())
  finally:
    os.chdir(cwd)


def test_install_has_no_top_level_configs_package():
  modules = _installed_modules()
  subpackages = {f'mlm_flax.{d}' for d in os.listdir(os.path.join(ROOT, 'mlm_flax'))
                 if os.path.isfile(os.path.join(ROOT, 'mlm_flax', d, '__init__.py'))}
  assert {package for package, _, _ in modules} == {'mlm_flax', 'mlm_flax.configs'} | subpackages
  configs = {module: source for package, module, source in modules if package == 'mlm_flax.configs'}
  assert {'default', 'tiny', 'bert_base', 'roberta_base'} <= set(configs)
  assert configs['tiny'] == os.path.join('configs', 'tiny.py')  # the top-level folder users pass to --config


def test_installed_package_finds_its_default_config(tmp_path):
  """The modules laid out as a non-editable install does, run from a folder outside the repository: the
  default config and `from mlm_flax.configs import default` resolve inside the installed package."""
  site = tmp_path / 'site'
  for package, module, source in _installed_modules():
    target = site.joinpath(*package.split('.'), module + '.py')
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(os.path.join(ROOT, source), target)
  env = {**os.environ, 'PYTHONPATH': str(site)}
  probe = ('import json; from mlm_flax import cli; from mlm_flax.configs import tiny; '
           'print(json.dumps([cli.DEFAULT_CONFIG, tiny.__file__, tiny.get_config().model.type]))')
  out = subprocess.run([sys.executable, '-c', probe], cwd=tmp_path, env=env, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  default_config, tiny_file, model_type = json.loads(out.stdout)
  assert default_config == str(site / 'mlm_flax' / 'configs' / 'tiny.py') and tiny_file == default_config
  assert model_type == 'modernbert'  # the quick start's architecture
  # `train` with no --config loads that file (its `from mlm_flax.configs import default` included) and
  # validates it: a bad override is the one error line, so the config itself loaded.
  out = subprocess.run([sys.executable, '-m', 'mlm_flax.cli', 'train', f'--workdir={tmp_path / "run"}',
                        '--config.masking.rate=1.5'], cwd=tmp_path, env=env, capture_output=True, text=True)
  assert out.returncode == 2 and 'masking.rate=1.5 must be a fraction' in out.stderr, out.stderr[-2000:]
  assert 'Traceback' not in out.stderr


def test_nothing_imports_a_top_level_configs_module():
  pattern = re.compile(r'\bfrom configs\b|(?<!from mlm_flax )\bimport configs\b')
  offenders = []
  for folder in ('mlm_flax', 'configs', 'tests', 'experiments', 'notebooks'):
    for dirpath, dirs, files in os.walk(os.path.join(ROOT, folder)):
      dirs[:] = [d for d in dirs if not d.startswith(('.', '__pycache__'))]  # e.g. a benchmark's venv
      for name in files:
        if name.endswith(('.py', '.ipynb')):
          with open(os.path.join(dirpath, name), encoding='utf-8') as f:
            offenders += [f'{os.path.relpath(dirpath, ROOT)}/{name}' for line in f if pattern.search(line)]
  assert not offenders, offenders
