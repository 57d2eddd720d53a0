"""Tokenization + packing into fixed-length rows (cached, split over processes).

Packing (`data.packing`):
  'documents' (default): rows hold several `[CLS] chunk [SEP]` segments;
    `segment_ids` (1, 2, ...; 0 = padding) keep attention within a segment,
    `positions` restart at 0 per segment.
  'group_texts': BERT/HF-style: `[CLS] doc [SEP]` sequences concatenated and cut
    into full rows (one segment: attention crosses documents; the remainder is dropped).
  'line_by_line': one document per row, truncated, padded.

With several processes, each one tokenizes a contiguous 1/P of the documents; the token ids are all-gathered,
so every process packs the same rows.
"""

import hashlib
import json
import os
import tempfile
from typing import TYPE_CHECKING

import datasets
import jax
import numpy as np
import pyarrow.compute as pc

if TYPE_CHECKING:
  import transformers

PACKING_MODES = ('documents', 'group_texts', 'line_by_line')
_PACK_VERSION = 'v1'  # bump when packing changes: old cache entries are then ignored

tokenize_calls = 0  # uncached tokenizations in this process (a cache hit leaves it unchanged)


def tokenizer_fingerprint(tokenizer: 'transformers.PreTrainedTokenizerBase') -> str:
  """A hash of the tokenizer's full definition (vocabulary, merges, normalizer, specials)."""
  backend = getattr(tokenizer, 'backend_tokenizer', None)
  spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
  spec += f'{type(tokenizer).__name__}{tokenizer.cls_token_id}{tokenizer.sep_token_id}{tokenizer.pad_token_id}'
  return hashlib.sha256(spec.encode()).hexdigest()[:16]


def _tokenize(dataset: datasets.Dataset, tokenizer: 'transformers.PreTrainedTokenizerBase',
              num_proc: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Flat int32 token ids of all documents (no special tokens) and each document's length."""
  global tokenize_calls
  tokenize_calls += 1

  def tokenize(batch):  # verbose=False: long documents are chunked when packing, not truncated.
    texts = [t or '' for t in batch['text']]
    return {'input_ids': tokenizer(texts, add_special_tokens=False, verbose=False,
                                   return_attention_mask=False,
                                   return_token_type_ids=False)['input_ids']}

  key = f'{dataset._fingerprint}-{tokenizer_fingerprint(tokenizer)}'  # pylint: disable=protected-access
  tokenized = dataset.map(tokenize, batched=True, num_proc=num_proc if num_proc > 1 else None,
                          remove_columns=dataset.column_names, desc='Tokenizing',
                          new_fingerprint=hashlib.sha256(key.encode()).hexdigest()[:16])
  if len(tokenized) == 0:
    return np.zeros(0, np.int32), np.zeros(0, np.int64)
  column = tokenized.with_format('arrow')[:]['input_ids'].combine_chunks()
  tokens = column.flatten().to_numpy(zero_copy_only=False).astype(np.int32)
  doc_lens = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
  return tokens, doc_lens


def pack_tokens(tokens: np.ndarray, doc_lens: np.ndarray, cls_id: int, sep_id: int, pad_id: int,
                max_seq_length: int, packing: str = 'documents') -> dict[str, np.ndarray]:
  """Packs documents (flat `tokens`, split by `doc_lens`) into rows; see the module docstring.

  Returns int32 [rows, max_seq_length] arrays `input_ids`, `segment_ids` and `positions`.
  """
  if packing not in PACKING_MODES:
    raise ValueError(f'data.packing={packing!r}; use one of {PACKING_MODES}.')
  length = max_seq_length
  doc_lens = np.asarray(doc_lens, np.int64)
  doc_starts = np.cumsum(doc_lens) - doc_lens
  if packing == 'group_texts':
    return _group_texts(tokens, doc_lens, cls_id, sep_id, length)
  return _pack_chunks(tokens, doc_lens, doc_starts, cls_id, sep_id, pad_id, length, packing)


def _group_texts(tokens: np.ndarray, doc_lens: np.ndarray, cls_id: int, sep_id: int,
                 length: int) -> dict[str, np.ndarray]:
  """[CLS] doc [SEP] ... concatenated, cut into full rows (the last partial row dropped)."""
  seq_lens = doc_lens[doc_lens > 0] + 2
  total = int(seq_lens.sum())
  if total < length:
    raise ValueError(f'Packing produced no rows: {total} tokens are fewer than one row of {length}; '
                     'add data or lower max_seq_length.')
  stream = np.empty(total, np.int32)
  seq_starts = np.cumsum(seq_lens) - seq_lens
  body = np.ones(total, bool)
  body[seq_starts] = body[seq_starts + seq_lens - 1] = False
  stream[seq_starts], stream[seq_starts + seq_lens - 1] = cls_id, sep_id
  stream[body] = tokens
  rows = total // length
  ids = stream[:rows * length].reshape(rows, length)
  return {'input_ids': ids, 'segment_ids': np.ones_like(ids),
          'positions': np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape).copy()}


