"""Interop with other libraries' checkpoints: `hf.py` (Hugging Face: load, export, import into a workdir), with one
mapping module per architecture (`bert.py`, `modernbert.py`). A new architecture adds its mapping here and an
entry in `hf.MAPPINGS`.
"""

from typing import Any, Mapping

import numpy as np


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
