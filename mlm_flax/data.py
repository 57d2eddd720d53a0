"""Text loading, tokenization + packing (cached, split over processes), and batch iterators.

Sources: built-in corpora, Hugging Face hub datasets (name, config, split names),
local `text`, `json`/`jsonl`, `csv`, `parquet` files or globs; `data.streaming`
reads them as an `IterableDataset` (see `streaming.py`).

Packing (`data.packing`):
  'documents' (default): rows hold several `[CLS] chunk [SEP]` segments;
    `segment_ids` (1, 2, ...; 0 = padding) keep attention within a segment,
    `positions` restart at 0 per segment.
  'group_texts': BERT/HF-style: `[CLS] doc [SEP]` sequences concatenated and cut
    into full rows (one segment: attention crosses documents; the remainder is dropped).
  'line_by_line': one document per row, truncated, padded.

The training batch for step s is a pure function of (seed, s), which makes
resuming exact. With several processes, each one tokenizes a contiguous 1/P of
the documents; the token ids are all-gathered, so every process packs the same
rows and the global batch is the single-process one.
"""

import glob
import hashlib
import itertools
import json
import os
import tempfile
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import datasets
import jax
import ml_collections
import numpy as np
import pyarrow.compute as pc

from mlm_flax import corpora

if TYPE_CHECKING:
  import transformers

_BUILDERS = {'.txt': 'text', '.text': 'text', '.json': 'json', '.jsonl': 'json',
             '.csv': 'csv', '.parquet': 'parquet'}
PACKING_MODES = ('documents', 'group_texts', 'line_by_line')
_PACK_VERSION = 'v1'  # bump when packing changes: old cache entries are then ignored
_TOKENIZER_STREAM_DOCS = 100_000  # streaming: the tokenizer is trained on the first documents

tokenize_calls = 0  # uncached tokenizations in this process (a cache hit leaves it unchanged)


def cache_dir(data_cfg: ml_collections.ConfigDict) -> str:
  """data_cfg.cache_dir, else $MLM_FLAX_CACHE, else ~/.cache/mlm_flax."""
  return os.path.expanduser(data_cfg.cache_dir or os.environ.get('MLM_FLAX_CACHE')
                            or '~/.cache/mlm_flax')


def _load_files(pattern: str, what: str, cache: str, streaming: bool) -> datasets.Dataset:
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
                               cache_dir=cache, streaming=streaming)


