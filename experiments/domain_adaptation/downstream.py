"""Downstream tasks for the domain-adaptation experiment, built offline from the same Debian packages.

- `pydoc_chapter` (the domain): which chapter of the Python Library Reference a paragraph comes from
  ("Text Processing Services", "Data Types", ... as `library/index.rst` groups the module pages). The label
  comes from the documentation's own table of contents, not from the text. Split by paragraph (identical
  paragraphs in one split): a chapter's modules appear in training, as topics do in news classification.
  A split by module page (the test asking about modules never seen) was tried first:
  TF-IDF + logistic regression reached 0.365 test accuracy on it, and every fine-tuned 2-layer encoder stayed at
  the majority class (validation loss flat while training loss fell), so it could not tell the models apart.
- `austen_novel` (general English): which of Jane Austen's six novels a paragraph comes from. Split by
  chapter, so test paragraphs come from chapters the classifier never saw.

Each task: ROOT/tasks/NAME/{train,validation,test}.jsonl with `text` and `label` (the name), stable across
reruns (stable hashes, a seeded cap per split). The paragraphs are the corpora's own (`debian_text.py`), so
the pretraining runs saw these texts without their labels (task-adaptive pretraining, as in Gururangan et al.
2020); the labels are new information only fine-tuning gets.
"""

import collections
import hashlib
import json
import os
import random
import re
import zlib

import debian_text  # pylint: disable=import-error  # this folder is on sys.path (run.py)

SPLITS = ('train', 'validation', 'test')
FRACTIONS = {'validation': 0.15, 'test': 0.15}  # of each label's groups; the rest train
MAX_ROWS = {'train': 4000, 'validation': 800, 'test': 800}  # seeded caps: fine-tuning stays minutes on a CPU
MIN_WORDS = 8  # shorter paragraphs ("Yes," said she.) carry no label signal
MIN_GROUPS = 5  # a label needs at least this many groups (module pages / chapters) to appear in every split
_TOCTREE_ENTRY = re.compile(r'^\s+([\w./-]+)\.rst\s*$')
_HEADING = re.compile(r'^[*=#]{3,}\s*$')


def _hash(text: str) -> str:
  return hashlib.sha256(text.encode()).hexdigest()


def toctree(rst: str) -> list[str]:
  """The page names a reStructuredText file's `.. toctree::` directives list, in order."""
  names, inside = [], False
  for line in rst.splitlines():
    if line.startswith('.. toctree::'):
      inside = True
      continue
    if inside and line and not line[0].isspace():
      inside = False
    match = _TOCTREE_ENTRY.match(line) if inside else None
    if match:
      names.append(match.group(1))
  return names


def title(rst: str) -> str:
  """The first heading of a reStructuredText page (the line inside or above its over/underline)."""
  lines = rst.splitlines()
  for i, line in enumerate(lines[:-1]):
    if lines[i + 1].strip() and _HEADING.match(lines[i + 1]) and line.strip() and not _HEADING.match(line):
      return line.strip()
  raise ValueError('no heading found')


def library_chapters(sources: str) -> dict[str, str]:
  """Module page (`library/re`) -> its chapter's title, from `library/index.rst` and the chapter pages."""
  def read(name):
    with open(os.path.join(sources, f'{name}.rst.txt'), encoding='utf-8') as f:
      return f.read()
  chapter_of = {}
  for chapter in toctree(read('library/index')):
    rst = read(f'library/{chapter}')
    for page in toctree(rst):
      chapter_of.setdefault(f'library/{page}', title(rst))
  return chapter_of


def split_groups(rows: list[tuple[str, str, str]], seed: int = 0) -> dict[str, list[dict]]:
  """(group, label, text) rows -> splits: each label's groups in stable-hash order, the first FRACTIONS of
  them to validation and test (at least one each), the rest to train; then a seeded cap per split."""
  groups_of = collections.defaultdict(set)
  for group, label, _ in rows:
    groups_of[label].add(group)
  split_of = {}
  for label, groups in groups_of.items():
    ordered = sorted(groups, key=_hash)
    n_val = max(1, round(FRACTIONS['validation'] * len(ordered)))
    n_test = max(1, round(FRACTIONS['test'] * len(ordered)))
    for i, group in enumerate(ordered):
      split_of[group] = 'validation' if i < n_val else 'test' if i < n_val + n_test else 'train'
  out = {s: [] for s in SPLITS}
  for group, label, text in rows:
    out[split_of[group]].append({'text': text, 'label': label})
  rng = random.Random(seed)
  for split in SPLITS:
    rng.shuffle(out[split])
    out[split] = out[split][:MAX_ROWS[split]]
  return out


