"""The one place that reads and writes a workdir's JSON files: `config.json` (the run's resolved config),
`labels.json` (a fine-tuning run's label names), `results.json` (its metrics) and `sweep.json` (a sweep's points).

Writes are atomic (a temporary file renamed: a killed write never leaves half a file) and made by process 0 only;
reads of a file that is not JSON (cut short, edited) raise one ValueError naming the file and the fix. Importing
this module does not import JAX (compare and sweep read workdirs without it).
"""

import json
import os
from typing import Any

CONFIG_FIX = 'restore it from a copy, or start the run again in a new --workdir.'
RESULTS_FIX = 'delete it and run the same `mlm-flax finetune` command again to rewrite it.'
SWEEP_FIX = 'delete it to record this sweep anew (finished points are still skipped), or use another --workdir.'


def read_json(path: str, fix: str) -> Any:
  """The JSON in `path`; a file that is not JSON raises ValueError naming it and `fix`."""
  with open(path) as f:
    text = f.read()
  try:
    return json.loads(text)
  except ValueError as e:
    raise ValueError(f'{path} is not valid JSON ({e}); {fix}') from None


def write_json(path: str, obj: Any, all_processes: bool = False) -> None:
  """Writes `obj` as JSON to `path` atomically, from process 0 (or from every process: `all_processes`)."""
  if not all_processes:
    import jax  # pylint: disable=g-import-not-at-top  (lazy: readers of workdirs need no JAX)
    if jax.process_index() != 0:
      return
  with open(path + '.tmp', 'w') as f:
    json.dump(obj, f, indent=2)
  os.replace(path + '.tmp', path)


def config_path(workdir: str) -> str:
  return os.path.join(workdir, 'config.json')


def read_config(workdir: str) -> dict | None:
  """`workdir`'s config.json (a pretraining, imported or fine-tuning run's, or a Hugging Face folder's), or None
  when it has none."""
  path = config_path(workdir)
  return read_json(path, CONFIG_FIX) if os.path.isfile(path) else None


def saved_config(workdir: str) -> dict | None:
  """The config.json of the run `workdir` holds; None when there is no run to continue: no config.json, or
  weights imported by `mlm-flax import` that no checkpoint has trained yet (that config.json is the import's,
  not a run's)."""
  checkpoints = os.path.join(workdir, 'checkpoints')
  trained = os.path.isdir(checkpoints) and any(n.isdigit() for n in os.listdir(checkpoints))
  if not trained and os.path.isdir(os.path.join(workdir, 'imported')):
    return None
  return read_config(workdir)


def write_config(workdir: str, config: dict) -> None:
  write_json(config_path(workdir), config)


def read_labels(workdir: str) -> dict | None:
  """A fine-tuning run's labels.json ({task, num_labels, label_names, columns}), or None."""
  path = os.path.join(workdir, 'labels.json')
  return read_json(path, CONFIG_FIX) if os.path.isfile(path) else None


def read_results(workdir: str) -> dict | None:
  """A fine-tuning run's results.json, or None before it finished."""
  path = os.path.join(workdir, 'results.json')
  return read_json(path, RESULTS_FIX) if os.path.isfile(path) else None


def write_results(workdir: str, results: dict) -> None:
  write_json(os.path.join(workdir, 'results.json'), results)
