"""Domain adaptation: the 2-layer BERT of configs/tiny_bert.py on general English vs Python documentation.

Every run trains `num_train_steps` steps of `batch_size` x `max_seq_length` tokens; the adapted run spends the
first half on general text (the general run's half-way checkpoint) and the second half on domain text with
25% general text replayed (REPLAY_FRACTION). All
runs share one WordPiece vocabulary trained on both training sets (run.py passes it as `data.tokenizer`) and
evaluate on the domain validation text during training, which gives the learning curves.
"""

from mlm_flax.configs import tiny_bert

# The adapted run's second half: this fraction of its training words is general text (replay), the rest
# domain text, so continued pretraining does not overwrite what the general half learned; and its peak
# learning rate (None: the config's).
REPLAY_FRACTION = 0.25
ADAPT_LEARNING_RATE = None


def get_config():
  c = tiny_bert.get_config()  # the quick start when these models were trained
  c.num_train_steps = 1200  # per run (the adapted run: 600 general + 600 domain)
  c.eval_every_steps = 100
  c.log_every_steps = 100
  c.checkpoint_every_steps = 600  # keeps the half-way checkpoint the adapted run starts from
  c.fill_mask_examples = 0  # run.py shows its own, for the three models side by side
  c.progress_bar = False
  c.data.tokenizer_vocab_size = 4096  # trained once on both training sets (run.py)
  return c
