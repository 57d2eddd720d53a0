"""The previous CPU quick start: a 2-layer BERT at `configs/tiny.py`'s data, batch, masks and FLOPs per token.

BERT (post-LN, GELU MLP, learned positions, biases) with 2 layers, hidden 256, MLP 1024 (11.6M training FLOPs per
token against tiny.py's 12.2M), 1,400 steps (warmup 200): 0.310 eval masked accuracy in 8 min 51 s end to end on
2 CPU cores, where tiny.py's ModernBERT-style model reaches 0.425 in 7 min 50 s. The BERT baseline of
experiments/architectures and experiments/time_to_accuracy, and the model of experiments/domain_adaptation.
"""

from mlm_flax.configs import tiny


def get_config():
  c = tiny.get_config()
  c.num_train_steps = 1400
  c.model.type = 'bert'
  c.model.num_layers = 2
  c.model.intermediate_size = 1024
  c.model.layer_norm_eps = 1e-12
  c.optimizer.warmup_steps = 200  # with lr 3e-3; 2e-3 with 100 warmup steps ended 0.02 lower
  return c
