"""BERT-base (Devlin et al. 2019): 12 layers, hidden 768, 12 heads, seq 128, batch 256, lr 1e-4."""

from mlm_flax.configs import default


def get_config():
  c = default.get_config()
  c.num_train_steps = 900_000
  c.batch_size = 256
  c.eval_batch_size = 256
  c.max_seq_length = 128
  c.log_every_steps = 100
  c.eval_every_steps = 10_000
  c.checkpoint_every_steps = 5_000
  c.model.num_layers = 12
  c.model.hidden_size = 768
  c.model.num_heads = 12
  c.model.intermediate_size = 3072
  c.model.max_position_embeddings = 512
  c.data.tokenizer_vocab_size = 30522
  c.optimizer.learning_rate = 1e-4
  c.optimizer.warmup_steps = 10_000
  c.optimizer.b2 = 0.999
  c.optimizer.weight_decay = 0.01
  return c
