"""The quick start's recipe (`configs/tiny.py`, or `--config FILE`) as the step workers read it: model keys,
masking rate, batch and sequence length, vocabulary size. Read at run time, so the peers never copy numbers."""

import importlib.util
import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DEFAULT = os.path.join(REPO, 'configs', 'tiny.py')


def load(path: str | None = None):
  """The config of `path` (a configs/*.py file), its `model.vocab_size` set from `data.tokenizer_vocab_size`
  (what a trained tokenizer of that size gives) and `model.pad_token_id` 0."""
  spec = importlib.util.spec_from_file_location('recipe_config', path or DEFAULT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  if c.model.vocab_size is None:
    c.model.vocab_size = c.data.tokenizer_vocab_size
  c.model.pad_token_id = 0
  return c
