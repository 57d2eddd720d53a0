"""Interop with other libraries' checkpoints: `hf.py` (Hugging Face: load, export, import into a workdir), with one
mapping module per architecture (`bert.py` for BERT, RoBERTa and ELECTRA, `modernbert.py`); `electra.py` the
ELECTRA objective's generator/discriminator pair. A new architecture adds its mapping here and an entry in
`hf.MAPPINGS`.
"""

from typing import Any, Mapping

import numpy as np

from mlm_flax.models import ModelConfig


def tree_get(tree: Mapping, path: tuple) -> Any:
  """The leaf of a nested params dict at `path` (our param path, e.g. ('layer_0', 'query', 'kernel'))."""
  for p in path:
    tree = tree[p]
  return tree


def tree_set(tree: dict, path: tuple, value: Any) -> None:
  """Sets the leaf at `path`, creating the dicts on the way."""
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def read_tensor(state: Mapping[str, np.ndarray], key: str, transpose: bool, expected: tuple) -> np.ndarray:
  """`state[key]` as float32 in our layout (torch Linear weights are [out, in]: transposed), shape-checked."""
  value = np.asarray(state[key], np.float32)
  value = value.T if transpose else value
  if value.shape != tuple(expected):
    raise ValueError(f'{key}: shape {value.shape} does not match the config ({tuple(expected)}).')
  return value


def check_exportable(model: Mapping[str, Any], needs: Mapping[str, Any], hf_class: str) -> None:
  """Raises one ValueError naming every architecture switch of the `model` config whose resolved value `hf_class`
  cannot represent (`needs`: the values it can), before anything is written. Such a model trains, evaluates and
  fills masks like any other; it only has no Hugging Face equivalent."""
  resolved = ModelConfig.from_dict(model).resolved
  bad = {k: getattr(resolved, k) for k, v in needs.items() if getattr(resolved, k) != v}
  if bad:
    has = ', '.join(f'model.{k}={v!r}' for k, v in bad.items())
    fix = ', '.join(f'model.{k}={needs[k]!r}' for k in bad)
    raise ValueError(f'cannot export to Hugging Face: {hf_class} has no equivalent of {has}. Training, eval and '
                     f'fill-mask work with this model; export needs {fix}.')
