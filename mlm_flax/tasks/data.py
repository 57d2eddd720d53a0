"""Fine-tuning data: a hub dataset or local csv / json / jsonl / parquet files, tokenized with the MODEL's tokenizer.

Each split becomes fixed-shape numpy rows (`input_ids`, `segment_ids` = 1 on real tokens and 0 on padding,
`token_type_ids`, and `labels` when the split has them): one example per row, truncated and padded to
`max_seq_length`. Labels: class indices into `label_names` (taken from a `ClassLabel` feature, else the sorted
unique training values), floats for regression, and for token classification a label on each word's first
sub-token with -100 (ignored) elsewhere. Problems users can hit (a missing column, an empty split, a validation
label unseen in training, a non-numeric regression column) are ValueErrors naming the fix.
"""

import dataclasses
import glob
import logging
import os
from typing import Any, Callable

import datasets
import ml_collections
import numpy as np

from mlm_flax.tasks import TASKS

IGNORE = -100  # the label of sub-tokens that are not scored (not a word's first sub-token, special, padding)
SPLITS = ('train', 'validation', 'test')
_BUILDERS = {'.json': 'json', '.jsonl': 'json', '.csv': 'csv', '.parquet': 'parquet'}
_TOKEN_LABEL_COLUMNS = ('ner_tags', 'tags', 'labels', 'label')
_NOT_TEXT = ('idx', 'id', 'guid')


@dataclasses.dataclass
class TaskData:
  """Tokenized splits ({'train', 'validation'[, 'test']} -> {name: array}) and what their labels mean.
  `scorers`: a split's own metrics from the predictions of all its rows in order (question answering scores
  questions over their windows, `tasks.qa`); splits without one use `metrics.compute`."""
  splits: dict[str, dict[str, np.ndarray]]
  label_names: list[str] | None  # None for regression
  columns: dict[str, str | None]  # the text, text pair and label columns used
  scorers: dict[str, Callable[[np.ndarray], dict]] = dataclasses.field(default_factory=dict)

  @property
  def num_labels(self) -> int:
    return 1 if self.label_names is None else len(self.label_names)


def _cache(data_cfg: ml_collections.ConfigDict) -> str:
  root = data_cfg.cache_dir or os.environ.get('MLM_FLAX_CACHE') or '~/.cache/mlm_flax'
  return os.path.join(os.path.expanduser(root), 'datasets')


def _load_files(pattern: str, key: str, cache: str) -> datasets.Dataset:
  files = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
  if not files:
    raise FileNotFoundError(f'data.{key} = {pattern!r} matches no file; fix the path or glob.')
  if all(os.path.getsize(f) == 0 for f in files):  # the json builder cannot even infer features from them
    raise ValueError(f'The {key.removesuffix("_files")} split is empty: data.{key} = {pattern!r} matches only empty '
                     'files; add examples to them.')
  builders = {_BUILDERS.get(os.path.splitext(f)[1].lower()) for f in files}
  if None in builders or len(builders) > 1:
    raise ValueError(f'data.{key} = {pattern!r} matches {len(files)} files that are not all of one type among '
                     f'{", ".join(sorted(_BUILDERS))}; use one of those types.')
  try:
    return datasets.load_dataset(builders.pop(), data_files={'train': files}, split='train', cache_dir=cache)
  except ValueError as e:  # a header-only csv: datasets' 'Instruction "train" corresponds to no data!'
    if 'corresponds to no data' not in str(e):
      raise
    raise ValueError(f'The {key.removesuffix("_files")} split is empty: data.{key} = {pattern!r} ({", ".join(files)}) '
                     'holds no rows (a header at most); add examples to it.') from None


def load_raw(data_cfg: ml_collections.ConfigDict) -> dict[str, datasets.Dataset]:
  """The 'train', 'validation' and (if asked for) 'test' splits as found: local files, else a hub dataset."""
  cache = _cache(data_cfg)
  if data_cfg.train_files or data_cfg.validation_files or data_cfg.test_files:
    if not (data_cfg.train_files and data_cfg.validation_files):
      raise ValueError('Local data needs both data.train_files and data.validation_files (and optionally '
                       'data.test_files); set the missing one.')
    return {s: _load_files(data_cfg[f'{s}_files'], f'{s}_files', cache) for s in SPLITS if data_cfg[f'{s}_files']}
  if not data_cfg.dataset:
    raise ValueError('No data: set data.dataset (a hub dataset, e.g. glue with data.dataset_config=sst2) or '
                     'data.train_files and data.validation_files.')
  loaded = datasets.load_dataset(data_cfg.dataset, data_cfg.dataset_config, cache_dir=cache)
  names = {'train': data_cfg.train_split, 'validation': data_cfg.validation_split, 'test': data_cfg.test_split}
  splits = {}
  for split, name in names.items():
    if name is None:
      continue
    if name not in loaded:
      raise ValueError(f'Dataset {data_cfg.dataset!r} has no split {name!r} (splits: {", ".join(loaded)}); set '
                       f'data.{split}_split to one of them.')
    splits[split] = loaded[name]
  return splits


