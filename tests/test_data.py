"""Tests for the built-in corpus, tokenizers, loading, packing and batch iterators."""

import json
import os
import sys

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tokenizers  # noqa: E402
import transformers  # noqa: E402

from mlm_flax.configs import default  # noqa: E402
from mlm_flax import data  # noqa: E402
from mlm_flax.data import corpora  # noqa: E402
from mlm_flax.data import tokenizer as tok_lib  # noqa: E402


def _read_jsonl(path):
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def _data_cfg(cache_dir, **overrides):
  cfg = default.get_config().data
  cfg.cache_dir = str(cache_dir)
  for k, v in overrides.items():
    setattr(cfg, k, v)
  return cfg


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  cache = tmp_path_factory.mktemp('cache')
  return cache, corpora.stdlib_docs(str(cache))


@pytest.fixture(scope='module')
def wordpiece(corpus):
  texts = [d['text'] for d in _read_jsonl(corpus[1]['train'])]
  return tok_lib.train_wordpiece(texts, vocab_size=2000)


# Built-in corpus.

def test_stdlib_docs_splits_are_disjoint_and_sizeable(corpus, monkeypatch):
  cache, paths = corpus
  train, val = _read_jsonl(paths['train']), _read_jsonl(paths['validation'])
  assert len(train) > 3000 and len(val) > 50
  assert 0.02 < len(val) / (len(train) + len(val)) < 0.1
  assert sum(len(d['text'].split()) for d in train) > 100_000
  key = lambda d: corpora._split_key(d['source'])  # top-level module, or a pydoc topic
  assert not {key(d) for d in train} & {key(d) for d in val}
  assert not {d['text'] for d in train} & {d['text'] for d in val}
  assert all(len(d['text'].split()) >= 5 for d in train + val)
  sources = [d['source'] for d in train + val]
  assert not [s for s in sources if s.startswith(('test.', 'idlelib.idle_test', 'lib2to3.tests'))]
  assert 'email' in {s.split('.')[0] for s in sources}
  assert any(s.startswith('pydoc_data.topics:') for s in sources)
  # Parsed, never imported: these modules have side effects on import.
  assert 'antigravity' not in sys.modules and 'this' not in sys.modules
  assert len(os.listdir(os.path.join(cache, 'corpora'))) == 1  # no temp dir left
  mtime = os.path.getmtime(paths['train'])
  def rebuild():
    raise AssertionError('the cached corpus was rebuilt')
  monkeypatch.setattr(corpora, '_stdlib_documents', rebuild)  # a second call reads the cache, builds nothing
  assert corpora.stdlib_docs(str(cache)) == paths
  assert os.path.getmtime(paths['train']) == mtime


def test_normalize_docstring_joins_paragraph_lines():
  doc = """First line
      continues here.

      Second   paragraph.
  """
  assert corpora.normalize_docstring(doc) == 'First line continues here.\nSecond paragraph.'


# Tokenizers.

def test_wordpiece_roundtrip(wordpiece, tmp_path):
  assert len(wordpiece) == 2000
  wordpiece.save_pretrained(tmp_path)
  loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
  assert isinstance(loaded, transformers.BertTokenizer)
  texts = ['Return the Multiprocessing subinterpreter, unchanged.', 'a [MASK] b', '']
  for text in texts:
    assert loaded(text).input_ids == wordpiece(text).input_ids
  ids = loaded('a [MASK] b').input_ids
  assert loaded.convert_ids_to_tokens(ids) == ['[CLS]', 'a', '[MASK]', 'b', '[SEP]']
  assert (loaded.pad_token_id, loaded.unk_token_id, loaded.cls_token_id,
          loaded.sep_token_id, loaded.mask_token_id) == (0, 1, 2, 3, 4)
  assert tok_lib.special_token_ids(loaded) == (0, 1, 2, 3, 4)
  text = 'subinterpreters tokenization'
  pieces = loaded.tokenize(text)
  assert any(p.startswith('##') for p in pieces)
  assert loaded.decode(loaded(text).input_ids, skip_special_tokens=True) == text
  assert loaded.decode(loaded("it's here").input_ids) == "[CLS] it's here [SEP]"


