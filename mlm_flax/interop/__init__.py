"""Interop with other libraries' checkpoints: `hf.py` (Hugging Face: load, export, import into a workdir), with one
mapping module per architecture (`bert.py`, `modernbert.py`). A new architecture adds its mapping here and an
entry in `hf.MAPPINGS`.
"""

from typing import Any, Mapping


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
