"""BERT masking as a pure, jittable function of a PRNG key and token ids.

Per sequence, exactly `max(1, round(rate * n))` of the `n` maskable positions are
chosen (never padding or special tokens), as in BERT's original data pipeline:
an exact count keeps the MLM head's static budget of predictions
(`max_predictions`) tight. Of the chosen positions, `mask_prob` become the mask
token, `random_prob` a random *normal* vocabulary token, the rest stay as they
are. Everything is `jax.numpy`, so masking runs in-graph, fresh every step.
"""

import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp


class Masked(NamedTuple):
  inputs: jax.Array  # [batch, length] ids fed to the model
  targets: jax.Array  # [batch, length] original ids
  weights: jax.Array  # [batch, length] float32, 1.0 where a prediction is scored


def max_predictions(max_seq_length: int, rate: float) -> int:
  """The static upper bound on masked positions per sequence."""
  return max(1, int(math.floor(rate * max_seq_length + 0.5)))


def _random_normal_tokens(rng: jax.Array, shape, vocab_size: int,
                          special_ids: Sequence[int]) -> jax.Array:
  """Uniform over [0, vocab_size) minus `special_ids`, by shifting past each special id."""
  specials = sorted(s for s in set(special_ids) if 0 <= s < vocab_size)
  ids = jax.random.randint(rng, shape, 0, vocab_size - len(specials))
  for s in specials:  # ascending: each shift keeps the draw uniform over non-special ids
    ids = ids + (ids >= s)
  return ids


def mask_tokens(rng: jax.Array, ids: jax.Array, *, vocab_size: int, mask_id: int,
                special_ids: Sequence[int], pad_id: int | None = None,
                maskable: jax.Array | None = None, rate: float = 0.15,
                mask_prob: float = 0.8, random_prob: float = 0.1) -> Masked:
  """Masks `ids` [batch, length] for MLM training; see the module docstring.

  Args:
    vocab_size: the tokenizer's vocabulary size; random replacements stay below it.
    special_ids: ids never chosen and never inserted ([CLS], [SEP], [PAD], ...).
    pad_id: padding id (also excluded); may be among `special_ids`.
    maskable: optional extra [batch, length] bool restriction (e.g. segment_ids > 0).
  """
  if not 0.0 < rate <= 1.0:
    raise ValueError(f'masking.rate must be in (0, 1], got {rate}')
  if mask_prob < 0 or random_prob < 0 or mask_prob + random_prob > 1:
    raise ValueError('masking.mask_prob and masking.random_prob must be >= 0 and sum to <= 1, '
                     f'got {mask_prob} and {random_prob}')
  excluded = set(special_ids) | ({pad_id} if pad_id is not None else set()) | {mask_id}
  can = jnp.ones(ids.shape, bool) if maskable is None else maskable.astype(bool)
  for s in sorted(excluded):
    can = can & (ids != s)

  select_rng, kind_rng, token_rng = jax.random.split(rng, 3)
  # Rank maskable positions by a random score; take the first k of each row.
  scores = jnp.where(can, jax.random.uniform(select_rng, ids.shape), 2.0)
  ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
  n = can.sum(axis=-1, keepdims=True)
  k = jnp.where(n > 0, jnp.maximum(1, jnp.floor(rate * n + 0.5)), 0)
  k = jnp.minimum(k, max_predictions(ids.shape[-1], rate))
  chosen = can & (ranks < k)

  u = jax.random.uniform(kind_rng, ids.shape)
  random_tokens = _random_normal_tokens(token_rng, ids.shape, vocab_size, sorted(excluded))
  inputs = jnp.where(chosen & (u < mask_prob), mask_id, ids)
  inputs = jnp.where(chosen & (u >= mask_prob) & (u < mask_prob + random_prob), random_tokens, inputs)
  return Masked(inputs.astype(ids.dtype), ids, chosen.astype(jnp.float32))
