"""Masking: rates, exclusions, determinism, jittability."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlm_flax import masking

VOCAB, MASK, PAD, CLS, SEP = 1000, 4, 0, 2, 3
SPECIALS = (0, 1, 2, 3, 4, 500)  # an odd special id in the middle of the vocabulary too


def _batch(rng, b=512, l=128):
  ids = np.asarray(jax.random.randint(rng, (b, l), 0, VOCAB))
  ids = np.where(np.isin(ids, SPECIALS), 7, ids)
  lengths = np.asarray(jax.random.randint(jax.random.fold_in(rng, 1), (b,), 10, l + 1))
  ids[:, 0] = CLS
  ids[np.arange(b), lengths - 1] = SEP
  ids[np.arange(l)[None, :] >= lengths[:, None]] = PAD
  return jnp.asarray(ids, jnp.int32)


mask = functools.partial(masking.mask_tokens, vocab_size=VOCAB, mask_id=MASK, special_ids=SPECIALS,
                         pad_id=PAD)


def test_rates_within_tolerance():
  ids = _batch(jax.random.PRNGKey(0))
  out = jax.jit(mask)(jax.random.PRNGKey(1), ids)
  ids, inputs, w = map(np.asarray, (ids, out.inputs, out.weights))
  maskable = ~np.isin(ids, SPECIALS)
  # Exact count per sequence: round(rate * maskable).
  np.testing.assert_array_equal(w.sum(1), np.maximum(1, np.floor(0.15 * maskable.sum(1) + 0.5)))
  chosen = w > 0
  n = chosen.sum()
  to_mask = (inputs == MASK) & chosen
  unchanged = (inputs == ids) & chosen
  replaced = chosen & ~to_mask & ~unchanged
  # Binomial tolerance: 5 standard deviations (random replacements can hit the same id: ~1/1000).
  for observed, p in [(to_mask.sum(), 0.8), (replaced.sum(), 0.1 * (1 - 1 / VOCAB)),
                      (unchanged.sum(), 0.1 + 0.1 / VOCAB)]:
    assert abs(observed / n - p) < 5 * np.sqrt(p * (1 - p) / n), (observed / n, p)
  np.testing.assert_array_equal(out.targets, ids)
  np.testing.assert_array_equal(inputs[~chosen], ids[~chosen])


def test_specials_and_padding_never_chosen_or_inserted():
  ids = _batch(jax.random.PRNGKey(2))
  for seed in range(5):
    out = mask(jax.random.PRNGKey(seed), ids, mask_prob=0.0, random_prob=1.0)
    w, inputs = np.asarray(out.weights), np.asarray(out.inputs)
    assert not w[np.isin(np.asarray(ids), SPECIALS)].any()
    replaced = inputs[w > 0]
    assert not np.isin(replaced, SPECIALS).any() and replaced.min() >= 0 and replaced.max() < VOCAB
  # All normal ids are reachable: the shift over special ids keeps the draw uniform.
  draws = np.asarray(masking._random_normal_tokens(jax.random.PRNGKey(0), (200_000,), VOCAB, SPECIALS))
  counts = np.bincount(draws, minlength=VOCAB)
  assert (counts[list(SPECIALS)] == 0).all() and (np.delete(counts, SPECIALS) > 0).all()


def test_maskable_restricts_and_empty_rows_get_nothing():
  ids = _batch(jax.random.PRNGKey(3), b=8)
  maskable = jnp.zeros(ids.shape, bool).at[:4].set(True)
  out = mask(jax.random.PRNGKey(0), ids, maskable=maskable)
  w = np.asarray(out.weights)
  assert w[4:].sum() == 0 and (w[:4].sum(1) > 0).all()
  assert w.sum(1).max() <= masking.max_predictions(ids.shape[1], 0.15)


def test_same_key_same_masks_different_key_different_masks():
  ids = _batch(jax.random.PRNGKey(4), b=16)
  a = mask(jax.random.PRNGKey(7), ids)
  b = mask(jax.random.PRNGKey(7), ids)
  c = mask(jax.random.PRNGKey(8), ids)
  np.testing.assert_array_equal(a.inputs, b.inputs)
  np.testing.assert_array_equal(a.weights, b.weights)
  assert (np.asarray(a.weights) != np.asarray(c.weights)).any()


def test_bad_probabilities_are_rejected():
  ids = _batch(jax.random.PRNGKey(5), b=2)
  with pytest.raises(ValueError, match='rate'):
    mask(jax.random.PRNGKey(0), ids, rate=0.0)
  with pytest.raises(ValueError, match='sum to <= 1'):
    mask(jax.random.PRNGKey(0), ids, mask_prob=0.9, random_prob=0.2)
