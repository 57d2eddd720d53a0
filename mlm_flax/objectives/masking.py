"""BERT masking as a pure, jittable function of a PRNG key and token ids.

Strategies (`masking.strategy`):
  'token': per sequence exactly `max(1, round(rate * n))` of the `n` maskable
    positions are chosen (never padding or special tokens), as in BERT's original
    data pipeline: an exact count keeps the MLM head's static budget of
    predictions (`max_predictions`) tight.
  'whole_word': whole words are chosen in random order, all their tokens or none
    (BERT's whole-word masking); a word is a token the tokenizer marks as a word
    start (`tokenizer.word_start_table`: not `##` for WordPiece, `Ġ` for byte-level
    BPE) and the continuation tokens after it.
  'span': SpanBERT's spans: a span starts at a random word and covers
    `min(Geometric(span_p), max_span_length)` whole words.
For 'whole_word' and 'span' the number of masked tokens is the closest to
`round(rate * n)` that whole units allow, within a budget with 25% slack.
Of the chosen positions, `mask_prob` become the mask token, `random_prob` a
random *normal* vocabulary token, the rest stay as they are. Everything is
`jax.numpy`, so masking runs in-graph, fresh every step.

The rate may follow a schedule over training (`masking.rate_schedule`, e.g. 0.3 -> 0.15 as mmBERT does):
`rate_schedule` gives the rate as a pure function of the step, traced in the train step (no recompiles); the
prediction budget is that of the highest rate, so shapes stay static and the weights mark the predictions.
"""

import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp


class Masked(NamedTuple):
  inputs: jax.Array  # [batch, length] ids fed to the model
  targets: jax.Array  # [batch, length] original ids
  weights: jax.Array  # [batch, length] float32, 1.0 where a prediction is scored


STRATEGIES = ('token', 'whole_word', 'span')
RATE_SCHEDULES = ('constant', 'linear', 'cosine', 'step')
_UNIT_SLACK = 0.25  # whole units overshoot the target count by part of a word or span
_NEVER = 1 << 30  # rank of positions that no unit covers


def max_predictions(max_seq_length: int, rate: float, strategy: str = 'token') -> int:
  """The static upper bound on masked positions per sequence."""
  base = max(1, int(math.floor(rate * max_seq_length + 0.5)))
  if strategy == 'token':
    return base
  return min(max_seq_length, base + int(math.ceil(_UNIT_SLACK * base)))


def rate_schedule(kind: str, rate: float, final_rate: float | None, steps: int) -> Callable[[jax.Array], jax.Array]:
  """The masking rate at step s (0-based, traced or not): `rate` at 0 to `final_rate` at `steps`, then `final_rate`.

  'linear' and 'cosine' interpolate; 'step' keeps `rate` for `steps` steps, then `final_rate` (mmBERT's phases);
  'constant' is `rate` throughout.
  """
  if kind not in RATE_SCHEDULES:
    raise ValueError(f'masking.rate_schedule={kind!r}; use one of {RATE_SCHEDULES}.')
  if kind == 'constant' or final_rate is None:
    return lambda step: jnp.asarray(rate, jnp.float32)
  def at(step):
    t = jnp.clip(jnp.asarray(step, jnp.float32) / max(steps, 1), 0.0, 1.0)
    frac = {'linear': 1.0 - t, 'cosine': 0.5 * (1.0 + jnp.cos(jnp.pi * t)),
            'step': (t < 1.0).astype(jnp.float32)}[kind]
    return jnp.float32(final_rate) + (jnp.float32(rate) - jnp.float32(final_rate)) * frac
  return at


def _random_normal_tokens(rng: jax.Array, shape, vocab_size: int,
                          special_ids: Sequence[int]) -> jax.Array:
  """Uniform over [0, vocab_size) minus `special_ids`, by shifting past each special id."""
  specials = sorted(s for s in set(special_ids) if 0 <= s < vocab_size)
  ids = jax.random.randint(rng, shape, 0, vocab_size - len(specials))
  for s in specials:  # ascending: each shift keeps the draw uniform over non-special ids
    ids = ids + (ids >= s)
  return ids