def _is_string(feature: Any) -> bool:
  return isinstance(feature, datasets.Value) and feature.dtype in ('string', 'large_string')


def _is_list(feature: Any) -> bool:
  return hasattr(feature, 'feature') and not isinstance(feature, dict)


def _check_column(ds: datasets.Dataset, column: str, key: str, split: str) -> str:
  if column not in ds.column_names:
    raise ValueError(f'The {split} split has no column {column!r} (data.{key}); its columns are '
                     f'{", ".join(ds.column_names)}. Set data.{key} to one of them.')
  return column


def resolve_columns(data_cfg: ml_collections.ConfigDict, task: str, train: datasets.Dataset) -> dict[str, str | None]:
  """{'text', 'text_pair', 'label'}: the configured columns, else the ones the data's features make obvious."""
  cols, feats = train.column_names, train.features
  listing = f'its columns are {", ".join(cols)}'
  label = data_cfg.label_column
  if label is None:
    candidates = _TOKEN_LABEL_COLUMNS if task == 'token_classification' else ('label', 'labels', 'score')
    label = next((c for c in candidates if c in cols), None)
    if label is None:
      raise ValueError(f'Cannot tell the label column of the train split ({listing}); set data.label_column.')
  label = _check_column(train, label, 'label_column', 'train')
  text, pair = data_cfg.text_column, data_cfg.text_pair_column
  if text is None:
    if task == 'token_classification':
      words = [c for c in cols if c != label and _is_list(feats[c]) and _is_string(feats[c].feature)]
      text = 'tokens' if 'tokens' in cols else (words[0] if len(words) == 1 else None)
    elif 'text' in cols:
      text = 'text'
    else:
      strings = [c for c in cols if c != label and c not in _NOT_TEXT and _is_string(feats[c])]
      if len(strings) in (1, 2):
        text, pair = strings[0], (strings[1] if len(strings) == 2 and pair is None else pair)
    if text is None:
      raise ValueError(f'Cannot tell the text column of the train split ({listing}); set data.text_column '
                       '(and data.text_pair_column for text pairs).')
  _check_column(train, text, 'text_column', 'train')
  if pair is not None:
    if task == 'token_classification':
      raise ValueError('data.text_pair_column is for (pair) classification and regression; unset it for '
                       'task.type=token_classification.')
    _check_column(train, pair, 'text_pair_column', 'train')
  return {'text': text, 'text_pair': pair, 'label': label}


def _plain(v: Any) -> Any:
  """A label value as a hashable plain value: integral floats (csv columns with gaps) as ints."""
  if isinstance(v, (float, np.floating)) and float(v).is_integer():
    return int(v)
  return v.item() if isinstance(v, np.generic) else v


def _sorted_names(values: set) -> list[str]:
  """Label names of non-ClassLabel data: the sorted unique values (numerically when all are numbers)."""
  if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
    return [str(v) for v in sorted(values)]
  return sorted(str(v) for v in values)


def _label_feature(ds: datasets.Dataset, column: str) -> Any:
  feature = ds.features[column]
  return feature.feature if _is_list(feature) else feature


def parse_label_names(spec: str | None) -> list[str] | None:
  """`data.label_names` ('O,B-LOC,I-LOC': the names in id order) as a list; None when unset."""
  if spec is None:
    return None
  names = [n.strip() for n in spec.split(',')]
  if len(names) < 2 or not all(names) or len(set(names)) < len(names):
    raise ValueError(f'data.label_names={spec!r} must list at least two distinct, non-empty names in label id '
                     "order, comma-separated (e.g. 'O,B-LOC,I-LOC').")
  return names


def check_tag_names(names: list[str]) -> None:
  """Refuses token-classification names seqeval cannot read as entity tags: each must be `O` or `X-TYPE` with
  X one of B, I, E, S, L, U (IOB, IOBES, BILOU); integer tags (CoNLL files: '0', '1', ...) would score F1 = 0."""
  bad = [n for n in names if n != 'O' and not (len(n) > 2 and n[0] in 'BIESLU' and n[1] in '-_')]
  if bad:
    raise ValueError(f'token_classification label names {", ".join(repr(n) for n in bad[:3])} are not IOB/IOBES '
                     'tags, so entity F1 cannot be scored; set data.label_names to the tag names in id order '
                     "(e.g. --config.data.label_names='O,B-PER,I-PER,B-LOC,I-LOC') or label the words with "
                     'tags like B-LOC, I-LOC, O.')


