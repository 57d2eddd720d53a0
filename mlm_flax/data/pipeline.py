"""Batches: training batches (a pure function of (seed, step), which makes resuming exact), evaluation
batches (every row once, the last batch padded), and `train_iterator`, which prepares the global batches on a
background thread. With several processes, each takes its contiguous slice of the global batch, which is the
single-process one.
"""

import itertools
from typing import TYPE_CHECKING, Any, Callable, Iterator

import datasets
import jax
import ml_collections
import numpy as np

from mlm_flax.data import prefetch, streaming

if TYPE_CHECKING:
  import transformers


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


def shape_phases(config: ml_collections.ConfigDict) -> list[tuple[int, int, int]]:
  """[(first step, batch_size, seq_length)] of the run's batch shapes (0-based steps): the phases of
  `seq_len_warmup` and `batch_size_warmup` combined, the last one the full `batch_size` x `max_seq_length`."""
  from mlm_flax import validation  # pylint: disable=g-import-not-at-top
  def at(key, full):
    ends, value = [], []
    for v, n in validation.parse_phases(config.get(key, ''), key):
      ends.append((ends[-1] if ends else 0) + n)
      value.append(v)
    return lambda step: next((v for e, v in zip(ends, value) if step < e), full), ends
  batch_at, batch_ends = at('batch_size_warmup', config.batch_size)
  length_at, length_ends = at('seq_len_warmup', config.max_seq_length)
  phases = []
  for first in sorted({0, *batch_ends, *length_ends}):
    shape = (batch_at(first), length_at(first))
    if not phases or phases[-1][1:] != shape:
      phases.append((first, *shape))
  return phases


def step_shape(phases: list[tuple[int, int, int]], step: int) -> tuple[int, int]:
  """(batch_size, seq_length) of 0-based step `step`."""
  return next((b, n) for first, b, n in reversed(phases) if step >= first)


def phased_train_batches(rows_at: dict[int, dict[str, np.ndarray]], phases: list[tuple[int, int, int]], seed: int,
                         start_step: int = 0, process_index: int = 0,
                         process_count: int = 1) -> Iterator[tuple[dict[str, np.ndarray], dict]]:
  """Endless (batch, data position) with the batch shapes of `phases` (warm-ups), from `start_step` on.

  Rows of each length (`rows_at[length]`) form one stream: epoch e is `default_rng([seed, length, e])`'s
  permutation of them, read in order across batch sizes and epochs (nothing dropped). The position after
  a step (length, batch size, rows of that length consumed) is a pure function of the step, so a resumed
  run yields what an uninterrupted one does, across phase boundaries too.
  """
  consumed = {n: 0 for n in rows_at}  # rows of each length read before `step`
  perms = {}
  def perm(n, epoch):
    if (n, epoch) not in perms:
      if len(perms) > 8:  # a few epochs of a few lengths are live at a time
        perms.clear()
      perms[(n, epoch)] = np.random.default_rng([seed, n, epoch]).permutation(len(rows_at[n]['input_ids']))
    return perms[(n, epoch)]
  for n, rows in rows_at.items():
    largest = max(b for _, b, m in phases if m == n)
    if len(rows['input_ids']) < largest:
      raise ValueError(f'The training data has {len(rows["input_ids"])} rows of {n} tokens, fewer than one batch '
                       f'of {largest}; lower the batch size or add data.')
  for step in itertools.count(0):
    batch_size, n = step_shape(phases, step)
    if step >= start_step:
      local = _local_slice(batch_size, process_index, process_count)
      offsets = np.arange(consumed[n], consumed[n] + batch_size)[local]
      rows, total = rows_at[n], len(rows_at[n]['input_ids'])
      idx = np.concatenate([perm(n, e)[offsets[offsets // total == e] % total] for e in np.unique(offsets // total)])
      position = {'seq_length': n, 'batch_size': batch_size, 'rows': consumed[n] + batch_size}
      yield {k: v[idx] for k, v in rows.items()}, position
    consumed[n] += batch_size


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
                   mesh: jax.sharding.Mesh, start_step: int = 0, data_position: Any = None,
                   pack_at: Callable[[int], dict[str, np.ndarray]] | None = None) -> 'prefetch.Prefetcher':
  """(global batch on `mesh`, data position) for steps start_step + 1, ..., prepared ahead.

  `train` is packed rows (a pure function of (seed, step): the position is the
  number of rows consumed) or an `IterableDataset` (see `streaming.py`; the position
  to resume from is the checkpoint's `data_position`). Batches are read, packed and
  placed on the devices on a background thread, `config.data.prefetch` ahead. With warm-ups
  (`seq_len_warmup`, `batch_size_warmup`), `pack_at(length)` gives the packed rows of each shorter length
  (`phased_train_batches`; the position records the phase's shape and the rows of its length consumed).
  """
  from mlm_flax import parallel  # pylint: disable=g-import-not-at-top
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
  elif len(phases := shape_phases(config)) > 1:
    if pack_at is None:
      raise ValueError('seq_len_warmup / batch_size_warmup need pack_at (the packed rows of each length)')
    rows_at = {n: train if n == config.max_seq_length else pack_at(n) for n in sorted({n for _, _, n in phases})}
    local = phased_train_batches(rows_at, phases, config.seed, start_step, index, count)
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
