"""Streaming training data: an `IterableDataset` shuffled by a seeded buffer, tokenized and packed on the fly.

For corpora bigger than the disk cache (`data.streaming=True`). Each epoch reads
`train.shuffle(seed, buffer_size)` with `set_epoch(epoch)`; with several processes
each reads its own part (`split_dataset_by_node`), so the global batch differs from
a single-process run's (each process packs a disjoint part of the data) but is just
as correct.

The data position is, per process, (epoch, document, offset): where the next row
starts, as the index of a document in the epoch's stream and a token offset in it.
Packing is memoryless at row starts, so resuming re-reads the epoch's stream, skips
`document` documents without tokenizing them and drops `offset` tokens of the next:
no row is repeated or skipped.
"""

import itertools
from typing import TYPE_CHECKING, Iterable, Iterator

import datasets
from datasets.distributed import split_dataset_by_node
import numpy as np

if TYPE_CHECKING:
  import transformers

Position = tuple[int, int, int]  # (epoch, document, offset)


def pack_stream(docs: Iterable[tuple[int, int, list[int]]], cls_id: int, sep_id: int, pad_id: int,
                length: int, packing: str = 'documents'
                ) -> Iterator[tuple[dict[str, np.ndarray], tuple[int, int] | None]]:
  """Packs `(doc index, offset, doc token ids)` into rows like `data.pack_tokens`, one row at a time.

  A document's packing starts at token `offset` (0 but when resuming). Yields
  (row, (doc, offset) where the next row starts), or None for the last row.
  """
  size = length - 2
  ids, seg, pos = [], [], []

  def row():
    n = len(ids)
    out = {'input_ids': np.full(length, pad_id, np.int32), 'segment_ids': np.zeros(length, np.int32),
           'positions': np.zeros(length, np.int32)}
    out['input_ids'][:n], out['segment_ids'][:n], out['positions'][:n] = ids, seg, pos
    ids.clear(), seg.clear(), pos.clear()
    return out

  for d, start, tokens in docs:
    if not tokens:
      continue
    if packing == 'group_texts':  # [CLS] doc [SEP] cut into full rows, across documents
      full = [cls_id] + list(tokens) + [sep_id]
      o = start
      while o < len(full):
        take = min(length - len(ids), len(full) - o)
        ids.extend(full[o:o + take])
        pos.extend(range(len(pos), len(pos) + take))
        seg.extend([1] * take)
        o += take
        if len(ids) == length:
          yield row(), ((d, o) if o < len(full) else (d + 1, 0))
      continue
    for o in range(start, len(tokens), size):
      chunk = [cls_id] + list(tokens[o:o + size]) + [sep_id]
      if ids and (packing == 'line_by_line' or len(ids) + len(chunk) > length):
        yield row(), (d, o)
      s = (seg[-1] if seg else 0) + 1
      ids.extend(chunk), seg.extend([s] * len(chunk)), pos.extend(range(len(chunk)))
      if packing == 'line_by_line':
        break
  if ids and packing != 'group_texts':  # group_texts drops the remainder, as the HF example does
    yield row(), None


def _tokenized(texts: Iterable[str], tokenizer: 'transformers.PreTrainedTokenizerBase', first: int,
               offset: int, batch: int = 256) -> Iterator[tuple[int, int, list[int]]]:
  """(index, offset, ids) per document, tokenized in batches; only the first has a nonzero offset."""
  texts = iter(texts)
  index = first
  while chunk := list(itertools.islice(texts, batch)):
    encoded = tokenizer(chunk, add_special_tokens=False, verbose=False, return_attention_mask=False,
                        return_token_type_ids=False)['input_ids']
    for ids in encoded:
      yield index, (offset if index == first else 0), ids
      index += 1


def train_batches(train: datasets.IterableDataset, tokenizer: 'transformers.PreTrainedTokenizerBase',
                  max_seq_length: int, local_batch_size: int, seed: int, *, packing: str = 'documents',
                  buffer_size: int = 10_000, position: Position = (0, 0, 0), process_index: int = 0,
                  process_count: int = 1) -> Iterator[tuple[dict[str, np.ndarray], Position]]:
  """Endless (local batch, position after it) from `position` on; see the module docstring."""
  epoch, doc, offset = position
  rows = []
  while True:
    ds = train.shuffle(seed=seed, buffer_size=buffer_size)
    ds.set_epoch(epoch)
    if process_count > 1:
      ds = split_dataset_by_node(ds, rank=process_index, world_size=process_count)
    texts = (x['text'] for x in itertools.islice(ds, doc, None))  # skipped documents are not tokenized
    produced = False
    for row, nxt in pack_stream(_tokenized(texts, tokenizer, doc, offset), tokenizer.cls_token_id,
                                tokenizer.sep_token_id, tokenizer.pad_token_id, max_seq_length, packing):
      produced = True
      rows.append(row)
      if len(rows) == local_batch_size:
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        rows = []
        yield batch, ((epoch, *nxt) if nxt else (epoch + 1, 0, 0))
    if not produced and (doc, offset) == (0, 0):
      raise ValueError(f'The training stream of process {process_index} gives no rows; add data.')
    epoch, doc, offset = epoch + 1, 0, 0