def label_names(task: str, train: datasets.Dataset, column: str, given: list[str] | None = None
                ) -> list[str] | None:
  """Class names: `given` (data.label_names), a ClassLabel's names, else the sorted unique training labels;
  None for regression. Token-classification names must be entity tags (`check_tag_names`)."""
  if task == 'regression':
    return None
  names = given or _found_label_names(task, train, column)
  if task == 'token_classification':
    check_tag_names(names)
  return names


def _found_label_names(task: str, train: datasets.Dataset, column: str) -> list[str]:
  feature = _label_feature(train, column)
  if isinstance(feature, datasets.ClassLabel):
    return list(feature.names)
  values = train[column]
  flat = [v for row in values for v in row] if task == 'token_classification' else values
  if any(v is None for v in flat):
    raise ValueError(f'The train split has rows without a label in column {column!r}; drop or label them.')
  names = _sorted_names({_plain(v) for v in flat})
  if len(names) < 2 and task == 'classification':
    raise ValueError(f'The train split has a single label ({names[0]!r}) in column {column!r}: nothing to '
                     'classify; check data.label_column.')
  return names


def _label_ids(task: str, ds: datasets.Dataset, column: str, names: list[str] | None, split: str,
               by_index: bool = False) -> list:
  """Each row's label as a class index (or float for regression), refusing labels unseen in training.
  `by_index` (names from data.label_names): integer values are ids into `names`, other values names."""
  feature = _label_feature(ds, column)
  values = ds[column]
  if task == 'regression':
    if not (isinstance(feature, datasets.Value) and feature.dtype.startswith(('int', 'uint', 'float', 'double'))):
      kind = 'string' if _is_string(feature) else getattr(feature, 'dtype', type(feature).__name__)
      raise ValueError(f'task.type=regression needs a numeric label column, but column {column!r} of the {split} '
                       f'split holds {kind} values (e.g. {values[0]!r}); point data.label_column at the scores, or '
                       'use task.type=classification.')
    if any(v is None for v in values):
      raise ValueError(f'The {split} split has rows without a score in column {column!r}; drop or fill them.')
    return [float(v) for v in values]
  if isinstance(feature, datasets.ClassLabel):
    index = {i: i for i in range(len(names))}  # ClassLabel values are indices already (-1: no label)
    key = lambda v: v
  else:
    index = {n: i for i, n in enumerate(names)}
    key = lambda v: str(_plain(v))
    if by_index:  # data.label_names: integer values are ids into it, strings its names
      index.update({i: i for i in range(len(names))})
      key = lambda v: _plain(v) if isinstance(_plain(v), int) else str(v)

  def lookup(v, row):
    if v is None:
      raise ValueError(f'The {split} split has no label in row {row} (column {column!r}); label or drop it.')
    i = index.get(key(v))
    if i is None:
      raise ValueError(f'The {split} split has label {v!r} (row {row}, column {column!r}) that the train split '
                       f'never has (train labels: {", ".join(names)}); fix the label or add train examples of it.')
    return i

  if task == 'token_classification':
    return [[lookup(v, r) for v in row] for r, row in enumerate(values)]
  return [lookup(v, r) for r, v in enumerate(values)]


def _unlabeled(ds: datasets.Dataset, column: str) -> bool:
  """A split without labels (GLUE's test splits: every label -1, or no label column): not scored."""
  if column not in ds.column_names:
    return True
  if isinstance(ds.features[column], datasets.ClassLabel):
    return bool(len(ds)) and all(v == -1 for v in ds[column])
  return bool(len(ds)) and all(v is None for v in ds[column])  # an empty csv column


def _check_texts(ds: datasets.Dataset, columns: dict, split: str) -> None:
  """Refuses rows without text (a None would train as an empty input), naming the count and the first row."""
  for key in ('text', 'text_pair'):
    if columns[key]:
      missing = [i for i, v in enumerate(ds[columns[key]]) if v is None]
      if missing:
        raise ValueError(f'The {split} split has {len(missing)} rows without text in column {columns[key]!r} '
                         f'(first: row {missing[0]}); fill or drop them.')