def _pack_chunks(tokens: np.ndarray, doc_lens: np.ndarray, doc_starts: np.ndarray, cls_id: int, sep_id: int,
                 pad_id: int, length: int, packing: str) -> dict[str, np.ndarray]:
  """Chunks of at most length - 2 tokens, in document order (line_by_line: the first only), each with [CLS]
  and [SEP], one per row (line_by_line) or packed greedily in order (documents)."""
  size = length - 2
  n_chunks = -(-doc_lens // size)
  if packing == 'line_by_line':
    n_chunks = np.minimum(n_chunks, 1)
  doc = np.repeat(np.arange(len(doc_lens)), n_chunks)
  k = np.arange(len(doc)) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
  chunk_start = doc_starts[doc] + k * size
  seg_len = np.minimum(size, doc_lens[doc] - k * size) + 2  # with [CLS] and [SEP]
  if len(seg_len) == 0:
    raise ValueError('Packing produced no rows: the dataset has no tokens; add data.')

  if packing == 'line_by_line':
    row, offset, segment = np.arange(len(seg_len)), np.zeros(len(seg_len), np.int64), np.ones(len(seg_len), np.int32)
    r = len(seg_len) - 1
  else:  # Greedy in-order packing: a loop over chunks (not tokens), fast enough.
    row = np.empty(len(seg_len), np.int64)
    offset = np.empty(len(seg_len), np.int64)
    segment = np.empty(len(seg_len), np.int32)
    r, fill, s = 0, 0, 0
    for i, n in enumerate(seg_len.tolist()):
      if fill + n > length:
        r, fill, s = r + 1, 0, 0
      row[i], offset[i], segment[i] = r, fill, s + 1
      fill, s = fill + n, s + 1

  # Scatter every segment token to its place in the flat [rows * length] arrays.
  seg = np.repeat(np.arange(len(seg_len)), seg_len)
  pos = np.arange(len(seg)) - np.repeat(np.cumsum(seg_len) - seg_len, seg_len)
  src = np.clip(chunk_start[seg] + pos - 1, 0, len(tokens) - 1)  # in range at CLS/SEP
  ids = np.where(pos == 0, cls_id, np.where(pos == seg_len[seg] - 1, sep_id, tokens[src]))
  dest = row[seg] * length + offset[seg] + pos
  shape = (r + 1, length)
  out = {'input_ids': np.full(shape, pad_id, np.int32),
         'segment_ids': np.zeros(shape, np.int32), 'positions': np.zeros(shape, np.int32)}
  out['input_ids'].flat[dest] = ids
  out['segment_ids'].flat[dest] = segment[seg]
  out['positions'].flat[dest] = pos
  return out


def _check_packable(tokenizer: 'transformers.PreTrainedTokenizerBase', max_seq_length: int) -> None:
  if max_seq_length < 3:
    raise ValueError(f'max_seq_length={max_seq_length} leaves no room for text; use >= 3.')
  if None in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id):
    raise ValueError('pack needs a tokenizer with CLS, SEP and PAD tokens (BERT/RoBERTa-style).')


def pack(dataset: datasets.Dataset, tokenizer: 'transformers.PreTrainedTokenizerBase',
         max_seq_length: int, num_proc: int = 1, packing: str = 'documents') -> dict[str, np.ndarray]:
  """Tokenizes `dataset['text']` (`datasets.map`, batched) and packs it into rows (no cache).

  'documents': documents longer than max_seq_length - 2 tokens are split into
  chunks; chunks are packed greedily in order, a new row starting when the next
  one does not fit. See `pack_tokens` and the module docstring for the other modes.
  """
  _check_packable(tokenizer, max_seq_length)
  if len(dataset) == 0:
    raise ValueError('Packing produced no rows: the dataset is empty; add data.')
  tokens, doc_lens = _tokenize(dataset, tokenizer, num_proc)
  return pack_tokens(tokens, doc_lens, tokenizer.cls_token_id, tokenizer.sep_token_id,
                     tokenizer.pad_token_id, max_seq_length, packing)


def packed_rows(dataset: datasets.Dataset, tokenizer: 'transformers.PreTrainedTokenizerBase',
                max_seq_length: int, packing: str = 'documents', num_proc: int = 1,
                cache: str | None = None) -> dict[str, np.ndarray]:
  """`pack`, cached under `cache/packed/` and with tokenization split over the processes.

  The cache key is the dataset fingerprint (files and every transform on them), the
  tokenizer's full definition, max_seq_length and the packing mode: a second run on
  the same data and tokenizer loads the rows and tokenizes nothing. With P processes,
  process p tokenizes the p-th contiguous 1/P of the documents; all-gathering the ids
  gives every process the rows a single process would pack.
  """
  from mlm_flax import parallel  # pylint: disable=g-import-not-at-top
  _check_packable(tokenizer, max_seq_length)
  if packing not in PACKING_MODES:
    raise ValueError(f'data.packing={packing!r}; use one of {PACKING_MODES}.')
  path = None
  if cache and dataset.cache_files:  # in-memory datasets (a streamed validation split) are not cached
    key = hashlib.sha256('-'.join([_PACK_VERSION, dataset._fingerprint, tokenizer_fingerprint(tokenizer),  # pylint: disable=protected-access
                                   str(max_seq_length), packing]).encode()).hexdigest()[:20]
    path = os.path.join(cache, 'packed', f'{key}.npz')
  if path and parallel.all_processes(os.path.isfile(path)):
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  if len(dataset) == 0:
    raise ValueError('Packing produced no rows: the dataset is empty; add data.')
  count, index = jax.process_count(), jax.process_index()
  shard = dataset.shard(count, index, contiguous=True) if count > 1 else dataset
  tokens, doc_lens = _tokenize(shard, tokenizer, num_proc)
  if count > 1:
    tokens, doc_lens = parallel.allgather_concat(tokens), parallel.allgather_concat(doc_lens)
  out = pack_tokens(tokens, doc_lens, tokenizer.cls_token_id, tokenizer.sep_token_id,
                    tokenizer.pad_token_id, max_seq_length, packing)
  if path:  # atomic: a concurrent or killed writer never leaves a partial file
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix='.npz', dir=os.path.dirname(path))
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, **out)
    os.replace(tmp, path)
  return out
