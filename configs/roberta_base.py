"""RoBERTa-base layout (Liu et al. 2019): positions offset past the padding index, one token type,
seq 512, batch 2048 (8k in the paper with gradient accumulation), lr 6e-4, eps 1e-6, b2 0.98."""

from mlm_flax.configs import default


def get_config():
  c = default.get_config()
  c.num_train_steps = 500_000
  c.batch_size = 2048
  c.eval_batch_size = 256
  c.max_seq_length = 512
  c.log_every_steps = 100
  c.eval_every_steps = 10_000
  c.checkpoint_every_steps = 5_000
  c.model.type = 'roberta'
  c.model.num_layers = 12
  c.model.hidden_size = 768
  c.model.num_heads = 12
  c.model.intermediate_size = 3072
  c.model.max_position_embeddings = 514
  c.model.type_vocab_size = 1
  c.model.layer_norm_eps = 1e-5
  c.data.tokenizer = 'roberta-base'  # byte-level BPE with <mask>; or a local folder
  c.optimizer.learning_rate = 6e-4
  c.optimizer.warmup_steps = 24_000
  c.optimizer.b2 = 0.98
  c.optimizer.eps = 1e-6
  return c
