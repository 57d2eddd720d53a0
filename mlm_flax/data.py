"""Text loading, tokenization + packing, and deterministic batch iterators.

Packed rows hold several `[CLS] chunk [SEP]` segments; `segment_ids` (1, 2,
...; 0 = padding) let attention stay within a segment, `positions` restart at
0 per segment. The training batch for step s is a pure function of (seed, s),
which makes resuming exact.
"""

import glob
import itertools
import os
from typing import TYPE_CHECKING, Iterator

import datasets
import ml_collections
import numpy as np
import pyarrow.compute as pc

from mlm_flax import corpora

if TYPE_CHECKING:
  import transformers

_BUILDERS = {'.txt': 'text', '.text': 'text', '.json': 'json', '.jsonl': 'json',
             '.csv': 'csv', '.parquet': 'parquet'}


def cache_dir(data_cfg: ml_collections.ConfigDict) -> str:
  """data_cfg.cache_dir, else $MLM_FLAX_CACHE, else ~/.cache/mlm_flax."""
  return os.path.expanduser(data_cfg.cache_dir or os.environ.get('MLM_FLAX_CACHE')
                            or '~/.cache/mlm_flax')


def _load_files(pattern: str, what: str, cache: str) -> datasets.Dataset:
  """Loads the files matching a path or glob, with the builder their extension names."""
  files = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
  if not files:
    raise FileNotFoundError(f'data.{what} = {pattern!r} matches no file; fix the path or glob.')
  exts = {os.path.splitext(f)[1].lower() for f in files}
  builders = {_BUILDERS.get(e) for e in exts}
  if None in builders or len(builders) > 1:
    raise ValueError(f'data.{what} = {pattern!r} matches files of types {sorted(exts)}; use one '
                     f'type among {sorted(_BUILDERS)}.')
  return datasets.load_dataset(builders.pop(), data_files={'train': files}, split='train',
                               cache_dir=cache)


def _load_raw(data_cfg: ml_collections.ConfigDict) -> dict[str, datasets.Dataset]:
  """Splits as found: local files take precedence over data_cfg.dataset."""
  cache = os.path.join(cache_dir(data_cfg), 'datasets')
  if data_cfg.streaming:
    raise NotImplementedError('data.streaming=True is not supported yet; set it to False.')
  if data_cfg.validation_files and not data_cfg.train_files:
    raise ValueError('data.validation_files is set but data.train_files is not; set both.')
  if data_cfg.train_files:
    splits = {'train': _load_files(data_cfg.train_files, 'train_files', cache)}
    if data_cfg.validation_files:
      splits['validation'] = _load_files(data_cfg.validation_files, 'validation_files', cache)
    return splits
  name = data_cfg.dataset
  if not name:
    raise ValueError('No data: set data.dataset (builtin:NAME or a hub name) or data.train_files.')
  if name.startswith('builtin:'):
    builtin = name.removeprefix('builtin:')
    if builtin not in corpora.CORPORA:
      raise ValueError(f'Unknown builtin corpus {builtin!r}; known: '
                       f'{", ".join("builtin:" + k for k in sorted(corpora.CORPORA))}.')
    files = corpora.CORPORA[builtin](cache_dir(data_cfg))
    return dict(datasets.load_dataset('json', data_files=files, cache_dir=cache))
  loaded = datasets.load_dataset(name, data_cfg.dataset_config, cache_dir=cache)
  if 'train' not in loaded:
    raise ValueError(f'Dataset {name!r} has no train split (splits: {list(loaded)}).')
  return {k: v for k, v in loaded.items() if k in ('train', 'validation')}


def _clean(ds: datasets.Dataset, column: str, split: str) -> datasets.Dataset:
  """Keeps only `column` (renamed `text`), drops blank rows, refuses an empty split."""
  if column not in ds.column_names:
    raise ValueError(f'The {split} split has no text column {column!r}; its columns are '
                     f'{ds.column_names}. Set data.text_column to one of them.')
  ds = ds.select_columns([column])
  if column != 'text':
    ds = ds.rename_column(column, 'text')
  ds = ds.filter(lambda b: [bool(t and t.strip()) for t in b['text']], batched=True)
  if len(ds) == 0:
    raise ValueError(f'The {split} split is empty (after dropping blank rows); add data.')
  return ds


