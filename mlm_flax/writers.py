"""Metric sinks: `WORKDIR/metrics.jsonl`, TensorBoard event files (scalars, and HParams at the end of a run)
and, with `logging.wandb`, Weights & Biases; written by process 0 only."""

import hashlib
import json
import os
import shutil
import time

import jax

from mlm_flax import validation

HPARAMS_RUN = 'hparams'  # WORKDIR/tensorboard/hparams: the run's HParams session (config keys and final metrics)


class MetricWriter:
  """Appends `{"step", "split", ...}` rows to metrics.jsonl and scalars to TensorBoard (and W&B when the
  run's `config` sets `logging.wandb`)."""

  def __init__(self, workdir: str, resume_step: int = 0, config: dict | None = None):
    self.enabled = jax.process_index() == 0
    self.workdir = workdir
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.start = time.time()
    self._tb = None
    self._wandb = None
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
    logging = (config or {}).get('logging') or {}
    if logging.get('wandb'):
      self._wandb = _start_wandb(workdir, config, logging.get('wandb_project'))

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
    if self._wandb is not None:
      self._wandb.log({f'{split}/{k}': v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

  def write_hparams(self, config: dict, metrics: dict) -> None:
    """TensorBoard HParams of a finished run: the config's scalar keys (dotted) as hparams, the final eval
    `metrics` as `final/eval_<name>`. Written to tensorboard/hparams, replaced when a resumed run finishes
    again, so TensorBoard pointed at a sweep's root (`--logdir ROOT`) compares every run in one HParams tab."""
    if not self.enabled:
      return
    hparams = {k: v for k, v in validation.flatten(config).items() if isinstance(v, (bool, int, float, str))}
    final = {f'final/eval_{k}': float(v) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and k != 'step'}
    shutil.rmtree(os.path.join(self.workdir, 'tensorboard', HPARAMS_RUN), ignore_errors=True)
    self._tb.add_hparams(hparams, final, name=HPARAMS_RUN, global_step=metrics.get('step'))
    if self._wandb is not None:
      self._wandb.summary.update(final)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None


def _start_wandb(workdir: str, config: dict, project: str | None):
  """A W&B run for `workdir`; its id comes from the workdir's path, so a resumed run continues the same W&B run."""
  try:
    import wandb  # pylint: disable=g-import-not-at-top  (optional: the `wandb` extra)
  except ImportError as e:  # not installed, or an install missing a dependency
    raise ValueError(f'{validation.WANDB_MISSING} (import wandb: {e})') from e
  run_id = hashlib.sha256(os.path.abspath(workdir).encode()).hexdigest()[:16]
  return wandb.init(project=project, name=os.path.basename(os.path.normpath(workdir)), id=run_id, resume='allow',
                    dir=workdir, config=validation.flatten(config))


def _step(line: str) -> int | None:
  """The step of a metrics.jsonl row; None for a blank or half-written one (a run killed mid-write)."""
  try:
    return int(json.loads(line)['step'])
  except (ValueError, KeyError, TypeError):
    return None


def read_metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l) for l in f if l.strip()]