def pydoc_chapter_rows(root: str) -> list[tuple[str, str, str]]:
  """(paragraph, chapter title, paragraph) for every paragraph of a library page listed in a chapter with
  enough pages: each paragraph its own group (identical ones share a group, so never straddle splits)."""
  sources = os.path.join(root, 'usr/share/doc/python3.11/html/_sources')
  chapter_of = library_chapters(sources)
  pages_per_chapter = collections.Counter(chapter_of.values())
  rows = []
  for source, text in debian_text.python_doc_documents(root):
    page = source.removeprefix('pydocs:')
    chapter = chapter_of.get(page)
    if chapter and pages_per_chapter[chapter] >= MIN_GROUPS and len(text.split()) >= MIN_WORDS:
      rows.append((text, chapter, text))
  return rows


def austen_novel_rows(root: str) -> list[tuple[str, str, str]]:
  """(book:chapter, novel title, paragraph) for every paragraph of the six novels."""
  rows = []
  for source, text in debian_text.austen_documents(root):
    _, book, chapter = source.split(':')
    if len(text.split()) >= MIN_WORDS:
      rows.append((f'{book}:{chapter}', debian_text.AUSTEN_TITLES[book], text))
  return rows


TASKS = {'pydoc_chapter': ('python_docs', pydoc_chapter_rows), 'austen_novel': ('austen', austen_novel_rows)}


def build_tasks(root: str, cache: str) -> dict[str, dict[str, str]]:
  """ROOT/tasks/NAME/{train,validation,test}.jsonl, built once (atomically per file); returns their paths."""
  paths = {}
  for name, (corpus, make_rows) in TASKS.items():
    folder = os.path.join(root, 'tasks', name)
    paths[name] = {s: os.path.join(folder, f'{s}.jsonl') for s in SPLITS}
    if all(os.path.isfile(p) for p in paths[name].values()):
      continue
    splits = split_groups(make_rows(debian_text.fetch(debian_text.PACKAGES[corpus], cache)))
    os.makedirs(folder, exist_ok=True)
    for split, rows in splits.items():
      with open(paths[name][split] + '.tmp', 'w', encoding='utf-8') as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + '\n' for r in rows)
      os.replace(paths[name][split] + '.tmp', paths[name][split])
  return paths


def describe(paths: dict[str, str]) -> dict:
  """Rows and label counts per split, and the majority-class accuracy on test (the baseline to beat)."""
  out = {}
  for split, path in paths.items():
    with open(path, encoding='utf-8') as f:
      labels = [json.loads(line)['label'] for line in f]
    out[split] = {'rows': len(labels), 'labels': dict(sorted(collections.Counter(labels).items()))}
  majority = collections.Counter(json.loads(l)['label'] for l in open(paths['train'], encoding='utf-8'))
  top = majority.most_common(1)[0][0]
  test = [json.loads(l)['label'] for l in open(paths['test'], encoding='utf-8')]
  out['majority_baseline_test_accuracy'] = sum(t == top for t in test) / len(test)
  return out


# Fine-tuning recipe for the experiment's small models (2 layers, hidden 256): small BERTs want a larger rate
# than BERT-base's 2e-5. 1e-3 from a one-seed probe on validation: the general model on `austen_novel` reached
# 0.48 validation accuracy in 3 epochs (majority 0.22); 2e-4 left the first attempt near the majority class.
FINETUNE = {'num_epochs': 3, 'batch_size': 32, 'max_seq_length': 128, 'optimizer.learning_rate': 1e-3,
            'optimizer.warmup_ratio': 0.1, 'optimizer.weight_decay': 0.01}
METRICS = ('test_accuracy', 'test_macro_f1')