def _ranks(scores: jax.Array) -> jax.Array:
  """Each entry's rank in its row ([batch, length] int, ties by position): `argsort(argsort(scores))`, the
  second sort replaced by scattering the inverse permutation (one sort less per step)."""
  order = jnp.argsort(scores, axis=-1)
  rows = jnp.arange(scores.shape[0])[:, None]
  return jnp.zeros_like(order).at[rows, order].set(jnp.arange(scores.shape[1], dtype=order.dtype), unique_indices=True)


def _unit_ranks(rng: jax.Array, ids: jax.Array, can: jax.Array, word_starts: jax.Array | None,
                strategy: str, max_span_length: int, span_p: float) -> jax.Array:
  """[batch, length] int: the random priority of the unit covering each token; lower is chosen first.

  Units are words: tokens of one word share a rank; for spans, the words of a span
  have consecutive ranks, in order. `_NEVER` where not maskable.
  """
  batch, length = ids.shape
  prev_can = jnp.pad(can[:, :-1], ((0, 0), (1, 0)))
  starts = jnp.ones(ids.shape, bool) if word_starts is None else jnp.take(word_starts, ids, mode='clip')
  starts = can & (starts | ~prev_can)  # a word also starts after a special token or a segment end
  score_rng, length_rng = jax.random.split(rng)
  scores = jnp.where(starts, jax.random.uniform(score_rng, ids.shape), 2.0)
  rank = _ranks(scores)  # starts get 0..num_words-1
  pos = jnp.broadcast_to(jnp.arange(length), ids.shape)
  word_start = jax.lax.cummax(jnp.where(starts, pos, -1), axis=1)  # of the word holding each token
  if strategy == 'whole_word':
    return jnp.where(can, jnp.take_along_axis(rank, jnp.maximum(word_start, 0), axis=1), _NEVER)
  # span: spans start at words, cover `span_len` words, stay within one run of maskable tokens.
  u = jax.random.uniform(length_rng, ids.shape, minval=1e-12)
  span_len = jnp.minimum(1 + jnp.floor(jnp.log(u) / math.log(1.0 - span_p)), max_span_length)
  run = jnp.cumsum(can & ~prev_can, axis=1)
  word = jnp.cumsum(starts, axis=1) - 1  # word index of each token
  start_of_word = jax.vmap(lambda w, s: jnp.zeros(length, jnp.int32).at[jnp.where(s, w, length)].set(
      jnp.arange(length, dtype=jnp.int32), mode='drop'))(word, starts)
  best = jnp.full(ids.shape, _NEVER, rank.dtype)
  for d in range(max_span_length):  # the span starting d words back covers this token?
    s = jnp.take_along_axis(start_of_word, jnp.maximum(word - d, 0), axis=1)
    take = lambda x: jnp.take_along_axis(x, s, axis=1)
    covers = can & (word - d >= 0) & (take(run) == run) & (take(span_len) > d)
    # Ordered by span, then word within it: a span that overshoots the count can end early, at a word.
    best = jnp.minimum(best, jnp.where(covers, take(rank) * max_span_length + d, _NEVER))
  return best


def _choose_units(t: jax.Array, k: jax.Array, budget: int) -> jax.Array:
  """Tokens of the first units in rank order `t`, as close to `k` tokens as whole units allow."""
  t_sorted = jnp.sort(jnp.pad(t, ((0, 0), (0, 1)), constant_values=_NEVER), axis=-1)
  lo = jnp.take_along_axis(t_sorted, k.astype(jnp.int32), axis=1)  # units ranked below: <= k tokens
  hi = jnp.where(lo < _NEVER, lo + 1, lo)  # one more unit: > k tokens
  n_lo = (t < lo).sum(-1, keepdims=True)
  n_hi = (t < hi).sum(-1, keepdims=True)
  use_hi = (n_hi <= budget) & ((n_hi - k < k - n_lo) | (n_lo == 0))
  return t < jnp.where(use_hi, hi, lo)


