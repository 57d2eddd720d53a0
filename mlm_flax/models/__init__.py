"""Model architectures: the registry (`model.type` -> module), `make_model`, and the typed `ModelConfig`.

Adding an architecture: one module in this folder exposing `MODEL` (a linen module taking a `ModelConfig`, with
the `__call__`/`encode` interface of `bert.BertMLM` and its `mlm_head` switch), `check_config(cfg)` (ValueError
naming the fix) and `flops_terms(cfg, seq_len)` (how `flops.py` counts it); one entry in `ARCHITECTURES` and one in
`config.OWN` (its own value of each architecture switch: `model.mlp`, `norm`, `positions`, `norm_position`, the
biases); its task head in `heads.HEADS` (classification, token classification); and its Hugging Face mapping in
`mlm_flax/interop/`. Shared layers (attention, dropout, RoPE, MLPs, norms, the tied decoder) are in `layers.py`,
the MLM and task heads in `heads.py`.

Architecture modules are imported on first use, so this package (and `validation`, which takes its list of
types from here) does not import JAX.
"""

import importlib
from types import ModuleType
from typing import Any, Mapping

from mlm_flax.models.config import ModelConfig, position_offset

# model.type -> the module of this package that implements it.
ARCHITECTURES = {'bert': 'bert', 'roberta': 'bert', 'electra': 'bert', 'modernbert': 'modernbert'}

__all__ = ['ARCHITECTURES', 'ModelConfig', 'abstract_params', 'architecture', 'make_model', 'position_offset',
           'resolve_dtype']


def architecture(model_type: str) -> ModuleType:
  """The module implementing `model_type` (`MODEL`, `check_config`, `flops_terms`)."""
  if model_type not in ARCHITECTURES:
    raise ValueError(f'model.type={model_type!r} is not one of {", ".join(ARCHITECTURES)}; pick one of those.')
  return importlib.import_module(f'{__name__}.{ARCHITECTURES[model_type]}')


def make_model(model_cfg: ModelConfig | Mapping[str, Any]) -> Any:
  """Builds the linen module of `model.type` from the `model` config (a ConfigDict, dict or `ModelConfig`)."""
  cfg = model_cfg if isinstance(model_cfg, ModelConfig) else ModelConfig.from_dict(model_cfg)
  module = architecture(cfg.type).MODEL
  cfg.resolved.compute_dtype  # pylint: disable=pointless-statement  # resolve 'auto' now, as the module is built
  return module(cfg)


def abstract_params(model: Any) -> Any:
  """Shapes and dtypes of a linen model's params, without allocating them."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  ids = jnp.zeros((1, 8), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, ids + 1)['params'])


def resolve_dtype(name: str) -> Any:
  """`layers.resolve_dtype`: the compute dtype `model.dtype` names ('auto': the fastest safe one here)."""
  from mlm_flax.models import layers  # pylint: disable=g-import-not-at-top
  return layers.resolve_dtype(name)
