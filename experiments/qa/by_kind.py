"""Held-out EM / F1 per question kind (return / default / exception) of each seed's best params, scored as
`mlm-flax finetune` scores (windows of max_seq_length, run_qa's post-processing, SQuAD's metrics), in f32.

  python experiments/qa/by_kind.py workdirs/qa_minilm
"""

import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root

from mlm_flax import inference  # pylint: disable=wrong-import-position
from mlm_flax.tasks import qa  # pylint: disable=wrong-import-position

KINDS = {'return': 'What does', 'default': 'What is the default', 'exception': 'Which exception'}


def by_kind(seed_dir: str, rows: list[dict]) -> dict[str, dict[str, float]]:
  model = inference.load_classifier(seed_dir)
  cfg = model.config
  windows = qa.make_windows(model.tokenizer, [r['question'] for r in rows], [r['context'] for r in rows],
                            [r['answers'] for r in rows], cfg.max_seq_length,
                            cfg.task.doc_stride or qa.default_doc_stride(cfg.max_seq_length))
  rows_ = windows.rows
  lengths = rows_['segment_ids'].sum(axis=1)  # windows without their padding (the batches pad them again)
  encoded = [{'input_ids': list(i[:n]), 'token_type_ids': list(t[:n])}
             for i, t, n in zip(rows_['input_ids'], rows_['token_type_ids'], lengths)]
  logits = np.full(rows_['input_ids'].shape + (2,), -1e4, np.float32)
  for w, l in enumerate(inference._batched_logits(model, encoded, 64)):  # pylint: disable=protected-access
    logits[w, :len(l)] = l
  preds = qa.postprocess([r['context'] for r in rows], logits, windows, n_best_size=cfg.task.n_best_size,
                         max_answer_length=cfg.task.max_answer_length)
  out = {}
  for kind, prefix in KINDS.items():
    keep = [i for i, r in enumerate(rows) if r['question'].startswith(prefix)]
    out[kind] = {'n': len(keep), **qa.squad_metrics([rows[i]['answers']['text'] for i in keep],
                                                   [preds[i] for i in keep])}
  return out


def main(workdir: str) -> None:
  with open(os.path.join(HERE, 'data', 'test.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  seeds = sorted(d for d in os.listdir(workdir) if d.startswith('seed_'))
  results = [by_kind(os.path.join(workdir, s), rows) for s in seeds]
  for kind in KINDS:
    em = np.asarray([r[kind]['exact_match'] for r in results])
    f1 = np.asarray([r[kind]['f1'] for r in results])
    print(f'| {kind} | {results[0][kind]["n"]} | {em.mean():.1f} ± {em.std(ddof=1):.1f} | '
          f'{f1.mean():.1f} ± {f1.std(ddof=1):.1f} |')


if __name__ == '__main__':
  main(sys.argv[1])
