"""Mean ± std over seeds of a multi-seed QA fine-tuning workdir: the last step's held-out EM / F1 (no selection)
and results.json's best-epoch ones.

  python experiments/qa/summarize.py workdirs/qa_minilm
"""

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root

from mlm_flax import writers  # pylint: disable=wrong-import-position


def summarize(workdir: str) -> dict:
  seeds = sorted(d for d in os.listdir(workdir) if d.startswith('seed_'))
  last = [[r for r in writers.read_metrics(os.path.join(workdir, s)) if r['split'] == 'eval'][-1] for s in seeds]
  with open(os.path.join(workdir, 'results.json')) as f:
    best = json.load(f)['metrics']
  out = {'seeds': len(seeds), 'steps': last[0]['step']}
  for name in ('exact_match', 'f1'):
    values = np.asarray([r[name] for r in last])
    out[f'last_{name}'] = [round(float(values.mean()), 1), round(float(values.std(ddof=1)), 1)]
    out[f'best_{name}'] = [round(best[name], 1), round(best[f'{name}_std'], 1)]
  return out


if __name__ == '__main__':
  print(json.dumps(summarize(sys.argv[1])))
