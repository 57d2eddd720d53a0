"""mlm_flax's training step (`train.jit_train_step`: in-graph masking, head at masked positions, AdamW)."""

import ast
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import common  # pylint: disable=g-import-not-at-top
import recipe  # pylint: disable=g-import-not-at-top

import jax  # pylint: disable=g-import-not-at-top
import numpy as np

from mlm_flax.configs import default
from mlm_flax import parallel, train
from mlm_flax.objectives import masking
from mlm_flax.models import make_model


def main() -> None:
  args = common.parse_args()
  if args.config:  # the recipe's own model and optimizer (`recipe.py`)
    c = recipe.load(args.config)
    c.model.dtype = args.dtype
  else:
    c = default.get_config()
    c.model.update(num_layers=args.layers, hidden_size=args.hidden, num_heads=args.heads,
                   intermediate_size=args.ffn, vocab_size=args.vocab, pad_token_id=0,
                   max_position_embeddings=max(512, args.seq), dtype=args.dtype)
  for item in args.override:
    key, value = item.split('=', 1)
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # a bare string such as bfloat16
    c.model[key.removeprefix('model.')] = value
  model = make_model(c.model)
  tx = train.make_optimizer(c.optimizer, c.num_train_steps if args.config else 10_000)
  mesh = parallel.make_mesh()
  mask_fn = functools.partial(masking.mask_tokens, vocab_size=args.vocab, mask_id=common.MASK_ID,
                              special_ids=common.SPECIALS, pad_id=0, rate=args.mask_rate)
  state = jax.jit(functools.partial(train.create_train_state, model=model, tx=tx, seq_len=args.seq),
                  out_shardings=parallel.replicated(mesh))(jax.random.PRNGKey(0))
  num_predictions = args.seq if args.head_everywhere else masking.max_predictions(args.seq, args.mask_rate)
  step = train.jit_train_step(model, tx, mask_fn, num_predictions, mesh)
  ones = np.ones((args.batch, args.seq), np.int32)
  batches = [parallel.to_global({'input_ids': common.token_ids(args, i), 'segment_ids': ones,
                                 'positions': np.broadcast_to(np.arange(args.seq, dtype=np.int32), ones.shape)}, mesh)
             for i in range(2)]  # synthetic, already on the devices: the step alone is measured
  holder = {'state': state, 'metrics': None}
  queued = parallel.steps_queued()  # as the training loop: 0 on CPU (wait for this step), 1 elsewhere (the last)

  def run(i):
    previous = holder['metrics']
    holder['state'], holder['metrics'] = step(holder['state'], batches[i % 2])
    jax.block_until_ready(previous if queued else holder['metrics'])

  result = common.timed(args, run, lambda: jax.block_until_ready(holder['metrics']))
  result.update(devices=jax.device_count(), dtype=str(c.model.dtype), framework='mlm_flax',
                overrides=args.override, head_everywhere=args.head_everywhere)
  common.report(result)


if __name__ == '__main__':
  main()
