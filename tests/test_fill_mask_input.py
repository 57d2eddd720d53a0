"""fill_mask on any input: the documented result shape or the documented ValueError, nothing else.

Property-based (hypothesis) on a tiny random BERT saved with transformers' `save_pretrained` and read
with `inference.load`, as a user's model folder would be.
"""

import pytest

pytest.importorskip('torch')
hypothesis = pytest.importorskip('hypothesis')
from hypothesis import HealthCheck, given, settings, strategies as st  # pylint: disable=g-import-not-at-top

from mlm_flax import inference  # pylint: disable=g-import-not-at-top
from test_hf import _save_random  # pylint: disable=g-import-not-at-top

MASK = '[MASK]'
TOP_K = 3
SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

# Any unicode (letters, marks, symbols, controls, whitespace) interleaved with mask tokens.
pieces = st.one_of(st.text(max_size=12), st.just(MASK), st.just(' '), st.sampled_from(['the', 'file', '.']))
texts = st.lists(pieces, max_size=14).map(''.join)


@pytest.fixture(scope='module')
def mlm(tmp_path_factory):
  path, _, _ = _save_random(tmp_path_factory.mktemp('fill_mask'), 'bert')
  return inference.load(path)


def _problem(mlm, text):
  """The documented reason `text` is refused, or None."""
  ids = mlm.tokenizer(text)['input_ids']
  if mlm.tokenizer.mask_token_id not in ids:
    return 'no mask token'
  if len(ids) > inference.max_length(mlm):
    return 'positions'
  return None


def _check_one(mlm, text, result):
  """The pipeline's shape: a list of predictions for one mask, a list of such lists for several."""
  num_masks = mlm.tokenizer(text)['input_ids'].count(mlm.tokenizer.mask_token_id)
  per_mask = [result] if num_masks == 1 else result
  assert isinstance(per_mask, list) and len(per_mask) == num_masks
  for preds in per_mask:
    assert len(preds) == TOP_K
    assert [set(p) for p in preds] == [{'score', 'token', 'token_str', 'sequence'}] * TOP_K
    scores = [p['score'] for p in preds]
    assert scores == sorted(scores, reverse=True) and all(0.0 <= s <= 1.0 for s in scores)
    assert all(isinstance(p['sequence'], str) and 0 <= p['token'] < len(mlm.tokenizer) for p in preds)


@SETTINGS
@given(text=texts)
def test_any_text_gives_the_documented_shape_or_value_error(mlm, text):
  problem = _problem(mlm, text)
  if problem:
    with pytest.raises(ValueError, match=problem):
      inference.fill_mask(mlm, text, top_k=TOP_K)
  else:
    _check_one(mlm, text, inference.fill_mask(mlm, text, top_k=TOP_K))


@SETTINGS
@given(batch=st.lists(texts, min_size=2, max_size=5))
def test_a_batch_is_all_results_or_a_value_error_naming_the_first_bad_text(mlm, batch):
  problems = [_problem(mlm, t) for t in batch]
  bad = next((i for i, p in enumerate(problems) if p), None)
  if bad is not None:
    with pytest.raises(ValueError, match=f'text {bad} .*{problems[bad]}|{problems[bad]}.* text {bad} '):
      inference.fill_mask(mlm, batch, top_k=TOP_K)
  else:
    out = inference.fill_mask(mlm, batch, top_k=TOP_K)
    assert len(out) == len(batch)
    for text, result in zip(batch, out):
      _check_one(mlm, text, result)


def test_edge_cases(mlm):
  limit = inference.max_length(mlm)
  with pytest.raises(ValueError, match='no mask token'):
    inference.fill_mask(mlm, '')
  only_masks = inference.fill_mask(mlm, MASK * 5, top_k=TOP_K)
  _check_one(mlm, MASK * 5, only_masks)
  many = ' '.join([MASK] * (limit - 2))  # every position but [CLS] and [SEP]
  _check_one(mlm, many, inference.fill_mask(mlm, many, top_k=TOP_K))
  with pytest.raises(ValueError, match='positions'):
    inference.fill_mask(mlm, 'the file ' * 5000 + MASK)
  with pytest.raises(ValueError, match='text 1 is a NoneType'):
    inference.fill_mask(mlm, ['the ' + MASK, None])
  with pytest.raises(ValueError, match='top_k'):
    inference.fill_mask(mlm, 'the ' + MASK, top_k=0)
  assert inference.fill_mask(mlm, []) == []
  big_k = inference.fill_mask(mlm, 'the ' + MASK, top_k=10 ** 6)  # capped at the vocabulary
  assert len(big_k) == len(mlm.tokenizer)
