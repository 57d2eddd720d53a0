"""Learning curves from `WORKDIR/metrics.jsonl` to a PNG: loss and masked-token accuracy, train and eval.

Several workdirs go on one figure, one colour per run, so runs compare at a glance:

  mlm-flax plot --workdir workdirs/a,workdirs/b --out compare.png
"""

import json
import os
from typing import Sequence

METRICS = {'loss': 'loss', 'masked_accuracy': 'masked-token accuracy'}


def read_run(workdir: str) -> list[dict]:
  """The rows of `workdir/metrics.jsonl`; a clear error when there are none."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} not found: pass the --workdir of a `mlm-flax train` run.')
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  if not rows:
    raise ValueError(f'{path} has no rows yet: train for at least log_every_steps steps.')
  return rows


def plot_curves(runs: dict[str, list[dict]], out: str, metrics: Sequence[str] = ('loss', 'masked_accuracy'),
                splits: Sequence[str] = ('train', 'eval'), title: str | None = None) -> str:
  """Draws `metrics` vs step for each run (label -> metrics rows): train thin, eval solid with markers."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')  # files only; no display needed
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.2), squeeze=False)
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  for ax, metric in zip(axes[0], metrics):
    for i, (label, rows) in enumerate(runs.items()):
      for split in splits:
        points = [(r['step'], r[metric]) for r in rows if r.get('split') == split and metric in r]
        if not points:
          continue
        steps, values = zip(*sorted(points))
        style = dict(lw=2, marker='o', ms=4) if split == 'eval' else dict(lw=1, alpha=0.6)
        ax.plot(steps, values, color=colors[i % len(colors)], label=f'{label} ({split})', **style)
    ax.set_xlabel('step')
    ax.set_ylabel(METRICS.get(metric, metric))
    ax.set_title(METRICS.get(metric, metric))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


def plot_runs(workdirs: Sequence[str], out: str | None = None, labels: Sequence[str] | None = None,
              **kwargs) -> str:
  """Plots the runs in `workdirs` on one figure; `out` defaults to `WORKDIR/curves.png` for one run and
  `curves.png` (current folder) for several. Returns the path written."""
  if not workdirs:
    raise ValueError('plot needs at least one workdir.')
  labels = labels or [os.path.basename(os.path.normpath(w)) for w in workdirs]
  if len(set(labels)) < len(labels):  # same folder names: the paths tell them apart
    labels = list(workdirs)
  runs = {label: read_run(w) for label, w in zip(labels, workdirs)}
  if out is None:
    out = os.path.join(workdirs[0], 'curves.png') if len(workdirs) == 1 else 'curves.png'
  return plot_curves(runs, out, **kwargs)