def _load_raw(data_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """Splits as found (`train`, maybe `validation`): local files take precedence over data_cfg.dataset."""
  cache = os.path.join(cache_dir(data_cfg), 'datasets')
  streaming = bool(data_cfg.streaming)
  if data_cfg.validation_files and not data_cfg.train_files:
    raise ValueError('data.validation_files is set but data.train_files is not; set both.')
  if data_cfg.train_files:
    splits = {'train': _load_files(data_cfg.train_files, 'train_files', cache, streaming)}
    if data_cfg.validation_files:
      splits['validation'] = _load_files(data_cfg.validation_files, 'validation_files', cache, streaming)
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
    return dict(datasets.load_dataset('json', data_files=files, cache_dir=cache, streaming=streaming))
  loaded = datasets.load_dataset(name, data_cfg.dataset_config, cache_dir=cache, streaming=streaming)
  train_split, val_split = data_cfg.train_split, data_cfg.validation_split
  if train_split not in loaded:
    raise ValueError(f'Dataset {name!r} has no split {train_split!r} (splits: {list(loaded)}); '
                     'set data.train_split.')
  splits = {'train': loaded[train_split]}
  if val_split and val_split in loaded:
    splits['validation'] = loaded[val_split]
  return splits


def _columns(ds) -> list[str]:
  if ds.column_names is not None:
    return list(ds.column_names)
  first = next(iter(ds), None)  # a stream of unknown features: look at its first example
  return list(first) if first else []


def _clean(ds, column: str, split: str):
  """Keeps only `column` (renamed `text`), drops blank rows, refuses an empty split."""
  columns = _columns(ds)
  if column not in columns:
    raise ValueError(f'The {split} split has no text column {column!r}; its columns are '
                     f'{columns}. Set data.text_column to one of them.')
  ds = ds.select_columns([column])
  if column != 'text':
    ds = ds.rename_column(column, 'text')
  ds = ds.filter(lambda b: [bool(t and t.strip()) for t in b['text']], batched=True)
  empty = (next(iter(ds), None) is None) if isinstance(ds, datasets.IterableDataset) else len(ds) == 0
  if empty:
    raise ValueError(f'The {split} split is empty (after dropping blank rows); add data.')
  return ds


def load_text_splits(data_cfg: ml_collections.ConfigDict, seed: int) -> dict[str, Any]:
  """Loads 'train' and 'validation' splits with one column, `text`.

  Without a validation split, `data_cfg.validation_fraction` of the train
  documents is carved off (seeded, so a resumed run sees the same split). With
  `data_cfg.streaming`, 'train' is an `IterableDataset` and 'validation' the first
  `data_cfg.streaming_validation_docs` documents of the validation split, or of
  the train stream, which then skips them.
  """
  splits = _load_raw(data_cfg)
  splits = {k: _clean(v, data_cfg.text_column, k) for k, v in splits.items()}
  if data_cfg.streaming:
    n = data_cfg.streaming_validation_docs
    if n < 1:
      raise ValueError(f'data.streaming_validation_docs={n}; streaming needs >= 1 validation document.')
    source = splits.get('validation', splits['train'])
    texts = [x['text'] for x in itertools.islice(source, n)]
    if 'validation' not in splits:
      splits['train'] = splits['train'].skip(n)
      if next(iter(splits['train']), None) is None:
        raise ValueError(f'The train stream has no documents left after the first {n} for validation; '
                         'lower data.streaming_validation_docs or add data.')
    splits['validation'] = datasets.Dataset.from_dict({'text': texts})
    return splits
  if 'validation' not in splits:
    fraction = data_cfg.validation_fraction
    if not 0 < fraction < 1 or len(splits['train']) < 2:
      raise ValueError(f'Cannot carve validation_fraction={fraction} off '
                       f'{len(splits["train"])} train documents; give a fraction in (0, 1), '
                       'more data, or data.validation_files.')
    carved = splits['train'].train_test_split(test_size=fraction, seed=seed)
    splits = {'train': carved['train'], 'validation': carved['test']}
  return splits


def tokenizer_texts(train) -> Iterable[str]:
  """Texts to train a tokenizer on: the whole split, or the first documents of a stream."""
  if isinstance(train, datasets.IterableDataset):
    return (x['text'] for x in itertools.islice(train, _TOKENIZER_STREAM_DOCS))
  return train['text']


def load_text_files(pattern: str, data_cfg: ml_collections.ConfigDict) -> datasets.Dataset:
  """The `text` column of the files matching a path or glob (any type `data.train_files` takes)."""
  ds = _load_files(pattern, 'files', os.path.join(cache_dir(data_cfg), 'datasets'), streaming=False)
  return _clean(ds, data_cfg.text_column, pattern)


def fingerprint(train, data_cfg: ml_collections.ConfigDict) -> str:
  """Identifies the training text: the datasets fingerprint, or the source settings of a stream."""
  if isinstance(train, datasets.Dataset):
    return train._fingerprint  # pylint: disable=protected-access
  keys = ('dataset', 'dataset_config', 'train_split', 'train_files', 'text_column',
          'streaming_validation_docs')
  source = {k: data_cfg.get(k) for k in keys}
  if data_cfg.train_files:
    source['files'] = [(f, os.path.getsize(f), os.path.getmtime(f))
                       for f in sorted(glob.glob(os.path.expanduser(data_cfg.train_files), recursive=True))]
  return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:16]


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
  if packing == 'group_texts':  # [CLS] doc [SEP] ... concatenated, cut into full rows
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

  # Chunks of at most max_seq_length - 2 tokens, in document order (line_by_line: the first only).
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


def train_iterator(config: ml_collections.ConfigDict, train, tokenizer: 'transformers.PreTrainedTokenizerBase',
                   mesh: jax.sharding.Mesh, start_step: int = 0, data_position: Any = None
                   ) -> 'prefetch.Prefetcher':
  """(global batch on `mesh`, data position) for steps start_step + 1, ..., prepared ahead.

  `train` is packed rows (a pure function of (seed, step): the position is the
  number of rows consumed) or an `IterableDataset` (see `streaming.py`; the position
  to resume from is the checkpoint's `data_position`). Batches are read, packed and
  placed on the devices on a background thread, `config.data.prefetch` ahead.
  """
  from mlm_flax import parallel, prefetch, streaming  # pylint: disable=g-import-not-at-top
  count, index = jax.process_count(), jax.process_index()
  if isinstance(train, datasets.IterableDataset):
    position = (0, 0, 0)
    if start_step:
      saved = (data_position or {}).get('streaming') if isinstance(data_position, dict) else None
      if saved is None or len(saved) != count:
        raise ValueError(f'Cannot resume streaming data at step {start_step}: the checkpoint has data '
                         f'position {data_position!r}, not one per each of the {count} processes; resume '
                         'with the same data.streaming and number of processes, or use a new --workdir.')
      position = tuple(saved[index])
    rows = _local_slice(config.batch_size, index, count)
    local = streaming.train_batches(
        train, tokenizer, config.max_seq_length, rows.stop - rows.start, config.seed, packing=config.data.packing,
        buffer_size=config.data.shuffle_buffer_size, position=position, process_index=index,
        process_count=count)
  else:
    batches = train_batches(train, config.batch_size, config.seed, start_step, index, count)
    local = ((b, (start_step + i + 1) * config.batch_size) for i, b in enumerate(batches))
  return prefetch.Prefetcher(local, lambda item: (parallel.to_global(item[0], mesh), item[1]),
                             config.data.prefetch)


def checkpoint_position(position: Any) -> Any:
  """The JSON data position to checkpoint (all processes call it): streaming gathers every process's."""
  if not isinstance(position, tuple):
    return position
  from mlm_flax import parallel  # pylint: disable=g-import-not-at-top
  gathered = parallel.allgather_concat(np.asarray([position], np.int64))
  return {'streaming': gathered.tolist()}