def test_wordpiece_cased():
  tok = tok_lib.train_wordpiece(['Hello World hello world'] * 50, vocab_size=100, lowercase=False)
  assert tok.tokenize('Hello hello') == ['Hello', 'hello']


def test_get_tokenizer_trains_saves_and_resumes(tmp_path):
  cfg = _data_cfg(tmp_path, tokenizer_vocab_size=200)
  texts = ['the quick brown fox jumps over the lazy dog'] * 20
  first = tok_lib.get_tokenizer(cfg, lambda: texts, str(tmp_path))
  assert os.path.isfile(tmp_path / 'tokenizer' / 'tokenizer.json')

  def no_training():
    raise AssertionError('must load the saved tokenizer, not train')

  again = tok_lib.get_tokenizer(cfg, no_training, str(tmp_path))
  assert again.get_vocab() == first.get_vocab()


def test_load_tokenizer_without_mask_token_fails(tmp_path):
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({'[UNK]': 0, 'a': 1}, '[UNK]'))
  transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token='[UNK]').save_pretrained(
      tmp_path)
  with pytest.raises(ValueError, match='no mask token'):
    tok_lib.load_tokenizer(str(tmp_path))


# Packing.

def _reference_pack(docs, cls, sep, pad, length):
  """Plain-Python packing: the spec that `data.pack` vectorises."""
  size = length - 2
  segments = [[cls] + d[i:i + size] + [sep] for d in docs for i in range(0, len(d), size)]
  rows = [[]]
  for s in segments:
    if sum(map(len, rows[-1])) + len(s) > length:
      rows.append([])
    rows[-1].append(s)
  keys = ('input_ids', 'segment_ids', 'positions')
  out = {k: np.zeros((len(rows), length), np.int32) for k in keys}
  out['input_ids'][:] = pad
  for r, row in enumerate(rows):
    flat = [(t, n + 1, p) for n, s in enumerate(row) for p, t in enumerate(s)]
    for k, column in zip(out, zip(*flat)):
      out[k][r, :len(flat)] = column
  return out


