"""CPU quick start: a small BERT on the built-in Python-docs corpus, ~10 minutes on 2 cores."""

from configs import default


def get_config():
  c = default.get_config()
  c.num_train_steps = 1500
  c.batch_size = 32
  c.max_seq_length = 128
  c.log_every_steps = 50
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 250
  c.model.num_layers = 4
  c.model.hidden_size = 256
  c.model.num_heads = 4
  c.model.intermediate_size = 1024
  return c
