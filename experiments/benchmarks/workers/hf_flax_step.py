"""The training step of Hugging Face's `run_mlm_flax.py` (transformers 4.x, removed in v5), as written there.

`FlaxBertForMaskedLM`, the numpy `FlaxDataCollatorForLanguageModeling` masking on the host every
step, `shard` + `jax.pmap` over local devices, cross-entropy over the full vocabulary at every
position, `optax.adamw`. Runs in its own venv (transformers<5, flax/jax of its time): see
`train_step.py --hf_venv`.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import common  # pylint: disable=g-import-not-at-top

import flax  # pylint: disable=g-import-not-at-top
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import jax_utils, traverse_util
from flax.training import train_state
from flax.training.common_utils import onehot, shard
from transformers import BertConfig, FlaxBertForMaskedLM


def collate(args, ids: np.ndarray) -> dict:
  """`FlaxDataCollatorForLanguageModeling.mask_tokens` of run_mlm_flax.py (np.random.binomial masks)."""
  inputs, labels = ids.copy(), ids.copy()
  masked = np.random.binomial(1, np.full(labels.shape, args.mask_rate)).astype(bool)
  labels[~masked] = -100
  replaced = np.random.binomial(1, np.full(labels.shape, 0.8)).astype(bool) & masked
  inputs[replaced] = common.MASK_ID
  random = np.random.binomial(1, np.full(labels.shape, 0.5)).astype(bool) & masked & ~replaced
  inputs[random] = np.random.randint(args.vocab, size=labels.shape, dtype='i4')[random]
  return {'input_ids': inputs, 'attention_mask': np.ones_like(inputs), 'token_type_ids': np.zeros_like(inputs),
          'labels': labels}


def main() -> None:
  args = common.parse_args()
  config = BertConfig(vocab_size=args.vocab, num_hidden_layers=args.layers, hidden_size=args.hidden,
                      num_attention_heads=args.heads, intermediate_size=args.ffn,
                      max_position_embeddings=max(512, args.seq))
  model = FlaxBertForMaskedLM(config, seed=0, dtype=getattr(jnp, args.dtype))
  schedule = optax.linear_schedule(1e-4, 0.0, 10_000)

  def decay_mask_fn(params):
    flat = traverse_util.flatten_dict(params)
    layer_norm = {n for n in flat if n[-1] == 'scale' or 'LayerNorm' in ''.join(n[-2:])}
    return traverse_util.unflatten_dict({p: p[-1] != 'bias' and p not in layer_norm for p in flat})

  tx = optax.adamw(learning_rate=schedule, b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.01, mask=decay_mask_fn)
  state = jax_utils.replicate(train_state.TrainState.create(apply_fn=model.__call__, params=model.params, tx=tx))

  def train_step(state, batch, dropout_rng):  # verbatim in substance from run_mlm_flax.py
    dropout_rng, new_dropout_rng = jax.random.split(dropout_rng)

    def loss_fn(params):
      labels = batch.pop('labels')
      logits = state.apply_fn(**batch, params=params, dropout_rng=dropout_rng, train=True)[0]
      label_mask = jnp.where(labels > 0, 1.0, 0.0)
      loss = optax.softmax_cross_entropy(logits, onehot(labels, logits.shape[-1])) * label_mask
      return loss.sum(), label_mask.sum()

    (loss, num_labels), grad = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    num_labels = jax.lax.psum(num_labels, 'batch')
    loss = jax.lax.psum(loss, 'batch') / num_labels
    grad = jax.tree_util.tree_map(lambda x: x / num_labels, jax.lax.psum(grad, 'batch'))
    return state.apply_gradients(grads=grad), {'loss': loss}, new_dropout_rng

  p_train_step = jax.pmap(train_step, 'batch', donate_argnums=(0,))
  rngs = jax.random.split(jax.random.PRNGKey(0), jax.local_device_count())
  np.random.seed(0)
  holder = {'state': state, 'rngs': rngs, 'metrics': None}

  def run(i):  # the collator runs in the loop, as in the script
    batch = shard(collate(args, common.token_ids(args, i)))
    holder['state'], holder['metrics'], holder['rngs'] = p_train_step(holder['state'], batch, holder['rngs'])

  result = common.timed(args, run, lambda: jax.block_until_ready(holder['metrics']))
  result.update(devices=jax.local_device_count(), dtype=args.dtype, framework='hf_flax',
                versions={'jax': jax.__version__, 'flax': flax.__version__})
  common.report(result)


if __name__ == '__main__':
  main()