# Question answering on the domain's text: experiments/qa's docstring set (stdlib functions' signatures and
# docstrings; SQuAD format). The recipe is FINETUNE with 10 epochs: a span head learned from scratch on 600
# questions needs more than 3 epochs' ~75 updates (MiniLM with the defaults was still improving after epoch 3,
# experiments/qa/README.md); the best epoch is picked on a validation split of the training modules.
QA_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'qa', 'data')
QA_FINETUNE = {**FINETUNE, 'num_epochs': 10}
QA_METRICS = ('test_exact_match', 'test_f1')


def finetune_all(root: str, task_paths: dict[str, dict[str, str]], models: dict[str, str], seeds: int = 3,
                 overrides: dict | None = None, task_type: str = 'classification') -> dict:
  """Fine-tunes every model (name -> pretraining workdir) on every task with `seeds` seeds, each in
  ROOT/finetune/MODEL/TASK (a rerun resumes or reuses finished ones); returns {task: {model: results.json}}.
  `task_type` 'classification' (FINETUNE; `text` -> `label`) or 'question_answering' (QA_FINETUNE; SQuAD)."""
  from mlm_flax import finetune  # pylint: disable=g-import-not-at-top  # JAX only when fine-tuning
  from mlm_flax.configs import finetune as finetune_config  # pylint: disable=g-import-not-at-top
  recipe, columns = FINETUNE, {'data.text_column': 'text', 'data.label_column': 'label'}
  if task_type == 'question_answering':
    recipe, columns = QA_FINETUNE, {}
  out = {}
  for task, paths in task_paths.items():
    for name, init in models.items():
      config = finetune_config.get_config()
      for key, value in {**recipe, **(overrides or {}), **columns, 'seeds': seeds, 'task.type': task_type,
                         'data.train_files': paths['train'], 'data.validation_files': paths['validation'],
                         'data.test_files': paths['test'], 'progress_bar': False}.items():
        node, *rest = key.split('.')
        if rest:
          config[node][rest[0]] = value
        else:
          config[node] = value
      workdir = os.path.join(root, 'finetune', name, task)
      print(f'fine-tuning {name} on {task} ({seeds} seeds) in {workdir}', flush=True)
      out.setdefault(task, {})[name] = finetune.finetune(config, init, workdir)
  return out


