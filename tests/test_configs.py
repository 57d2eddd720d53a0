"""Every config file in configs/ loads, passes validation and builds its typed model config."""

import glob
import importlib.util
import os

import pytest

from mlm_flax import validation
from mlm_flax.models import ModelConfig

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
# Pretraining configs (configs/finetune.py, of `mlm-flax finetune`, is checked in tests/test_finetune.py).
FILES = sorted(f for f in glob.glob(os.path.join(CONFIG_DIR, '*.py')) if not f.endswith(('__init__.py', 'finetune.py')))


def test_the_shipped_configs_are_found():
  names = {os.path.basename(f)[:-3] for f in FILES}
  assert {'default', 'tiny', 'tiny_bert', 'bert_base', 'roberta_base', 'modernbert_base'} <= names


@pytest.mark.parametrize('path', FILES, ids=lambda f: os.path.basename(f)[:-3])
def test_config_file_validates(path):
  spec = importlib.util.spec_from_file_location('_config_under_test', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  validation.validate_config(config, num_devices=1)
  model = ModelConfig.from_dict(config.model)
  assert model.type == config.model.type and model.hidden_size == config.model.hidden_size