def load_text_splits(data_cfg: ml_collections.ConfigDict, seed: int) -> datasets.DatasetDict:
  """Loads 'train' and 'validation' splits with one column, `text`.

  Without a validation split, `data_cfg.validation_fraction` of the train
  documents is carved off (seeded, so a resumed run sees the same split).
  """
  splits = _load_raw(data_cfg)
  splits = {k: _clean(v, data_cfg.text_column, k) for k, v in splits.items()}
  if 'validation' not in splits:
    fraction = data_cfg.validation_fraction
    if not 0 < fraction < 1 or len(splits['train']) < 2:
      raise ValueError(f'Cannot carve validation_fraction={fraction} off '
                       f'{len(splits["train"])} train documents; give a fraction in (0, 1), '
                       'more data, or data.validation_files.')
    carved = splits['train'].train_test_split(test_size=fraction, seed=seed)
    splits = {'train': carved['train'], 'validation': carved['test']}
  return datasets.DatasetDict(splits)


def load_text_files(pattern: str, data_cfg: ml_collections.ConfigDict) -> datasets.Dataset:
  """The `text` column of the files matching a path or glob (any type `data.train_files` takes)."""
  ds = _load_files(pattern, 'files', os.path.join(cache_dir(data_cfg), 'datasets'))
  return _clean(ds, data_cfg.text_column, pattern)