def test_pack_invariants(wordpiece):
  length = 16
  texts = ['one two three', 'a ' * 40 + 'end', 'x', 'the module docstring of os path helpers',
           'short', 'tokens ' * 13, 'last doc here']
  docs = [wordpiece(t, add_special_tokens=False).input_ids for t in texts]
  packed = data.pack(datasets.Dataset.from_dict({'text': texts}), wordpiece, length)
  assert {k: (v.shape[1], v.dtype) for k, v in packed.items()} == {
      k: (length, np.int32) for k in ('input_ids', 'segment_ids', 'positions')}
  ref = _reference_pack(docs, wordpiece.cls_token_id, wordpiece.sep_token_id,
                        wordpiece.pad_token_id, length)
  for k in ref:
    np.testing.assert_array_equal(packed[k], ref[k], err_msg=k)

  ids, seg, pos = packed['input_ids'], packed['segment_ids'], packed['positions']
  cls, sep, pad = wordpiece.cls_token_id, wordpiece.sep_token_id, wordpiece.pad_token_id
  text_tokens = ids[(seg > 0) & (ids != cls) & (ids != sep)]
  assert text_tokens.tolist() == [t for d in docs for t in d]  # each token once, in order
  assert (ids[seg == 0] == pad).all() and (pos[seg == 0] == 0).all()
  n_segments = 0
  for r in range(len(ids)):
    used = int((seg[r] > 0).sum())
    assert (seg[r, :used] > 0).all() and (seg[r, used:] == 0).all()  # padding only at the end
    for s in range(1, seg[r].max() + 1):
      where = np.flatnonzero(seg[r] == s)
      assert where.tolist() == list(range(where[0], where[0] + len(where)))
      assert pos[r, where].tolist() == list(range(len(where)))
      assert ids[r, where[0]] == cls and ids[r, where[-1]] == sep
      n_segments += 1
    if r + 1 < len(ids):  # greedy: the next row's first segment did not fit here
      assert used + int((seg[r + 1] == 1).sum()) > length
  assert len(docs[1]) > 2 * (length - 2)
  assert n_segments == sum(-(-len(d) // (length - 2)) for d in docs)


def test_pack_empty_dataset_fails(wordpiece):
  with pytest.raises(ValueError, match='no rows'):
    data.pack(datasets.Dataset.from_dict({'text': ['', ' ']}), wordpiece, 16)


# Loading.

def test_load_local_text_files_carves_validation(tmp_path):
  lines = [f'document number {i} with some words' for i in range(40)]
  for i, chunk in enumerate((lines[:25], lines[25:])):
    (tmp_path / f'part{i}.txt').write_text('\n'.join(chunk[:5] + ['', '   '] + chunk[5:]) + '\n')
  cfg = _data_cfg(tmp_path / 'cache', dataset='', train_files=str(tmp_path / 'part*.txt'),
                  validation_fraction=0.2)
  splits = data.load_text_splits(cfg, seed=0)
  assert set(splits) == {'train', 'validation'}
  assert splits['train'].column_names == ['text'] == splits['validation'].column_names
  assert (len(splits['train']), len(splits['validation'])) == (32, 8)
  assert sorted(list(splits['train']['text']) + list(splits['validation']['text'])) == sorted(lines)
  val = list(splits['validation']['text'])
  assert list(data.load_text_splits(cfg, seed=0)['validation']['text']) == val
  assert list(data.load_text_splits(cfg, seed=1)['validation']['text']) != val

  cfg.validation_files = str(tmp_path / 'part1.txt')
  cfg.train_files = str(tmp_path / 'part0.txt')
  splits = data.load_text_splits(cfg, seed=0)
  assert list(splits['validation']['text']) == lines[25:]
  assert list(splits['train']['text']) == lines[:25]


def test_load_text_column_errors_and_rename(tmp_path):
  path = tmp_path / 'docs.jsonl'
  path.write_text(''.join(json.dumps({'body': f'text {i}', 'id': i}) + '\n' for i in range(10)))
  cfg = _data_cfg(tmp_path / 'cache', dataset='', train_files=str(path))
  with pytest.raises(ValueError, match=r"no text column 'text'.*\['body', 'id'\]"):
    data.load_text_splits(cfg, seed=0)
  cfg.text_column = 'body'
  splits = data.load_text_splits(cfg, seed=0)
  assert splits['train'].column_names == ['text'] and len(splits['train']) == 9

  cfg.train_files = str(tmp_path / 'nothing_*.txt')
  with pytest.raises(FileNotFoundError, match='nothing_'):
    data.load_text_splits(cfg, seed=0)
  cfg = _data_cfg(tmp_path / 'cache', dataset='builtin:nope')
  with pytest.raises(ValueError, match='builtin:stdlib_docs'):
    data.load_text_splits(cfg, seed=0)


def test_load_builtin(corpus):
  splits = data.load_text_splits(_data_cfg(corpus[0]), seed=0)
  expected = [d['text'] for d in _read_jsonl(corpus[1]['validation'])]
  assert list(splits['validation']['text']) == expected
  assert splits['train'].column_names == ['text'] and len(splits['train']) > 3000
  assert os.listdir(os.path.join(corpus[0], 'corpora')) == [os.path.basename(os.path.dirname(
      corpus[1]['train']))]  # reused, not rebuilt elsewhere


def test_cache_dir_precedence(monkeypatch, tmp_path):
  monkeypatch.setenv('MLM_FLAX_CACHE', str(tmp_path / 'env'))
  assert data.cache_dir(_data_cfg(tmp_path / 'cfg')) == str(tmp_path / 'cfg')
  cfg = default.get_config().data
  assert data.cache_dir(cfg) == str(tmp_path / 'env')
  monkeypatch.delenv('MLM_FLAX_CACHE')
  assert data.cache_dir(cfg) == os.path.expanduser('~/.cache/mlm_flax')


# Batches.

def _packed(rows, length=4):
  ids = np.arange(rows * length, dtype=np.int32).reshape(rows, length) + 10
  return {'input_ids': ids, 'segment_ids': np.ones_like(ids), 'positions': np.zeros_like(ids)}


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_train_batches_deterministic_and_resumable():
  packed = _packed(10)  # batch 4: 2 steps per epoch, 2 rows dropped each epoch
  run = _take(data.train_batches(packed, 4, seed=3), 9)
  again = _take(data.train_batches(packed, 4, seed=3), 9)
  for a, b in zip(run, again):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  for start in (1, 2, 5):  # mid-epoch and on epoch boundaries
    resumed = _take(data.train_batches(packed, 4, seed=3, start_step=start), 9 - start)
    for a, b in zip(resumed, run[start:]):
      for k in a:
        np.testing.assert_array_equal(a[k], b[k])
  first_rows = lambda b: (b['input_ids'][:, 0] - 10) // 4
  epochs = [np.concatenate([first_rows(b) for b in run[e:e + 2]]) for e in (0, 2, 4)]
  assert all(len(set(e.tolist())) == 8 for e in epochs)  # no row twice in an epoch
  assert len({tuple(e) for e in epochs}) == 3  # reshuffled every epoch
  other_seed = _take(data.train_batches(packed, 4, seed=4), 2)
  assert any((a['input_ids'] != b['input_ids']).any() for a, b in zip(run, other_seed))


def test_train_batches_process_slices():
  packed = _packed(12)
  full = _take(data.train_batches(packed, 6, seed=0, start_step=1), 3)
  parts = [_take(data.train_batches(packed, 6, seed=0, start_step=1, process_index=i,
                                    process_count=3), 3) for i in range(3)]
  for step, batch in enumerate(full):
    for k in batch:
      assert all(p[step][k].shape == (2, 4) for p in parts)
      np.testing.assert_array_equal(np.concatenate([p[step][k] for p in parts]), batch[k])
  with pytest.raises(ValueError, match='divisible'):
    next(data.train_batches(packed, 6, seed=0, process_count=4))
  with pytest.raises(ValueError, match='lower batch_size'):
    next(data.train_batches(packed, 13, seed=0))


def test_eval_batches_cover_every_row_once():
  packed = _packed(10)
  packed['input_ids'][-1, -1], packed['segment_ids'][-1, -1] = 7, 0  # pad id 7, read from the data
  assert data.num_eval_batches(packed, 4) == 3
  batches = list(data.eval_batches(packed, 4))
  assert len(batches) == 3 and all(b['input_ids'].shape == (4, 4) for b in batches)
  stacked = {k: np.concatenate([b[k] for b in batches]) for k in packed}
  for k in packed:
    np.testing.assert_array_equal(stacked[k][:10], packed[k])
  assert (stacked['input_ids'][10:] == 7).all()
  assert (stacked['segment_ids'][10:] == 0).all() and (stacked['positions'][10:] == 0).all()
  halves = [list(data.eval_batches(packed, 4, process_index=i, process_count=2)) for i in range(2)]
  for b, (h0, h1) in enumerate(zip(*halves)):
    np.testing.assert_array_equal(np.concatenate([h0['input_ids'], h1['input_ids']]),
                                  batches[b]['input_ids'])
  assert len(list(data.eval_batches(_packed(8), 4))) == data.num_eval_batches(_packed(8), 4) == 2


# Local formats, errors, the tokenization cache, packing modes, the BPE tokenizer.

def _write_format(tmp_path, fmt, texts, column='text'):
  import pandas as pd  # pylint: disable=g-import-not-at-top
  extra = {'id': list(range(len(texts)))}
  if fmt == 'txt':
    (tmp_path / 'a.txt').write_text('\n'.join(texts[:3]) + '\n\n')
    (tmp_path / 'b.txt').write_text('\n'.join(texts[3:]) + '\n')
    return str(tmp_path / '*.txt')
  frame = pd.DataFrame({column: texts, **extra})
  path = tmp_path / f'docs.{fmt}'
  if fmt in ('json', 'jsonl'):
    frame.to_json(path, orient='records', lines=True)
  elif fmt == 'csv':
    frame.to_csv(path, index=False)
  else:
    frame.to_parquet(path)
  return str(path)


@pytest.mark.parametrize('fmt', ['txt', 'json', 'jsonl', 'csv', 'parquet'])
def test_local_formats(tmp_path, fmt):
  texts = [f'document {i}, with words' for i in range(8)]
  pattern = _write_format(tmp_path, fmt, texts)
  cfg = _data_cfg(tmp_path / 'cache', dataset='', train_files=pattern, validation_files=pattern)
  splits = data.load_text_splits(cfg, seed=0)
  assert list(splits['train']['text']) == texts == list(splits['validation']['text'])
  if fmt != 'txt':
    cfg.text_column = 'body'
    with pytest.raises(ValueError, match=r"no text column 'body'.*\['text', 'id'\]"):
      data.load_text_splits(cfg, seed=0)


def test_empty_and_unmatched_sources_fail_clearly(tmp_path):
  (tmp_path / 'blank.txt').write_text('\n   \n\n')
  cfg = _data_cfg(tmp_path / 'cache', dataset='', train_files=str(tmp_path / 'blank.txt'))
  with pytest.raises(ValueError, match='train split is empty'):
    data.load_text_splits(cfg, seed=0)
  cfg.streaming = True
  with pytest.raises(ValueError, match='train split is empty'):
    data.load_text_splits(cfg, seed=0)
  cfg.train_files = str(tmp_path / 'missing' / '*.jsonl')
  with pytest.raises(FileNotFoundError, match='matches no file'):
    data.load_text_splits(cfg, seed=0)
  (tmp_path / 'x.csv').write_text('a\n1\n')
  cfg.train_files, cfg.streaming = str(tmp_path / 'x.csv'), True
  with pytest.raises(ValueError, match=r"no text column 'text'.*\['a'\]"):
    data.load_text_splits(cfg, seed=0)


def test_streaming_load_carves_validation_off_the_stream(tmp_path):
  texts = [f'document {i} here' for i in range(30)]
  cfg = _data_cfg(tmp_path / 'cache', dataset='', train_files=_write_format(tmp_path, 'jsonl', texts),
                  streaming=True, streaming_validation_docs=5)
  splits = data.load_text_splits(cfg, seed=0)
  assert isinstance(splits['train'], datasets.IterableDataset)
  assert list(splits['validation']['text']) == texts[:5]
  assert [x['text'] for x in splits['train']] == texts[5:]


def test_packed_rows_cached_on_second_run(tmp_path, wordpiece):
  texts = [f'line {i} of the cached corpus, tokenized once' for i in range(200)]
  pattern = _write_format(tmp_path, 'jsonl', texts)
  cfg = _data_cfg(tmp_path / 'cache', dataset='', train_files=pattern, validation_files=pattern)
  cache = str(tmp_path / 'cache')
  calls = data.tokenize_calls
  first = data.packed_rows(data.load_text_splits(cfg, 0)['train'], wordpiece, 32, cache=cache)
  assert data.tokenize_calls == calls + 1
  again = data.packed_rows(data.load_text_splits(cfg, 0)['train'], wordpiece, 32, cache=cache)
  assert data.tokenize_calls == calls + 1  # loaded from cache/packed/*.npz, nothing tokenized
  for k in first:
    np.testing.assert_array_equal(again[k], first[k])
  reference = data.pack(data.load_text_splits(cfg, 0)['train'], wordpiece, 32)  # uncached: tokenizes
  for k in first:
    np.testing.assert_array_equal(first[k], reference[k])
  calls += 1
  data.packed_rows(data.load_text_splits(cfg, 0)['train'], wordpiece, 64, cache=cache)  # new key
  data.packed_rows(data.load_text_splits(cfg, 0)['train'], wordpiece, 32, 'group_texts', cache=cache)
  assert data.tokenize_calls == calls + 3
  assert len(os.listdir(os.path.join(cache, 'packed'))) == 3


def test_group_texts_and_line_by_line(wordpiece):
  texts = ['one two three', 'a ' * 40 + 'end', 'x', 'short doc', 'tokens ' * 13]
  docs = [wordpiece(t, add_special_tokens=False).input_ids for t in texts]
  ds = datasets.Dataset.from_dict({'text': texts})
  cls, sep, pad = wordpiece.cls_token_id, wordpiece.sep_token_id, wordpiece.pad_token_id
  length = 16
  grouped = data.pack(ds, wordpiece, length, packing='group_texts')
  stream = [t for d in docs for t in [cls] + d + [sep]]
  assert grouped['input_ids'].tolist() == np.reshape(
      stream[:len(stream) // length * length], (-1, length)).tolist()  # remainder dropped
  assert (grouped['segment_ids'] == 1).all()  # one segment: attention across documents
  assert (grouped['positions'] == np.arange(length)).all()
  lines = data.pack(ds, wordpiece, length, packing='line_by_line')
  assert len(lines['input_ids']) == len(texts)
  for row, d in zip(lines['input_ids'].tolist(), docs):
    body = d[:length - 2]
    assert row == [cls] + body + [sep] + [pad] * (length - 2 - len(body))
  assert set(np.unique(lines['segment_ids'])) == {0, 1}
  with pytest.raises(ValueError, match="data.packing='grouped'"):
    data.pack(ds, wordpiece, length, packing='grouped')


def test_bpe_tokenizer_mask_token_and_word_starts(tmp_path, corpus):
  texts = [d['text'] for d in _read_jsonl(corpus[1]['train'])[:800]]
  tok = tok_lib.train_bpe(texts, vocab_size=1000)
  assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id,
          tok.mask_token_id) == (0, 1, 2, 3, 4)
  tok.save_pretrained(tmp_path / 'bpe')
  loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / 'bpe')
  for t in (tok, loaded):
    ids = t('a <mask> b').input_ids
    assert ids.count(t.mask_token_id) == 1 and len(ids) == 5, t.convert_ids_to_tokens(ids)  # <s> a <mask> Ġb </s>
    assert t.decode(t('Return the value, unchanged.').input_ids, skip_special_tokens=True) == \
        'Return the value, unchanged.'
  assert tok_lib.train_bpe(texts, vocab_size=1000).get_vocab() == tok.get_vocab()  # reproducible
  table = tok_lib.word_start_table(loaded)
  pieces = loaded.convert_ids_to_tokens(loaded(' tokenization').input_ids[1:-1])
  assert [bool(table[loaded.convert_tokens_to_ids(p)]) for p in pieces] == [True] + [False] * (len(pieces) - 1)
  cfg = _data_cfg(tmp_path, tokenizer_type='bpe', tokenizer_vocab_size=300)
  got = tok_lib.get_tokenizer(cfg, lambda: texts[:100], str(tmp_path / 'work'))
  assert type(got).__name__ == 'RobertaTokenizer' and len(got) == 300
  cfg.tokenizer_type = 'unigram'
  with pytest.raises(ValueError, match="tokenizer_type='unigram'"):
    tok_lib.get_tokenizer(cfg, lambda: texts[:100], None)
