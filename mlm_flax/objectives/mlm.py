"""The MLM objective: the run's masking function, logits at the masked positions, token-weighted
cross-entropy, accuracy.

Metrics are returned as sums (`loss_sum`, `correct`, `count`) so they add up exactly
across steps, batches and hosts; the loss that is differentiated is normalised by
the number of masked tokens in the *global* batch.
"""

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mlm_flax.data import tokenizer
from mlm_flax.objectives import masking
from mlm_flax.objectives.masking import Masked

MaskFn = Callable[..., Masked]


def make_mask_fn(config: ml_collections.ConfigDict, tok, split: str = 'train') -> tuple[MaskFn, int]:
  """The masking function for `split` ('train' or 'eval') and its static prediction budget."""
  rate = config.masking.rate
  if split == 'eval' and config.masking.get('eval_rate') is not None:
    rate = config.masking.eval_rate
  strategy = config.masking.get('strategy', 'token')
  word_starts = None if strategy == 'token' else jnp.asarray(tokenizer.word_start_table(tok))
  fn = functools.partial(
      masking.mask_tokens, vocab_size=len(tok), mask_id=tok.mask_token_id,
      special_ids=tokenizer.special_token_ids(tok), pad_id=tok.pad_token_id, rate=rate,
      mask_prob=config.masking.mask_prob, random_prob=config.masking.random_prob, strategy=strategy,
      word_starts=word_starts, max_span_length=config.masking.get('max_span_length', 10),
      span_p=config.masking.get('span_p', 0.2))
  return fn, masking.max_predictions(config.max_seq_length, rate, strategy)


def gather_predictions(masked: Masked, num_predictions: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Positions [batch, P] of the masked tokens (padded with weight 0), their targets and weights."""
  _, positions = jax.lax.top_k(masked.weights, num_predictions)
  take = lambda x: jnp.take_along_axis(x, positions, axis=1)
  return positions, take(masked.targets), take(masked.weights)


def mlm_loss(params: Any, model: nn.Module, batch: dict[str, jax.Array], masked: Masked,
             num_predictions: int, dropout_rng: jax.Array | None = None,
             baseline_token: int | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean cross-entropy over masked tokens, and summed metrics. Dropout is on iff `dropout_rng`; it draws per
  row from `batch['row_ids']` (the rows' indices in the global batch) when the batch has them."""
  positions, targets, weights = gather_predictions(masked, num_predictions)
  logits = model.apply({'params': params}, masked.inputs, batch['segment_ids'], batch['positions'],
                       masked_positions=positions, deterministic=dropout_rng is None, row_ids=batch.get('row_ids'),
                       rngs=None if dropout_rng is None else {'dropout': dropout_rng})
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  ce = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  count = weights.sum()
  loss_sum = (ce * weights).sum()
  metrics = {'loss_sum': loss_sum, 'count': count,
             'correct': ((logits.argmax(-1) == targets) * weights).sum()}
  if baseline_token is not None:  # accuracy of always predicting the most frequent token
    metrics['baseline_correct'] = ((targets == baseline_token) * weights).sum()
  return loss_sum / jnp.maximum(count, 1.0), metrics


def summarize(sums: dict[str, float]) -> dict[str, float]:
  """Summed metrics → loss, masked_accuracy, perplexity (and counts)."""
  count = max(float(sums['count']), 1.0)
  loss = float(sums['loss_sum']) / count
  out = {'loss': loss, 'masked_accuracy': float(sums['correct']) / count,
         'perplexity': math.exp(min(loss, 80.0)), 'num_masked_tokens': int(sums['count'])}
  if 'baseline_correct' in sums:
    out['unigram_baseline_accuracy'] = float(sums['baseline_correct']) / count
  return out