def pack(dataset: datasets.Dataset, tokenizer: 'transformers.PreTrainedTokenizerBase',
         max_seq_length: int, num_proc: int = 1) -> dict[str, np.ndarray]:
  """Tokenizes `dataset['text']` and packs `[CLS] chunk [SEP]` segments into rows.

  Documents longer than max_seq_length - 2 tokens are split into chunks;
  chunks are packed greedily in order, a new row starting when the next one
  does not fit. Returns int32 [rows, max_seq_length] arrays `input_ids`,
  `segment_ids` (1, 2, ... per segment, 0 = padding) and `positions`.
  """
  if max_seq_length < 3:
    raise ValueError(f'max_seq_length={max_seq_length} leaves no room for text; use >= 3.')
  if None in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id):
    raise ValueError('pack needs a tokenizer with CLS, SEP and PAD tokens (BERT/RoBERTa-style).')
  if len(dataset) == 0:
    raise ValueError('Packing produced no rows: the dataset is empty; add data.')

  def tokenize(batch):  # verbose=False: long documents are chunked below, not truncated.
    texts = [t or '' for t in batch['text']]
    return {'input_ids': tokenizer(texts, add_special_tokens=False, verbose=False,
                                   return_attention_mask=False,
                                   return_token_type_ids=False)['input_ids']}

  tokenized = dataset.map(tokenize, batched=True, num_proc=num_proc if num_proc > 1 else None,
                          remove_columns=dataset.column_names, desc='Tokenizing')
  column = tokenized.with_format('arrow')[:]['input_ids'].combine_chunks()
  tokens = column.flatten().to_numpy(zero_copy_only=False).astype(np.int32)
  doc_lens = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
  doc_starts = np.cumsum(doc_lens) - doc_lens

  # Chunks of at most max_seq_length - 2 tokens, in document order.
  size = max_seq_length - 2
  n_chunks = -(-doc_lens // size)
  doc = np.repeat(np.arange(len(doc_lens)), n_chunks)
  k = np.arange(len(doc)) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
  chunk_start = doc_starts[doc] + k * size
  seg_len = np.minimum(size, doc_lens[doc] - k * size) + 2  # with [CLS] and [SEP]
  if len(seg_len) == 0:
    raise ValueError('Packing produced no rows: the dataset has no tokens; add data.')

  # Greedy in-order packing: a loop over chunks (not tokens), fast enough.
  row = np.empty(len(seg_len), np.int64)
  offset = np.empty(len(seg_len), np.int64)
  segment = np.empty(len(seg_len), np.int32)
  r, fill, s = 0, 0, 0
  for i, n in enumerate(seg_len.tolist()):
    if fill + n > max_seq_length:
      r, fill, s = r + 1, 0, 0
    row[i], offset[i], segment[i] = r, fill, s + 1
    fill, s = fill + n, s + 1

  # Scatter every segment token to its place in the flat [rows * length] arrays.
  seg = np.repeat(np.arange(len(seg_len)), seg_len)
  pos = np.arange(len(seg)) - np.repeat(np.cumsum(seg_len) - seg_len, seg_len)
  src = np.clip(chunk_start[seg] + pos - 1, 0, len(tokens) - 1)  # in range at CLS/SEP
  ids = np.where(pos == 0, tokenizer.cls_token_id,
                 np.where(pos == seg_len[seg] - 1, tokenizer.sep_token_id, tokens[src]))
  dest = row[seg] * max_seq_length + offset[seg] + pos
  shape = (r + 1, max_seq_length)
  out = {'input_ids': np.full(shape, tokenizer.pad_token_id, np.int32),
         'segment_ids': np.zeros(shape, np.int32), 'positions': np.zeros(shape, np.int32)}
  out['input_ids'].flat[dest] = ids
  out['segment_ids'].flat[dest] = segment[seg]
  out['positions'].flat[dest] = pos
  return out


def _local_slice(global_batch_size: int, process_index: int, process_count: int) -> slice:
  if global_batch_size % process_count:
    raise ValueError(f'batch size {global_batch_size} is not divisible by the '
                     f'{process_count} processes; make it a multiple.')
  local = global_batch_size // process_count
  return slice(process_index * local, (process_index + 1) * local)


def train_batches(packed: dict[str, np.ndarray], global_batch_size: int, seed: int,
                  start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Endless training batches; this process's contiguous slice of each global batch.

  Step s reads epoch s // steps_per_epoch, shuffled by
  `default_rng([seed, epoch])`; remainder rows are dropped each epoch. Starting
  at `start_step` yields exactly what a run from step 0 yields from there.
  """
  local = _local_slice(global_batch_size, process_index, process_count)
  num_rows = len(packed['input_ids'])
  steps_per_epoch = num_rows // global_batch_size
  if steps_per_epoch == 0:
    raise ValueError(f'The training data has {num_rows} rows, fewer than one global batch '
                     f'of {global_batch_size}; lower batch_size or add data.')
  epoch, perm = None, None
  for step in itertools.count(start_step):
    if step // steps_per_epoch != epoch:
      epoch = step // steps_per_epoch
      perm = np.random.default_rng([seed, epoch]).permutation(num_rows)
    start = (step % steps_per_epoch) * global_batch_size
    idx = perm[start:start + global_batch_size][local]
    yield {k: v[idx] for k, v in packed.items()}


def num_eval_batches(packed: dict[str, np.ndarray], global_batch_size: int) -> int:
  """Batches that eval_batches yields: every row once, the last batch padded."""
  return -(-len(packed['input_ids']) // global_batch_size)


def eval_batches(packed: dict[str, np.ndarray], global_batch_size: int, process_index: int = 0,
                 process_count: int = 1,
                 pad_token_id: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """All rows in order, once; the last batch is filled with all-padding rows.

  Padding rows have segment_ids = positions = 0 and input_ids = pad_token_id
  (default: the pad id `pack` wrote, read from the data; else 0).
  """
  local = _local_slice(global_batch_size, process_index, process_count)
  if pad_token_id is None:
    pads = packed['input_ids'][packed['segment_ids'] == 0]
    pad_token_id = int(pads[0]) if len(pads) else 0
  n = num_eval_batches(packed, global_batch_size)
  extra = n * global_batch_size - len(packed['input_ids'])
  for b in range(n):
    batch = {}
    for k, v in packed.items():
      rows = v[b * global_batch_size:(b + 1) * global_batch_size]
      if len(rows) < global_batch_size:
        fill = pad_token_id if k == 'input_ids' else 0
        rows = np.concatenate([rows, np.full((extra,) + v.shape[1:], fill, v.dtype)])
      batch[k] = rows[local]
    yield batch
