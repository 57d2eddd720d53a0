"""Evaluation over a whole split: fixed masks, no dropout, nothing dropped.

Row `r` of the split is masked with its own key `fold_in(PRNGKey(seed), EVAL_STREAM, r)`, so
the masks, and the sums, depend only on the seed and the split: not on `eval_batch_size`,
the device or process count. The last batch is padded with empty rows, which have no
maskable tokens and so add nothing to the sums.
"""

import functools
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from mlm_flax import data, parallel
from mlm_flax.objectives import masking
from mlm_flax.objectives import mlm as loss

EVAL_STREAM = 0x5EED


def mask_rows(mask_fn: loss.MaskFn, rng: jax.Array, row_ids: jax.Array, ids: jax.Array,
              maskable: jax.Array) -> masking.Masked:
  """`mask_fn` applied to each row [length] of `ids` with its own key `fold_in(rng, row_id)`."""
  def one(row_id, row, can):
    masked = mask_fn(jax.random.fold_in(rng, row_id), row[None], maskable=can[None])
    return jax.tree.map(lambda x: x[0], masked)
  return jax.vmap(one)(row_ids, ids, maskable)


def eval_step(params: Any, batch: dict[str, jax.Array], rng: jax.Array, *, model, mask_fn: loss.MaskFn,
              num_predictions: int, baseline_token: int | None = None) -> dict[str, jax.Array]:
  """Summed metrics of one batch; `batch['row_ids']` (the rows' indices in the split) pick the masks."""
  masked = mask_rows(mask_fn, rng, batch['row_ids'], batch['input_ids'], batch['segment_ids'] > 0)
  _, sums = loss.mlm_loss(params, model, batch, masked, num_predictions, baseline_token=baseline_token)
  return sums


class Evaluator:
  """Holds the jitted eval step for one model; call it with params and packed rows."""

  def __init__(self, model, mask_fn: loss.MaskFn, num_predictions: int, mesh: Mesh, seed: int,
               baseline_token: int | None = None):
    self.mesh = mesh
    self.rng = jax.random.fold_in(jax.random.PRNGKey(seed), EVAL_STREAM)
    self.step = jax.jit(
        functools.partial(eval_step, model=model, mask_fn=mask_fn, num_predictions=num_predictions,
                          baseline_token=baseline_token),
        in_shardings=(None, parallel.data_sharding(mesh), None),  # params as they come (replicated or FSDP)
        out_shardings=parallel.replicated(mesh))

  def __call__(self, params: Any, rows: dict[str, np.ndarray], batch_size: int, max_batches: int = 0) -> dict:
    """Masked-token loss, accuracy, perplexity and counts over `rows` (all of them unless `max_batches`)."""
    pending = []
    rows = {**rows, 'row_ids': np.arange(len(rows['input_ids']), dtype=np.int32)}  # padding rows get 0: unmasked
    batches = data.eval_batches(rows, batch_size, jax.process_index(), jax.process_count())
    for i, batch in enumerate(batches):
      if max_batches and i >= max_batches:
        break
      pending.append(self.step(params, parallel.to_global(batch, self.mesh), self.rng))
    return loss.summarize(jax.tree.map(lambda *x: np.sum(np.asarray(x, np.float64)), *parallel.fetch(pending)))


def evaluate_workdir(workdir: str, split: str = 'validation', files: str | None = None) -> dict:
  """Evaluates the latest checkpoint of a workdir on `split` of its configured dataset.

  `files` (a path or glob of text / JSON-lines / CSV / Parquet files, as `data.train_files` takes) replaces
  the split: e.g. a model trained on one corpus, evaluated on another's validation text.
  """
  from mlm_flax import inference  # pylint: disable=g-import-not-at-top
  mlm = inference.load(workdir)
  config = mlm.config
  if files:
    texts = data.load_text_files(files, config.data)
  else:
    splits = data.load_text_splits(config.data, config.seed)
    if split not in splits:
      raise ValueError(f'unknown split {split!r}; available: {sorted(splits)}')
    texts = splits[split]
  rows = data.packed_rows(texts, mlm.tokenizer, config.max_seq_length, config.data.get('packing', 'documents'),
                          config.data.num_proc, data.cache_dir(config.data))
  mesh = parallel.make_mesh()
  evaluator = Evaluator(mlm.model, *loss.make_mask_fn(config, mlm.tokenizer, 'eval'), mesh, config.seed)
  params = jax.device_put(mlm.params, parallel.replicated(mesh))
  return {'step': mlm.step, **evaluator(params, rows, config.eval_batch_size)}
