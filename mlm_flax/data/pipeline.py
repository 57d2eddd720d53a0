"""Batches: training batches (a pure function of (seed, step), which makes resuming exact), evaluation
batches (every row once, the last batch padded), and `train_iterator`, which prepares the global batches on a
background thread. With several processes, each takes its contiguous slice of the global batch, which is the
single-process one.
"""

import itertools
from typing import TYPE_CHECKING, Any, Iterator

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
