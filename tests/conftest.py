"""Shared fixtures: a tiny model config and offline Hugging Face settings."""

import os

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')

import pytest  # pylint: disable=g-import-not-at-top

from mlm_flax.configs import default  # pylint: disable=g-import-not-at-top


def tiny_config(tmp_path=None):
  """A model small enough for unit tests (seconds on 2 CPU cores)."""
  c = default.get_config()
  c.num_train_steps = 12
  c.batch_size = 8
  c.eval_batch_size = 16
  c.max_seq_length = 32
  c.log_every_steps = 4
  c.eval_every_steps = 6
  c.checkpoint_every_steps = 4
  c.progress_bar = False
  c.fill_mask_examples = 0
  c.model.num_layers = 2
  c.model.hidden_size = 32
  c.model.num_heads = 4
  c.model.intermediate_size = 64
  c.model.max_position_embeddings = 64
  c.model.dtype = 'float32'
  c.data.tokenizer_vocab_size = 1000
  c.optimizer.warmup_steps = 4
  if tmp_path is not None:
    c.data.cache_dir = str(tmp_path / 'cache')
  return c


@pytest.fixture
def config():
  return tiny_config()
