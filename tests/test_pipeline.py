"""Streaming packing and exact resume, the training iterator, background prefetch."""

import collections
import json
import threading

import datasets
import jax
import numpy as np
import pytest

from conftest import tiny_config
from mlm_flax import data, parallel
from mlm_flax.data import prefetch, streaming
from mlm_flax.data import tokenizer as tok_lib

WORDS = 'alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu'.split()


def _docs(n=60, seed=0):
  rng = np.random.default_rng(seed)
  return [' '.join(rng.choice(WORDS, rng.integers(1, 30))) for _ in range(n)]


@pytest.fixture(scope='module')
def tok():
  return tok_lib.train_wordpiece(_docs(200), vocab_size=120)  # every word one token


@pytest.fixture
def stream(tmp_path):
  path = tmp_path / 'docs.jsonl'
  path.write_text(''.join(json.dumps({'text': t}) + '\n' for t in _docs()))
  return datasets.load_dataset('json', data_files=str(path), split='train', streaming=True,
                               cache_dir=str(tmp_path / 'cache'))


@pytest.mark.parametrize('packing', data.PACKING_MODES)
def test_pack_stream_matches_pack_tokens(tok, packing):
  docs = [tok(t, add_special_tokens=False).input_ids for t in _docs()]
  ids = (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id)
  expected = data.pack_tokens(np.concatenate(docs).astype(np.int32), [len(d) for d in docs], *ids, 16, packing)
  rows = [r for r, _ in streaming.pack_stream(((i, 0, d) for i, d in enumerate(docs)), *ids, 16, packing)]
  for k in expected:
    np.testing.assert_array_equal(np.stack([r[k] for r in rows]), expected[k], err_msg=k)


def _token_counts(batches):
  return collections.Counter(np.concatenate([b['input_ids'][b['segment_ids'] > 0].ravel() for b in batches]).tolist())


@pytest.mark.parametrize('packing', ['documents', 'group_texts'])
def test_streaming_resume_repeats_and_skips_nothing(tok, stream, packing):
  run = lambda position=(0, 0, 0): streaming.train_batches(stream, tok, 16, 4, seed=1, packing=packing,
                                                             buffer_size=8, position=position)
  full = [next(it) for it in [run()] for _ in range(70)]  # several epochs
  positions = [p for _, p in full]
  assert positions[-1][0] >= 2 and len(set(positions)) == len(positions)
  for k in (1, 7, 13, 29, 45):  # mid-document, mid-epoch and across epoch ends
    resumed = run(positions[k - 1])
    for (a, pa), (b, pb) in zip(full[k:], (next(resumed) for _ in range(70 - k))):
      assert pa == pb
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
  # One epoch (batches of one row: none straddles two epochs) holds every token of the corpus once.
  rows = streaming.train_batches(stream, tok, 16, 1, seed=1, packing=packing, buffer_size=8)
  epoch0 = [next(rows)]
  while epoch0[-1][1][0] == 0:  # the last row of epoch 0 says the next starts epoch 1
    epoch0.append(next(rows))
  if epoch0[-1][1] != (1, 0, 0):  # group_texts: a row of epoch 1 (the remainder of epoch 0 was dropped)
    epoch0.pop()
  specials = {tok.cls_token_id, tok.sep_token_id, tok.pad_token_id}
  corpus = collections.Counter(t for d in _docs() for t in tok(d, add_special_tokens=False).input_ids)
  got = collections.Counter(t for b, _ in epoch0 for t in b['input_ids'].ravel().tolist() if t not in specials)
  if packing == 'documents':
    assert got == corpus
  else:  # group_texts drops the last partial row
    assert got - corpus == collections.Counter() and sum((corpus - got).values()) < 16
  other_epochs = [[b for b, p in full if p[0] == e] for e in (1, 2)]
  assert other_epochs[0][0]['input_ids'].tolist() != full[0][0]['input_ids'].tolist()  # reshuffled


def test_train_iterator_resumes_exactly(tok, stream):
  config = tiny_config()
  config.batch_size, config.max_seq_length = 4, 16
  config.data.shuffle_buffer_size, config.data.packing = 8, 'documents'
  mesh = parallel.make_mesh(1)
  packed = data.pack(datasets.Dataset.from_dict({'text': _docs()}), tok, 16)
  for train in (packed, stream):
    with data.train_iterator(config, train, tok, mesh) as it:
      full = [(np.asarray(b['input_ids']), p) for b, p in (next(it) for _ in range(12))]
    for k in (3, 8):
      position = data.checkpoint_position(full[k - 1][1])  # what the checkpoint's meta holds
      json.dumps(position)
      with data.train_iterator(config, train, tok, mesh, start_step=k, data_position=position) as it:
        for ids, p in full[k:]:
          b, q = next(it)
          np.testing.assert_array_equal(np.asarray(b['input_ids']), ids)
          assert q == p
  assert full[-1][1] != 12 * 4  # streaming positions are (epoch, document, offset)
  with pytest.raises(ValueError, match='Cannot resume streaming'):
    data.train_iterator(config, stream, tok, mesh, start_step=3, data_position=12)


def test_prefetcher_order_errors_and_close():
  with prefetch.Prefetcher(range(10), lambda x: x * x, size=2) as p:
    assert list(p) == [x * x for x in range(10)]
  assert list(prefetch.Prefetcher(range(4), size=0)) == [0, 1, 2, 3]

  def failing():
    yield 1
    raise RuntimeError('bad shard')

  p = prefetch.Prefetcher(failing(), size=2)
  assert next(p) == 1
  with pytest.raises(RuntimeError, match='bad shard'):
    next(p)
  with pytest.raises(RuntimeError, match='bad shard'):  # stays failed
    next(p)

  produced, full = [], threading.Event()
  def endless():
    for i in range(10**9):
      produced.append(i)
      if i == 3:
        full.set()  # 1 and 2 are queued (size=2), 3 is being put: a bounded producer must wait now
      yield i

  p = prefetch.Prefetcher(endless(), size=2)
  assert next(p) == 0
  assert full.wait(timeout=60)
  for taken in range(1, 20):  # bounded: at most `size` items queued + the one being put, ahead of the consumer
    assert len(produced) <= taken + 3, (taken, len(produced))
    assert next(p) == taken
  p.close()
  assert not any(t.name == 'mlm_flax-prefetch' and t.is_alive() for t in threading.enumerate())
  assert p._thread.daemon
