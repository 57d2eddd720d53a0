"""Compare runs: a table of each run's differing config keys and its final and best eval metrics.

  mlm-flax compare ROOT_OR_WORKDIR ... [--csv FILE] [--plot PNG]

A folder with a config.json is a run; any other folder (a sweep's root) stands for the runs in its subfolders.
Metrics come from each run's metrics.jsonl eval rows (final: the last eval; best: the best eval over the run)
and, for fine-tuning runs, results.json (`best_*`: the best step's metrics, `test_*` included). Runs whose configs differ only in `seed` are also summarised as
mean ± std (sample standard deviation) over their seeds. Nothing here imports JAX.
"""

import csv
import json
import math
import os
import statistics
from typing import Any, Sequence

from mlm_flax import plot, validation, workdir_json

EVAL_METRICS = ('loss', 'masked_accuracy')
SWEEP_ORDER_FIX = 'restore it, or delete it to compare the subfolders in name order.'
LOWER_IS_BETTER = ('loss', 'perplexity')


def find_runs(paths: Sequence[str]) -> list[str]:
  """The workdirs in `paths` (each a workdir or a folder of workdirs; in sweep.json's order when there is one)."""
  runs = []
  for path in paths:
    if os.path.isfile(os.path.join(path, 'config.json')):
      runs.append(path)
      continue
    if not os.path.isdir(path):
      raise ValueError(f'{path} is not a folder; pass workdirs or sweep roots (folders of workdirs).')
    names = sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n, 'config.json')))
    record = os.path.join(path, 'sweep.json')
    if os.path.isfile(record):
      order = [p['name'] for p in workdir_json.read_json(record, SWEEP_ORDER_FIX)['points']]
      names = [n for n in order if n in names] + [n for n in names if n not in order]
    if not names:
      raise ValueError(f'{path} holds no runs (no config.json in it or its subfolders); pass workdirs of '
                       '`mlm-flax train` runs or the root of a sweep.')
    runs += [os.path.join(path, n) for n in names]
  return runs


def _better(metric: str, a: float, b: float) -> bool:
  return a < b if any(m in metric for m in LOWER_IS_BETTER) else a > b


def run_metrics(workdir: str) -> tuple[dict[str, Any], list[dict]]:
  """({'step', 'final_<m>', 'best_<m>'}, the metrics.jsonl rows) of one run; a fine-tuning run's results.json
  metrics (those of its best step, `test_*` included) give `best_<name>`, and `step` is its best step."""
  path = os.path.join(workdir, 'metrics.jsonl')
  rows = []
  if os.path.isfile(path):
    with open(path) as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except ValueError:  # a half-written last line (a run killed mid-write)
          pass
  evals = sorted((r for r in rows if r.get('split') == 'eval'), key=lambda r: r['step'])
  out = {'step': max((r['step'] for r in rows), default=None)}
  for m in EVAL_METRICS:
    values = [r[m] for r in evals if isinstance(r.get(m), (int, float))]
    if values:
      out[f'final_{m}'] = values[-1]
      best = values[0]
      for v in values[1:]:
        best = v if _better(m, v, best) else best
      out[f'best_{m}'] = best
  res = workdir_json.read_results(workdir)
  if res is not None:  # fine-tuning: the best step's metrics
    out.update({f'best_{k}': v for k, v in (res.get('metrics') or {}).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)})
    out['step'] = res.get('best_step', out['step'])
  return out, rows


def _label(workdirs: Sequence[str]) -> list[str]:
  names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  return names if len(set(names)) == len(names) else list(workdirs)


def _fmt(v: Any) -> str:
  if v is None:
    return '-'
  if isinstance(v, float):
    return f'{v:.5g}'  # metrics to 5 digits; config values as written (1e-05, 0.003)
  return str(v)


def markdown(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  lines = ['| ' + ' | '.join(headers) + ' |', '|' + '|'.join('---' for _ in headers) + '|']
  lines += ['| ' + ' | '.join(_fmt(v) for v in row) + ' |' for row in rows]
  return '\n'.join(lines)


def table(workdirs: Sequence[str]) -> tuple[list[str], list[list[Any]], dict[str, list[dict]]]:
  """(headers, one row per run: name, the config keys whose values differ, step, metrics; each run's rows)."""
  configs, metrics, curves = [], [], {}
  for w, label in zip(workdirs, _label(workdirs)):
    configs.append(validation.flatten(workdir_json.read_config(w)))
    m, curves[label] = run_metrics(w)
    metrics.append(m)
  keys = sorted({k for c in configs for k in c})
  differing = [k for k in keys if len({json.dumps(c.get(k), sort_keys=True) for c in configs}) > 1]
  names = [k for k in metrics[0] if k != 'step'] if metrics else []
  names += sorted({k for m in metrics for k in m if k != 'step' and k not in names})
  headers = ['run', *differing, 'step', *names]
  rows = [[label, *(c.get(k) for k in differing), m.get('step'), *(m.get(n) for n in names)]
          for label, c, m in zip(curves, configs, metrics)]
  return headers, rows, curves


def seed_summary(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> tuple[list[str], list[list[Any]]] | None:
  """Runs that differ only in `seed` grouped: their keys, seed count, and mean ± std of each metric; None when
  no two runs differ only in seed."""
  if 'seed' not in headers:
    return None
  i_seed, i_step = headers.index('seed'), headers.index('step')
  keys = [i for i in range(1, i_step) if i != i_seed]
  groups: dict[tuple, list] = {}
  for row in rows:
    groups.setdefault(tuple(json.dumps(row[i]) for i in keys), []).append(row)
  if all(len(g) < 2 for g in groups.values()):
    return None
  out = []
  for g in groups.values():
    cells = [g[0][i] for i in keys] + [len(g)]
    for j in range(i_step + 1, len(headers)):
      values = [r[j] for r in g if isinstance(r[j], (int, float))]
      if not values:
        cells.append(None)
        continue
      std = statistics.stdev(values) if len(values) > 1 else 0.0
      cells.append(f'{statistics.fmean(values):.4f} ± {std:.4f}' if math.isfinite(std) else None)
    out.append(cells)
  return [*(headers[i] for i in keys), 'seeds', *headers[i_step + 1:]], out


def compare(paths: Sequence[str], csv_path: str | None = None, plot_path: str | None = None) -> str:
  """The markdown comparison of the runs in `paths`; writes every run's row to `csv_path` and the eval curves
  (loss and masked accuracy vs step, all runs on one figure) to `plot_path` when given."""
  workdirs = find_runs(paths)
  headers, rows, curves = table(workdirs)
  text = markdown(headers, rows)
  summary = seed_summary(headers, rows)
  if summary:
    text += '\n\nMean ± std over seeds:\n\n' + markdown(*summary)
  if csv_path:
    os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
    with open(csv_path, 'w', newline='') as f:
      writer = csv.writer(f)
      writer.writerow(headers)
      writer.writerows([['' if v is None else v for v in row] for row in rows])
  if plot_path:
    drawn = {k: v for k, v in curves.items() if any(r.get('split') == 'eval' for r in v)}
    if not drawn:
      raise ValueError('--plot: no run has eval rows in its metrics.jsonl yet; train past eval_every_steps.')
    plot.plot_curves(drawn, plot_path, metrics=EVAL_METRICS, splits=('eval',),
                     title=f'eval metrics of {len(drawn)} runs')
  return text
