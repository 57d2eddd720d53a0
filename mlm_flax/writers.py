"""Metric sinks: `WORKDIR/metrics.jsonl` and TensorBoard event files, written by process 0 only."""

import json
import os
import time

import jax


class MetricWriter:
  """Appends `{"step", "split", ...}` rows to metrics.jsonl and scalars to TensorBoard."""

  def __init__(self, workdir: str, resume_step: int = 0):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.start = time.time()
    self._tb = None
    if not self.enabled:
      return
    if os.path.exists(self.path):  # drop rows logged after the checkpoint we resume from
      with open(self.path) as f:
        rows = [l.rstrip('\n') + '\n' for l in f if (s := _step(l)) is not None and s <= resume_step]
      with open(self.path + '.tmp', 'w') as f:
        f.writelines(rows)
      os.replace(self.path + '.tmp', self.path)
    from tensorboardX import SummaryWriter
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'), purge_step=resume_step + 1)

  def write(self, step: int, split: str, metrics: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      row = {'step': step, 'split': split, **metrics, 'wall_seconds': round(time.time() - self.start, 2)}
      f.write(json.dumps(row) + '\n')
    for k, v in metrics.items():
      if isinstance(v, (int, float)):
        self._tb.add_scalar(f'{split}/{k}', v, step)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _step(line: str) -> int | None:
  """The step of a metrics.jsonl row; None for a blank or half-written one (a run killed mid-write)."""
  try:
    return int(json.loads(line)['step'])
  except (ValueError, KeyError, TypeError):
    return None


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l) for l in f if l.strip()]
