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
from mlm_flax.objectives import make_objective
from mlm_flax.objectives.mlm import mask_rows  # pylint: disable=unused-import  # evaluate.mask_rows, as before

EVAL_STREAM = 0x5EED


def eval_step(params: Any, batch: dict[str, jax.Array], rng: jax.Array, *, objective) -> dict[str, jax.Array]:
  """Summed metrics of one batch; `batch['row_ids']` (the rows' indices in the split) pick the masks."""
  aux, totals = objective.prepare_eval(rng, batch)
  return objective.loss(params, batch, aux, totals, rng=None)[1]


class Evaluator:
  """Holds the jitted eval step of one objective (its eval masks); call it with params and packed rows."""

  def __init__(self, objective, mesh: Mesh, seed: int):
    self.mesh, self.objective = mesh, objective
    self.rng = jax.random.fold_in(jax.random.PRNGKey(seed), EVAL_STREAM)
    self.step = jax.jit(functools.partial(eval_step, objective=objective),
                        in_shardings=(None, parallel.data_sharding(mesh), None),  # params as they come (or FSDP)
                        out_shardings=parallel.replicated(mesh))

  def __call__(self, params: Any, rows: dict[str, np.ndarray], batch_size: int, max_batches: int = 0) -> dict:
    """The objective's eval metrics (masked-token loss, accuracy, perplexity, counts for MLM) over `rows` (all of
    them unless `max_batches`)."""
    pending, queued = [], parallel.steps_queued()
    rows = {**rows, 'row_ids': np.arange(len(rows['input_ids']), dtype=np.int32)}  # padding rows get 0: unmasked
    batches = data.eval_batches(rows, batch_size, jax.process_index(), jax.process_count())
    for i, batch in enumerate(batches):
      if max_batches and i >= max_batches:
        break
      pending.append(self.step(params, parallel.to_global(batch, self.mesh), self.rng))
      if len(pending) > queued:  # on CPU one batch at a time: queued batches' buffers page-fault beside it
        jax.block_until_ready(pending[-1 - queued])
    sums = jax.tree.map(lambda *x: np.sum(np.asarray(x, np.float64), axis=0), *parallel.fetch(pending))
    return self.objective.summarize(sums)


def evaluate_workdir(workdir: str, split: str = 'validation', files: str | None = None) -> dict:
  """Evaluates the latest checkpoint of a workdir on `split` of its configured dataset.

  `files` (a path or glob of text / JSON-lines / CSV / Parquet files, as `data.train_files` takes) replaces
  the split: e.g. a model trained on one corpus, evaluated on another's validation text.
  """
  from mlm_flax import inference  # pylint: disable=g-import-not-at-top
  config, params, tok, step = inference.load_run(workdir)
  if files:
    texts = data.load_text_files(files, config.data)
  else:
    splits = data.load_text_splits(config.data, config.seed)
    if split not in splits:
      raise ValueError(f'unknown split {split!r}; available: {sorted(splits)}')
    texts = splits[split]
  rows = data.packed_rows(texts, tok, config.max_seq_length, config.data.get('packing', 'documents'),
                          config.data.num_proc, data.cache_dir(config.data))
  mesh = parallel.make_mesh()
  evaluator = Evaluator(make_objective(config, tok, 'eval'), mesh, config.seed)
  params = jax.device_put(params, parallel.replicated(mesh))
  return {'step': step, **evaluator(params, rows, config.eval_batch_size)}