def build_qa_task(root: str) -> dict[str, str]:
  """ROOT/tasks/docstring_qa/{train,validation}.jsonl: experiments/qa's training questions split by module
  (the modules whose zlib.crc32 is 1 mod 5 validate, for best-epoch selection), and its held-out file (other
  modules again) as test, so neither selection nor training sees a test module."""
  folder = os.path.join(root, 'tasks', 'docstring_qa')
  paths = {'train': os.path.join(folder, 'train.jsonl'), 'validation': os.path.join(folder, 'validation.jsonl'),
           'test': os.path.join(QA_DATA, 'test.jsonl')}
  with open(os.path.join(QA_DATA, 'train.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f if line.strip()]
  os.makedirs(folder, exist_ok=True)
  for split, keep in (('train', False), ('validation', True)):
    with open(paths[split], 'w', encoding='utf-8') as f:
      f.writelines(json.dumps(r, ensure_ascii=False) + '\n' for r in rows
                   if (zlib.crc32(r['title'].encode()) % 5 == 1) == keep)
  return paths


def qa_table(results: dict) -> str:
  """Markdown: one row per model, held-out exact match and F1 (0-100) as mean ± std over seeds."""
  lines = ['| task | pretrained on | test exact match | test F1 | seeds |', '|---|---|---:|---:|---:|']
  for task, per_model in results.items():
    for name, r in per_model.items():
      m = r['metrics']
      cells = [f'{m[k]:.1f} ± {m.get(k + "_std", 0.0):.1f}' for k in QA_METRICS]
      lines.append(f'| `{task}` | `{name}` | {cells[0]} | {cells[1]} | {len(r["per_seed"])} |')
  return '\n'.join(lines)


def _test_scores(truth: list[str], predicted) -> dict[str, float]:
  """The references' test accuracy and macro-F1, by the metrics that score fine-tuning (`tasks.metrics`)."""
  from mlm_flax.tasks import metrics  # pylint: disable=g-import-not-at-top
  scores = metrics.classification(truth, predicted)
  return {f'test_{k}': scores[k] for k in ('accuracy', 'macro_f1')}


def bag_of_words(paths: dict[str, str]) -> dict[str, float]:
  """TF-IDF + logistic regression (scikit-learn) on the same splits: the no-pretraining reference row."""
  from sklearn.feature_extraction.text import TfidfVectorizer  # pylint: disable=g-import-not-at-top
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  rows = {s: [json.loads(line) for line in open(paths[s], encoding='utf-8')] for s in SPLITS}
  vectorizer = TfidfVectorizer(sublinear_tf=True, min_df=2)
  x = vectorizer.fit_transform([r['text'] for r in rows['train']])
  classifier = LogisticRegression(C=10, max_iter=2000).fit(x, [r['label'] for r in rows['train']])
  predicted = classifier.predict(vectorizer.transform([r['text'] for r in rows['test']]))
  return _test_scores([r['label'] for r in rows['test']], predicted)


def linear_probe(workdir: str, paths: dict[str, str], max_length: int = 128, batch_size: int = 64) -> dict:
  """Frozen encoder: the mean of its last hidden states over each paragraph's tokens (`max_length`, truncated)
  as features, a standardised logistic regression (scikit-learn) fitted on train, scored on test. Deterministic,
  and it reads the representation pretraining built, before fine-tuning changes it."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.pipeline import make_pipeline  # pylint: disable=g-import-not-at-top
  from sklearn.preprocessing import StandardScaler  # pylint: disable=g-import-not-at-top
  from mlm_flax import inference  # pylint: disable=g-import-not-at-top
  mlm = inference.load(workdir)
  encode = jax.jit(lambda params, ids, seg: mlm.model.apply({'params': params}, ids, seg, method='encode'))

  def features(split):
    rows = [json.loads(line) for line in open(paths[split], encoding='utf-8')]
    out = []
    for i in range(0, len(rows), batch_size):
      enc = mlm.tokenizer([r['text'] for r in rows[i:i + batch_size]], truncation=True, max_length=max_length,
                          padding='max_length', return_tensors='np')
      seg = enc['attention_mask'].astype(np.int32)
      hidden = np.asarray(encode(mlm.params, enc['input_ids'].astype(np.int32), seg), np.float64)
      out.append((hidden * seg[..., None]).sum(1) / seg.sum(1, keepdims=True))
    return np.concatenate(out), [r['label'] for r in rows]

  (x_train, y_train), (x_test, y_test) = features('train'), features('test')
  classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)).fit(x_train, y_train)
  return _test_scores(y_test, classifier.predict(x_test))


def table(results: dict, baselines: dict, bow: dict | None = None, probes: dict | None = None) -> str:
  """Markdown: one row per (task, model), test accuracy and macro-F1 as mean ± std over seeds (fine-tuned),
  and where given the frozen-encoder linear probe's, then the references."""
  lines = ['| task | pretrained on | fine-tuned: test accuracy | fine-tuned: test macro-F1 | seeds | '
           'linear probe: test accuracy | linear probe: test macro-F1 |', '|---|---|---:|---:|---:|---:|---:|']
  for task, per_model in results.items():
    for name, r in per_model.items():
      m = r['metrics']
      cells = [f'{m[k]:.3f} ± {m.get(k + "_std", 0.0):.3f}' for k in METRICS]
      probe = (probes or {}).get(task, {}).get(name)
      probe_cells = [f'{probe[k]:.3f}' for k in METRICS] if probe else ['', '']
      lines.append(f'| `{task}` | `{name}` | {cells[0]} | {cells[1]} | {len(r["per_seed"])} | {probe_cells[0]} | '
                   f'{probe_cells[1]} |')
    if bow:
      lines.append(f'| `{task}` | (TF-IDF + logistic regression, no pretraining) | '
                   f'{bow[task]["test_accuracy"]:.3f} | {bow[task]["test_macro_f1"]:.3f} | | | |')
    lines.append(f'| `{task}` | (majority class of train) | {baselines[task]:.3f} | | | | |')
  return '\n'.join(lines)
