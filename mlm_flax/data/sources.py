"""Text sources: built-in corpora, Hugging Face hub datasets (name, config, split names), local `text`,
`json`/`jsonl`, `csv`, `parquet` files or globs, each as 'train' and 'validation' splits of one `text` column;
`data.streaming` reads them as an `IterableDataset` (see `streaming.py`). Fingerprints identify the text for the
caches.
"""

import glob
import hashlib
import itertools
import json
import os
from typing import Any, Iterable

import datasets
import ml_collections

from mlm_flax.data import corpora

_BUILDERS = {'.txt': 'text', '.text': 'text', '.json': 'json', '.jsonl': 'json',
             '.csv': 'csv', '.parquet': 'parquet'}
_TOKENIZER_STREAM_DOCS = 100_000  # streaming: the tokenizer is trained on the first documents


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