def _tokenize_fn(tokenizer: Any, task: str, columns: dict, max_seq_length: int):
  text, pair = columns['text'], columns['text_pair']

  def fn(batch: dict) -> dict:
    as_text = lambda xs: ['' if x is None else str(x) for x in xs]
    if task == 'token_classification':
      words = [[str(w) for w in ws] for ws in batch[text]]
      enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_seq_length,
                      padding='max_length')
    else:
      enc = tokenizer(as_text(batch[text]), as_text(batch[pair]) if pair else None, truncation=True,
                      max_length=max_seq_length, padding='max_length')
    out = {'input_ids': enc['input_ids'], 'segment_ids': enc['attention_mask'],
           'token_type_ids': enc.get('token_type_ids') or [[0] * len(r) for r in enc['input_ids']]}
    if '_labels' in batch:
      if task == 'token_classification':
        out['labels'] = [_first_sub_token_labels(enc.word_ids(i), row) for i, row in enumerate(batch['_labels'])]
        out['_cut_words'] = [len(row) - 1 - max((w for w in enc.word_ids(i) if w is not None), default=-1)
                             for i, row in enumerate(batch['_labels'])]  # words past max_seq_length
      else:
        out['labels'] = batch['_labels']
    return out

  return fn


def _first_sub_token_labels(word_ids: list[int | None], word_labels: list[int]) -> list[int]:
  """A word's label on its first sub-token, IGNORE on its other sub-tokens, special tokens and padding."""
  out, previous = [], None
  for w in word_ids:
    out.append(word_labels[w] if w is not None and w != previous else IGNORE)
    previous = w
  return out


def tokenize(ds: datasets.Dataset, tokenizer: Any, task: str, columns: dict, labels: list | None,
             max_seq_length: int, num_proc: int = 1, split: str = 'this') -> dict[str, np.ndarray]:
  """Rows of one split as numpy arrays (see the module docstring); `labels` from `_label_ids` or None. Logs a
  warning with the number of labelled words cut by `max_seq_length` (not scored, absent from the gold)."""
  keep = [c for c in (columns['text'], columns['text_pair']) if c]
  ds = ds.select_columns(keep)
  if labels is not None:
    ds = ds.add_column('_labels', labels)
  if task == 'token_classification' and not getattr(tokenizer, 'is_fast', False):
    raise ValueError('task.type=token_classification needs a fast (Rust) tokenizer for word ids; the init '
                     "model's tokenizer is not one: save it with a tokenizer.json.")
  ds = ds.map(_tokenize_fn(tokenizer, task, columns, max_seq_length), batched=True, remove_columns=ds.column_names,
              num_proc=num_proc if num_proc > 1 and len(ds) > 1000 else None)
  if '_cut_words' in ds.column_names:
    cut = np.asarray(ds['_cut_words'])
    if cut.sum():
      logging.warning('%d words of %d rows of the %s split lie past max_seq_length=%d: their labels are not '
                      'trained on nor scored (absent from the gold); raise --config.max_seq_length to keep them.',
                      cut.sum(), np.count_nonzero(cut), split, max_seq_length)
    ds = ds.remove_columns('_cut_words')
  dtypes = {'labels': np.float32 if task == 'regression' else np.int32}
  return {k: np.asarray(ds[k], dtypes.get(k, np.int32)) for k in ds.column_names}


def load_task_data(data_cfg: ml_collections.ConfigDict, task: str, tokenizer: Any, max_seq_length: int,
                   names: list[str] | None = None) -> TaskData:
  """Loads, checks and tokenizes the splits. `names`: label names saved by an earlier run (resume), which
  then fix the label indices."""
  if task not in TASKS or task == 'question_answering':
    raise ValueError(f'task.type={task!r} is not one of {", ".join(TASKS[:3])} (question answering: '
                     '`tasks.qa.load_qa_data`).')
  raw = load_raw(data_cfg)
  for split, ds in raw.items():
    if len(ds) == 0:
      raise ValueError(f'The {split} split is empty; add examples to it (or point data.{split}_files / '
                       f'data.{split}_split elsewhere).')
  columns = resolve_columns(data_cfg, task, raw['train'])
  for split, ds in raw.items():
    for key in ('text', 'text_pair'):
      if columns[key]:
        _check_column(ds, columns[key], f'{key}_column', split)
    if split != 'test':
      _check_column(ds, columns['label'], 'label_column', split)
    _check_texts(ds, columns, split)
  given = parse_label_names(data_cfg.get('label_names'))
  names = label_names(task, raw['train'], columns['label'], given) if names is None else names
  splits = {}
  for split, ds in raw.items():
    scored = not (split == 'test' and _unlabeled(ds, columns['label']))
    if not scored:
      logging.warning('The test split has no labels (column %r missing or empty): it is not scored, results.json '
                      'gets no test_* metrics; label it to score it.', columns['label'])
    labels = _label_ids(task, ds, columns['label'], names, split, given is not None) if scored else None
    splits[split] = tokenize(ds, tokenizer, task, columns, labels, max_seq_length, data_cfg.num_proc, split)
  return TaskData(splits=splits, label_names=names, columns=columns)