def mask_tokens(rng: jax.Array, ids: jax.Array, *, vocab_size: int, mask_id: int,
                special_ids: Sequence[int], pad_id: int | None = None,
                maskable: jax.Array | None = None, rate: float | Callable[[jax.Array], jax.Array] = 0.15,
                mask_prob: float = 0.8, random_prob: float = 0.1, strategy: str = 'token',
                word_starts: jax.Array | None = None, max_span_length: int = 10,
                span_p: float = 0.2, max_rate: float | None = None, step: jax.Array | None = None) -> Masked:
  """Masks `ids` [batch, length] for MLM training; see the module docstring.

  Args:
    vocab_size: the tokenizer's vocabulary size; random replacements stay below it.
    special_ids: ids never chosen and never inserted ([CLS], [SEP], [PAD], ...).
    pad_id: padding id (also excluded); may be among `special_ids`.
    rate: a float, or a schedule: a function of `step` (see `rate_schedule`) whose values are at most
      `max_rate`, which sets the static prediction budget.
    maskable: optional extra [batch, length] bool restriction (e.g. segment_ids > 0).
    strategy: 'token', 'whole_word' or 'span'.
    word_starts: [vocab] bool, True for tokens that begin a word ('whole_word', 'span');
      None treats every token as a word.
    max_span_length, span_p: span lengths in words are Geometric(span_p) clipped to
      max_span_length (SpanBERT: 0.2 and 10, mean 3.8 words).
  """
  if callable(rate):
    if max_rate is None or step is None:
      raise ValueError('a masking rate schedule needs max_rate (the budget) and the step')
    rate = rate(step)
  else:
    max_rate = rate if max_rate is None else max_rate
  if not 0.0 < max_rate <= 1.0:
    raise ValueError(f'masking.rate must be in (0, 1], got {max_rate}')
  if strategy not in STRATEGIES:
    raise ValueError(f'masking.strategy={strategy!r}; use one of {STRATEGIES}.')
  if strategy == 'span' and (max_span_length < 1 or not 0 < span_p < 1):
    raise ValueError(f'masking.max_span_length={max_span_length} must be >= 1 and masking.span_p='
                     f'{span_p} in (0, 1).')
  if mask_prob < 0 or random_prob < 0 or mask_prob + random_prob > 1:
    raise ValueError('masking.mask_prob and masking.random_prob must be >= 0 and sum to <= 1, '
                     f'got {mask_prob} and {random_prob}')
  excluded = set(special_ids) | ({pad_id} if pad_id is not None else set()) | {mask_id}
  can = jnp.ones(ids.shape, bool) if maskable is None else maskable.astype(bool)
  for s in sorted(excluded):
    can = can & (ids != s)

  select_rng, kind_rng, token_rng = jax.random.split(rng, 3)
  n = can.sum(axis=-1, keepdims=True)
  k = jnp.where(n > 0, jnp.maximum(1, jnp.floor(rate * n + 0.5)), 0)
  k = jnp.minimum(k, max_predictions(ids.shape[-1], max_rate))
  if strategy == 'token':  # rank maskable positions by a random score; take the first k of each row
    scores = jnp.where(can, jax.random.uniform(select_rng, ids.shape), 2.0)
    ranks = _ranks(scores)
    chosen = can & (ranks < k)
  else:
    ranks = _unit_ranks(select_rng, ids, can, word_starts, strategy, max_span_length, span_p)
    chosen = can & _choose_units(ranks, k, max_predictions(ids.shape[-1], max_rate, strategy))

  u = jax.random.uniform(kind_rng, ids.shape)
  random_tokens = _random_normal_tokens(token_rng, ids.shape, vocab_size, sorted(excluded))
  inputs = jnp.where(chosen & (u < mask_prob), mask_id, ids)
  inputs = jnp.where(chosen & (u >= mask_prob) & (u < mask_prob + random_prob), random_tokens, inputs)
  return Masked(inputs.astype(ids.dtype), ids, chosen.astype(jnp.float32))
