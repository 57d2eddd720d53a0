"""Masking: rates, exclusions, determinism, jittability."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlm_flax.objectives import masking

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


# Whole-word and span masking, with real tokenizers.

def _texts(n=64, per_text=6):
  from pydoc_data import topics  # real English, no download
  lines = [' '.join(l.split()) for t in sorted(topics.topics.values()) for l in t.splitlines()]
  lines = [l for l in lines if len(l.split()) >= 8][:n * per_text]
  return [' '.join(lines[i:i + per_text]) for i in range(0, len(lines), per_text)]


@pytest.fixture(scope='module', params=['wordpiece', 'bpe'])
def word_batch(request):
  """Rows of real text, the tokenizer's word-start table and the true word of each token."""
  from mlm_flax.data import tokenizer as tok_lib
  texts = _texts()
  if request.param == 'wordpiece':  # small vocabularies: many words split into pieces
    tok = tok_lib.train_wordpiece(texts, vocab_size=600)
  else:
    tok = tok_lib.train_bpe(texts, vocab_size=800)
  length = 128
  ids = np.full((len(texts), length), tok.pad_token_id, np.int32)
  words = np.full(ids.shape, -1)  # -1: special or padding
  for r, text in enumerate(texts):
    enc = tok(text, truncation=True, max_length=length, return_offsets_mapping=True)
    ids[r, :len(enc.input_ids)] = enc.input_ids
    if request.param == 'wordpiece':  # the tokenizer's own pre-tokenized words
      w = [-1 if x is None else x for x in enc.word_ids()]
    else:  # byte-level BPE: a word is a run of tokens between spaces (from character offsets)
      w, n = [], -1
      for (start, end), i in zip(enc.offset_mapping, enc.input_ids):
        if i in tok.all_special_ids:
          w.append(-1)
          continue
        n += start == 0 or text[start - 1].isspace() or w[-1] == -1
        w.append(n)
    words[r, :len(w)] = w
  table = tok_lib.word_start_table(tok)
  assert table.sum() < 0.9 * len(table)  # continuation pieces exist
  return request.param, tok, jnp.asarray(ids), words, jnp.asarray(table)


def _word_mask(tok, table, strategy):
  from mlm_flax.data import tokenizer as tok_lib
  return jax.jit(functools.partial(
      masking.mask_tokens, vocab_size=len(tok), mask_id=tok.mask_token_id,
      special_ids=tok_lib.special_token_ids(tok), pad_id=tok.pad_token_id, strategy=strategy,
      word_starts=table))


@pytest.mark.parametrize('strategy', ['whole_word', 'span'])
def test_whole_words_masked_entirely_or_not_at_all(word_batch, strategy):
  kind, tok, ids, words, table = word_batch
  budget = masking.max_predictions(ids.shape[1], 0.15, strategy)
  chosen_total, maskable_total, runs = 0, 0, []
  for seed in range(2):
    out = _word_mask(tok, table, strategy)(jax.random.PRNGKey(seed), ids)
    w = np.asarray(out.weights) > 0
    assert not w[words == -1].any(), 'specials or padding masked'
    assert w.sum(1).max() <= budget
    for r in range(len(words)):
      for word in np.unique(words[r][words[r] >= 0]):
        got = w[r][words[r] == word]
        assert got.all() or not got.any(), (kind, strategy, tok.convert_ids_to_tokens(
            np.asarray(ids[r])[words[r] == word]), got)
      picked = np.unique(words[r][w[r]])  # runs of consecutive masked words
      runs += [len(g) for g in np.split(picked, np.flatnonzero(np.diff(picked) != 1) + 1) if len(g)]
    chosen_total += w.sum()
    maskable_total += (words >= 0).sum()
  rate = chosen_total / maskable_total
  assert abs(rate - 0.15) < 0.015, rate  # closest whole units to 15% of each row
  if strategy == 'span':  # SpanBERT: Geometric(0.2) clipped to 10 words, mean 3.8 (fewer, merged spans)
    assert np.mean(runs) > 2.5, np.mean(runs)
  else:
    assert np.mean(runs) < 2.0, np.mean(runs)


def test_word_strategies_without_table_and_bad_arguments():
  ids = _batch(jax.random.PRNGKey(6), b=64)
  out = mask(jax.random.PRNGKey(0), ids, strategy='whole_word')  # every token its own word
  w = np.asarray(out.weights)
  assert not w[np.isin(np.asarray(ids), SPECIALS)].any()
  maskable = (~np.isin(np.asarray(ids), SPECIALS)).sum(1)
  np.testing.assert_array_equal(w.sum(1), np.maximum(1, np.floor(0.15 * maskable + 0.5)))
  with pytest.raises(ValueError, match='strategy'):
    mask(jax.random.PRNGKey(0), ids, strategy='words')
  with pytest.raises(ValueError, match='span_p'):
    mask(jax.random.PRNGKey(0), ids, strategy='span', span_p=1.0)
  assert masking.max_predictions(128, 0.15, 'span') == 19 + 5 and masking.max_predictions(128, 0.15) == 19
