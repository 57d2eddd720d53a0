"""Training objectives: what is hidden from the model and how its predictions are scored.

The registry maps `objective.type` to the module of this folder that implements it; a module exposes
`make(config, tok, split)`, which returns an object the one training step (`train.train_step`), the evaluator
(`evaluate.Evaluator`) and the loop take:

  init_params(rng, seq_len) -> params            the run's params pytree (the model state everywhere)
  prepare(rng, batch, step) -> (aux, totals)     on the whole global batch, in-graph: masks (and whatever the
                                                 loss needs), and `totals` the loss is normalised by (global
                                                 counts), so micro-batches sum to the full batch's loss
  prepare_eval(rng, batch) -> (aux, totals)      the same for evaluation: fixed per row of the split
                                                 (`batch['row_ids']`), whatever batch it is in
  loss(params, batch, aux, totals, rng) -> (loss, sums)   one (micro-)batch; dropout iff `rng` is not None;
                                                 `sums` are summed metrics that add up over steps and hosts
  summarize(sums) -> dict                        summed metrics -> the row's metrics (loss, accuracy, ...)
  mlm_model(params) -> (model, params)           an MLM model and its params (fill-mask), or None

Adding an objective: one module here with `make`, and one entry in `OBJECTIVES`. `masking.py` holds BERT
masking (token, whole-word, span) as a pure function of a key and the ids; `mlm.py` the masked-LM objective;
`electra.py` replaced-token detection; `tasks.py` the fine-tuning losses (the same interface).

Modules are imported on first use, so this package (and `validation`, which lists the types) does not import JAX.
"""

import importlib
from typing import Any

import ml_collections

# objective.type -> the module of this package that implements it.
OBJECTIVES = {'mlm': 'mlm', 'electra': 'electra'}


def objective_type(config: ml_collections.ConfigDict) -> str:
  """`objective.type` of a pretraining config ('mlm' for a config from before objectives had a key)."""
  return config.get('objective', {}).get('type', 'mlm')


def objective_module(config: ml_collections.ConfigDict) -> Any:
  """The module of the config's objective: `make`, and for a run's saved params `abstract_params(config)`,
  `mlm_of(config, params)` (the masked LM: model config, module, params) and `encoder_of(params)`."""
  kind = objective_type(config)
  if kind not in OBJECTIVES:
    raise ValueError(f'objective.type={kind!r} is not one of {", ".join(OBJECTIVES)}; pick one of those.')
  return importlib.import_module(f'{__name__}.{OBJECTIVES[kind]}')


def make_objective(config: ml_collections.ConfigDict, tok: Any, split: str = 'train') -> Any:
  """The objective of a resolved pretraining config, for its `split` ('train' or 'eval': the eval masks)."""
  return objective_module(config).make(config, tok, split)
