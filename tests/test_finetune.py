"""Fine-tuning (`mlm-flax finetune`): tasks learn planted signals, results.json, resume, seeds, data errors.

Fast tests fine-tune a tiny random BERT saved as a Hugging Face folder with MiniLM's tokenizer (no pretraining
needed: the signals are planted in the text); the `slow` ones fine-tune the real MiniLM encoder and interrupt the
command line with SIGTERM.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import minilm_path as _minilm_path  # pylint: disable=g-import-not-at-top
from mlm_flax import finetune as finetune_lib
from mlm_flax import optim, writers
from mlm_flax.configs import finetune as finetune_config
from mlm_flax.tasks import data as task_data
from mlm_flax.tasks import metrics as task_metrics

FILLER = tuple('the a cat dog runs sits on mat house tree green blue small big quickly slowly river road old new '
          'red window door table'.split())
PLACES = ('paris', 'hong kong', 'tokyo', 'san francisco', 'rome', 'buenos aires')


def _sentences(rng: np.random.Generator, n: int) -> list[list[str]]:
  return [list(rng.choice(FILLER, size=rng.integers(5, 9))) for _ in range(n)]


def _keyword_rows(seed: int, n: int) -> list[dict]:
  """Label 'pos' iff the planted word is 'excellent' (else 'terrible'), anywhere in the sentence."""
  rng = np.random.default_rng(seed)
  rows = []
  for words in _sentences(rng, n):
    label = 'pos' if rng.random() < 0.5 else 'neg'
    words.insert(rng.integers(len(words) + 1), 'excellent' if label == 'pos' else 'terrible')
    rows.append({'text': ' '.join(words), 'label': label})
  return rows


def _score_rows(seed: int, n: int) -> list[dict]:
  """Score = the number of times 'good' is planted (0-3)."""
  rng = np.random.default_rng(seed)
  rows = []
  for words in _sentences(rng, n):
    k = int(rng.integers(4))
    for _ in range(k):
      words.insert(rng.integers(len(words) + 1), 'good')
    rows.append({'sentence': ' '.join(words), 'score': float(k)})
  return rows


def _place_rows(seed: int, n: int) -> list[dict]:
  """NER-style words and IOB tags: a place (one or two words: B-LOC, I-LOC) after 'at' in filler words."""
  rng = np.random.default_rng(seed)
  rows = []
  for words in _sentences(rng, n):
    i = int(rng.integers(len(words) + 1))
    place = PLACES[rng.integers(len(PLACES))].split()
    words[i:i] = ['at', *place]
    tags = ['O'] * len(words)
    tags[i + 1:i + 1 + len(place)] = ['B-LOC'] + ['I-LOC'] * (len(place) - 1)
    rows.append({'tokens': [str(w) for w in words], 'tags': tags})
  return rows


def _write(path, rows: list[dict]) -> str:
  path = str(path)
  if path.endswith('.csv'):
    import csv  # pylint: disable=g-import-not-at-top
    with open(path, 'w', newline='') as f:
      writer = csv.DictWriter(f, fieldnames=list(rows[0]))
      writer.writeheader()
      writer.writerows(rows)
  else:
    with open(path, 'w') as f:
      f.writelines(json.dumps(r) + '\n' for r in rows)
  return path


def _config(tmp_path, task: str, train: str, validation: str, **overrides):
  c = finetune_config.get_config()
  c.task.type = task
  c.batch_size = 16
  c.eval_batch_size = 24  # not a divisor of the validation size: the last batch is padded
  c.max_seq_length = 24
  c.num_epochs = 5
  c.log_every_steps = 8
  c.progress_bar = False
  c.model.dtype = 'float32'
  # Encoder dropout off: XLA:CPU compiles a step with dropout in every layer 3-10x slower (a minute on 2 busy
  # cores). The head's dropout stays on, so resume checks dropout keyed by (step, global row).
  c.model.hidden_dropout = c.model.attention_dropout = 0.0
  c.classifier_dropout = 0.1
  c.optimizer.learning_rate = 2e-3
  c.data.train_files, c.data.validation_files = train, validation
  c.data.cache_dir = str(tmp_path / 'cache')
  for key, value in overrides.items():
    node = c
    *parents, last = key.split('.')
    for p in parents:
      node = node[p]
    node[last] = value
  return c


@pytest.fixture(scope='module')
def classification_run(tiny_bert, tmp_path_factory):
  """A keyword classification run (csv, string labels), checkpointing every 8 steps, all checkpoints kept."""
  tmp = tmp_path_factory.mktemp('classification')
  config = _config(tmp, 'classification', _write(tmp / 'train.csv', _keyword_rows(0, 256)),
                   _write(tmp / 'validation.csv', _keyword_rows(1, 70)), checkpoint_every_steps=8,
                   max_checkpoints_to_keep=20)
  workdir = str(tmp / 'run')
  return config, workdir, finetune_lib.finetune(config, tiny_bert, workdir)


def test_classification_learns_a_planted_keyword_and_writes_the_workdir(classification_run):
  config, workdir, results = classification_run
  assert results['task'] == 'classification'
  metrics = results['metrics']
  assert metrics['accuracy'] >= 0.9  # the majority baseline is ~0.5
  assert metrics['macro_f1'] >= 0.9 and metrics['matthews'] >= 0.8
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f) == results
  with open(os.path.join(workdir, 'labels.json')) as f:
    assert json.load(f)['label_names'] == ['neg', 'pos']  # sorted unique strings
  assert os.path.isfile(os.path.join(workdir, 'tokenizer', 'tokenizer_config.json'))
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  with open(os.path.join(workdir, 'config.json')) as f:
    saved = json.load(f)
  assert saved['init'] and saved['model']['num_layers'] == 2 and saved['metric_for_best'] == 'accuracy'
  # One eval per epoch (16 steps), every validation row scored; the best step is the best eval's.
  evals = [r for r in writers.read_metrics(workdir) if r['split'] == 'eval']
  assert [r['step'] for r in evals] == [16, 32, 48, 64, 80]
  assert all(r['num_examples'] == 70 for r in evals)
  best = max(evals, key=lambda r: r['accuracy'])
  assert results['best_step'] == best['step'] and metrics['accuracy'] == best['accuracy']
  assert results['per_seed'] == [{'seed': 0, 'best_step': best['step'], 'metrics': metrics}]
  assert os.listdir(os.path.join(workdir, 'best')) == [str(best['step'])]  # kept apart from retention


def crashed_copy(workdir: str, dest: str, after_step: int) -> str:
  """A copy of a finished fine-tuning `workdir` as a crash after the checkpoint of `after_step` leaves it: no
  results.json, no later checkpoints (the best/ folder as it was)."""
  shutil.copytree(workdir, dest)
  os.remove(os.path.join(dest, 'results.json'))
  for name in os.listdir(os.path.join(dest, 'checkpoints')):
    if int(name) > after_step:
      shutil.rmtree(os.path.join(dest, 'checkpoints', name))
  return dest


def test_killed_run_resumes_to_the_same_results(classification_run, tiny_bert, tmp_path):
  """A crash after the checkpoint of step 24 (later checkpoints, results, a later best lost or not): the rerun
  gives the uninterrupted run's results.json and metrics rows, also with another eval batch size."""
  config, workdir, results = classification_run
  killed = crashed_copy(workdir, str(tmp_path / 'killed'), after_step=24)
  config.eval_batch_size = 8  # free to change: eval scores every row once whatever the batch
  assert finetune_lib.finetune(config, tiny_bert, killed) == results
  strip = lambda rows: [{k: v for k, v in r.items() if k not in ('wall_seconds', 'tokens_per_second')} for r in rows]
  assert strip(writers.read_metrics(killed)) == strip(writers.read_metrics(workdir))


@pytest.mark.slow  # two fine-tuning runs
def test_regression_learns_a_planted_score_over_two_seeds(tiny_bert, tmp_path):
  config = _config(tmp_path, 'regression', _write(tmp_path / 'train.jsonl', _score_rows(0, 256)),
                   _write(tmp_path / 'validation.jsonl', _score_rows(1, 64)), seeds=2, num_epochs=4,
                   **{'data.text_column': 'sentence'})
  results = finetune_lib.finetune(config, tiny_bert, str(tmp_path / 'run'))
  per_seed = results['per_seed']
  assert [r['seed'] for r in per_seed] == [0, 1] and all(r['metrics']['pearson'] >= 0.9 for r in per_seed)
  values = [r['metrics']['spearman'] for r in per_seed]
  assert results['metrics']['spearman'] == pytest.approx(np.mean(values))
  assert results['metrics']['spearman_std'] == pytest.approx(np.std(values, ddof=1))
  assert results['best_step'] == [r['best_step'] for r in per_seed]
  for k in range(2):
    with open(tmp_path / 'run' / f'seed_{k}' / 'results.json') as f:
      assert json.load(f)['per_seed'] == [per_seed[k]]


@pytest.mark.slow
def test_token_classification_tags_places_as_entities(tiny_bert, tmp_path):
  config = _config(tmp_path, 'token_classification', _write(tmp_path / 'train.jsonl', _place_rows(0, 320)),
                   _write(tmp_path / 'validation.jsonl', _place_rows(1, 64)), num_epochs=6,
                   **{'optimizer.learning_rate': 5e-3,
                      'data.test_files': _write(tmp_path / 'test.jsonl', _place_rows(2, 40))})
  results = finetune_lib.finetune(config, tiny_bert, str(tmp_path / 'run'))
  assert results['metrics']['f1'] >= 0.9 and results['metrics']['test_f1'] >= 0.9
  with open(tmp_path / 'run' / 'labels.json') as f:
    assert json.load(f)['label_names'] == ['B-LOC', 'I-LOC', 'O']


def test_first_sub_token_labels_and_seqeval_entities(tiny_bert):
  """Labels go on each word's first sub-token only; entity F1 counts whole entities (seqeval)."""
  import transformers  # pylint: disable=g-import-not-at-top
  tok = transformers.AutoTokenizer.from_pretrained(tiny_bert)
  columns = {'text': 'tokens', 'text_pair': None, 'label': 'tags'}
  import datasets  # pylint: disable=g-import-not-at-top
  ds = datasets.Dataset.from_dict({'tokens': [['go', 'to', 'unbelievably', 'rome']]})
  rows = task_data.tokenize(ds, tok, 'token_classification', columns, [[0, 0, 1, 2]], 12)
  words = tok(['go', 'to', 'unbelievably', 'rome'], is_split_into_words=True)
  assert len(words['input_ids']) > 6  # 'unbelievably' is several sub-tokens
  expected = [-100, 0, 0, 1] + [-100] * (len(words['input_ids']) - 6) + [2, -100]
  assert rows['labels'][0].tolist() == expected + [-100] * (12 - len(expected))
  names = ['O', 'B-LOC', 'I-LOC']
  gold = np.array([[-100, 0, 1, 2, -100]])
  assert task_metrics.token_classification(gold, np.array([[0, 0, 1, 2, 0]]), names)['f1'] == 1.0
  assert task_metrics.token_classification(gold, np.array([[0, 0, 1, 0, 1]]), names)['f1'] == 0.0  # half an entity


def test_seeds_report_the_mean_and_sample_std():
  per_seed = [{'seed': 0, 'best_step': 8, 'metrics': {'pearson': 0.9, 'mse': 0.2}},
              {'seed': 1, 'best_step': 16, 'metrics': {'pearson': 0.8, 'mse': 0.4}}]
  results = finetune_lib.aggregate('regression', per_seed)
  assert results['metrics'] == pytest.approx({'pearson': 0.85, 'pearson_std': np.std([0.9, 0.8], ddof=1),
                                              'mse': 0.3, 'mse_std': np.std([0.2, 0.4], ddof=1)})
  assert results['per_seed'] == per_seed and results['best_step'] == [8, 16] and results['task'] == 'regression'


def test_layer_decay_scales_the_learning_rate_by_depth():
  params = {'encoder': {'word_embeddings': {'embedding': 0}, 'layer_0': {'query': {'kernel': 0}},
                        'layer_1': {'query': {'kernel': 0}}}, 'head': {'classifier': {'kernel': 0}}}
  scales = optim.layer_scales(params, num_layers=2, decay=0.5)
  assert scales == {'encoder': {'word_embeddings': {'embedding': 0.125}, 'layer_0': {'query': {'kernel': 0.25}},
                                'layer_1': {'query': {'kernel': 0.5}}}, 'head': {'classifier': {'kernel': 1.0}}}


def _data_config(tmp_path, train_rows, validation_rows, ext='.csv', **data):
  c = finetune_config.get_config()
  c.data.train_files = _write(tmp_path / f'train{ext}', train_rows)
  c.data.validation_files = _write(tmp_path / f'validation{ext}', validation_rows)
  c.data.cache_dir = str(tmp_path / 'cache')
  c.data.update(data)
  return c.data


@pytest.mark.parametrize('case, message', [
    ('unknown_column', "no column 'sentence' (data.text_column); its columns are text, label"),
    ('unseen_label', "label 'maybe' (row 1, column 'label') that the train split never has (train labels: neg, pos)"),
    ('empty_split', 'The validation split is empty'),
    ('text_regression',
     "needs a numeric label column, but column 'label' of the train split holds string values (e.g. 'pos')"),
    ('header_only', "The validation split is empty: data.validation_files = '{validation}' ({validation}) holds no "
                    'rows'),
    ('missing_text', "The train split has 1 rows without text in column 'text' (first: row 1); fill or drop them."),
    ('missing_label', "The validation split has no label in row 1 (column 'label'); label or drop it."),
])
def test_data_errors_name_the_problem_and_the_fix(tiny_bert, tmp_path, case, message):
  import transformers  # pylint: disable=g-import-not-at-top
  tok = transformers.AutoTokenizer.from_pretrained(tiny_bert)
  train = [{'text': 'a good one', 'label': 'pos'}, {'text': 'a bad one', 'label': 'neg'}]
  validation, task, data = train, 'classification', {}
  if case == 'unknown_column':
    data = {'text_column': 'sentence'}
  elif case == 'unseen_label':
    validation = train[:1] + [{'text': 'so so', 'label': 'maybe'}]
  elif case == 'empty_split':
    validation = []
  elif case == 'missing_text':
    train = train[:1] + [{'text': None, 'label': 'neg'}]
  elif case == 'missing_label':
    validation = train[:1] + [{'text': 'so so', 'label': None}]
  elif case != 'header_only':
    task = 'regression'
  ext = '.jsonl' if case.startswith('missing') else '.csv'
  if case == 'empty_split':
    data_cfg = _data_config(tmp_path, train, train, '.jsonl')
    open(data_cfg.validation_files, 'w').close()
  else:
    data_cfg = _data_config(tmp_path, train, validation, ext, **data)
  if case == 'header_only':
    with open(data_cfg.validation_files, 'w') as f:
      f.write('text,label\n')
    message = message.format(validation=data_cfg.validation_files)
  with pytest.raises(ValueError, match=re.escape(message)):
    task_data.load_task_data(data_cfg, task, tok, 16)


def test_the_finetune_config_validates_and_a_bad_value_names_the_fix():
  config = finetune_config.get_config()
  finetune_lib.validate(config, num_devices=1)
  config.metric_for_best = 'pearson'
  with pytest.raises(ValueError, match="metric_for_best='pearson' is not a classification metric to maximise; use "
                                       'one of accuracy, macro_f1, matthews'):
    finetune_lib.validate(config, num_devices=1)


def test_cli_refuses_a_bad_finetune_config_in_one_line(tmp_path):
  proc = subprocess.run([sys.executable, '-m', 'mlm_flax.cli', 'finetune', '--init', 'nowhere', '--workdir',
                         str(tmp_path / 'w'), '--config.task.type=ner'], capture_output=True, text=True)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == ("error: --config.task.type='ner' is not one of classification, "
                                                  'regression, token_classification, question_answering.')


@pytest.mark.slow
def test_real_minilm_encoder_learns_a_keyword_task(tmp_path):
  config = _config(tmp_path, 'classification', _write(tmp_path / 'train.csv', _keyword_rows(0, 192)),
                   _write(tmp_path / 'validation.csv', _keyword_rows(1, 64)), num_epochs=2,
                   **{'optimizer.learning_rate': 5e-5})
  results = finetune_lib.finetune(config, _minilm_path(), str(tmp_path / 'run'))
  assert results['metrics']['accuracy'] >= 0.95, results


@pytest.mark.slow
def test_cli_sigterm_then_rerun_gives_the_uninterrupted_results(tiny_bert, tmp_path):
  train = _write(tmp_path / 'train.csv', _keyword_rows(0, 256))
  validation = _write(tmp_path / 'validation.csv', _keyword_rows(1, 64))
  args = lambda w: [sys.executable, '-m', 'mlm_flax.cli', 'finetune', '--init', tiny_bert, '--workdir', w,
                    '--config.task.type=classification', f'--config.data.train_files={train}',
                    f'--config.data.validation_files={validation}', '--config.batch_size=16',
                    '--config.max_seq_length=24', '--config.num_epochs=20', '--config.checkpoint_every_steps=4',
                    '--config.model.dtype=float32', '--config.progress_bar=false',
                    f'--config.data.cache_dir={tmp_path / "cache"}']
  whole, killed = str(tmp_path / 'whole'), str(tmp_path / 'killed')
  subprocess.run(args(whole), check=True, capture_output=True)
  proc = subprocess.Popen(args(killed), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  ckpts = os.path.join(killed, 'checkpoints')
  while proc.poll() is None and not (os.path.isdir(ckpts) and any(n.isdigit() for n in os.listdir(ckpts))):
    pass  # poll the file system until the first checkpoint is complete
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate()[0]
  assert proc.returncode == 0 and 'Preempted at step' in out, out
  subprocess.run(args(killed), check=True, capture_output=True)
  with open(os.path.join(whole, 'results.json')) as a, open(os.path.join(killed, 'results.json')) as b:
    assert json.load(a) == json.load(b)


# Review fixes (issue 24): each test below failed before its fix.


def _tags_rows(seed: int, n: int) -> list[dict]:
  """`_place_rows` with integer tags (0 = O, 1 = B-LOC, 2 = I-LOC), as CoNLL-style local files give them."""
  ids = {'O': 0, 'B-LOC': 1, 'I-LOC': 2}
  return [{'tokens': r['tokens'], 'tags': [ids[t] for t in r['tags']]} for r in _place_rows(seed, n)]


def test_integer_token_tags_need_label_names_and_then_score_entities(tiny_bert, tmp_path):
  import transformers  # pylint: disable=g-import-not-at-top
  tok = transformers.AutoTokenizer.from_pretrained(tiny_bert)
  data_cfg = _data_config(tmp_path, _tags_rows(0, 8), _tags_rows(1, 4), '.jsonl')
  with pytest.raises(ValueError, match=r"names '0', '1', '2' are not IOB/IOBES tags.*data.label_names"):
    task_data.load_task_data(data_cfg, 'token_classification', tok, 24)
  data_cfg.label_names = 'O,B-LOC,I-LOC'
  rows = task_data.load_task_data(data_cfg, 'token_classification', tok, 24)
  assert rows.label_names == ['O', 'B-LOC', 'I-LOC']
  gold = rows.splits['validation']['labels']
  assert task_metrics.token_classification(gold, gold, rows.label_names)['f1'] == 1.0  # a perfect prediction


def _hf_classifier(path, tok, id2label: dict[int, str]) -> str:
  """A tiny random BertForSequenceClassification with `id2label` and MiniLM's tokenizer."""
  import transformers  # pylint: disable=g-import-not-at-top
  transformers.set_seed(0)
  model = transformers.BertForSequenceClassification(transformers.BertConfig(
      vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
      max_position_embeddings=64, pad_token_id=tok.pad_token_id, id2label=id2label,
      label2id={v: k for k, v in id2label.items()}))
  model.save_pretrained(path)
  tok.save_pretrained(path)
  return model.classifier.weight.detach().numpy()  # [labels, hidden]


def test_init_classifier_is_reused_only_for_the_same_labels_in_their_new_order(tiny_bert, tmp_path, caplog):
  """An init classifier for (pos, neg) fine-tuned on labels sorted (neg, pos): rows reordered, not copied; a
  classifier for other labels starts fresh, with a warning."""
  import transformers  # pylint: disable=g-import-not-at-top
  from mlm_flax import inference  # pylint: disable=g-import-not-at-top
  from mlm_flax.tasks import model as task_model  # pylint: disable=g-import-not-at-top
  tok = transformers.AutoTokenizer.from_pretrained(tiny_bert)
  init = str(tmp_path / 'hf')
  rows = _hf_classifier(init, tok, {0: 'pos', 1: 'neg'})
  config = _config(tmp_path, 'classification', _write(tmp_path / 'train.csv', _keyword_rows(0, 16)),
                   _write(tmp_path / 'validation.csv', _keyword_rows(1, 8)), num_train_steps=1,
                   **{'optimizer.learning_rate': 0.0})  # no update: the best params are the initial ones
  finetune_lib.finetune(config, init, str(tmp_path / 'run'))
  kernel = np.asarray(inference.load_classifier(str(tmp_path / 'run')).params['head']['classifier']['kernel'])
  np.testing.assert_allclose(kernel.T, rows[[1, 0]], rtol=1e-6)  # ours: neg = 0, pos = 1
  encoder = task_model.load_encoder(init)
  with caplog.at_level('WARNING'):
    head = task_model.head_for_labels(encoder, 'classification', ['neutral', 'pos'])
  assert 'classifier' not in head and 'pooler' in head and 'starts fresh' in caplog.text


def test_refused_rerun_and_bad_init_write_no_config(tiny_bert, tmp_path):
  """A multi-seed rerun with a changed config is refused before the folder's config.json is touched; a bad
  --init leaves no config.json for `compare` to list as a run."""
  from mlm_flax import compare  # pylint: disable=g-import-not-at-top
  config = _config(tmp_path, 'classification', _write(tmp_path / 'train.csv', _keyword_rows(0, 16)),
                   _write(tmp_path / 'validation.csv', _keyword_rows(1, 8)), seeds=2)
  bad = str(tmp_path / 'bad')
  with pytest.raises(FileNotFoundError):
    finetune_lib.finetune(config, str(tmp_path / 'nowhere'), bad)
  with pytest.raises(ValueError, match='holds no runs'):
    compare.find_runs([bad])
  workdir = tmp_path / 'run'
  workdir.mkdir()
  saved = {**config.to_dict(), 'init': tiny_bert}  # what a first run wrote
  (workdir / 'config.json').write_text(json.dumps(saved))
  before = (workdir / 'config.json').read_text()
  config.optimizer.learning_rate = 1e-3
  with pytest.raises(ValueError, match=r'optimizer.learning_rate: 0.002 -> 0.001'):
    finetune_lib.finetune(config, tiny_bert, str(workdir))
  assert (workdir / 'config.json').read_text() == before and not (workdir / 'seed_0').exists()


def test_best_params_survive_a_crash_and_a_resume_with_another_eval_cadence(tiny_bert, tmp_path, monkeypatch):
  """A run crashes at step 44 after its best params moved on (step 40) past its last checkpoint (32, best 32);
  the rerun evaluates every 12 steps and never beats step 32: results.json's test metrics (test split = the
  validation split) are those of step 32's params, which best/ still holds."""
  from mlm_flax.tasks import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  validation = _write(tmp_path / 'validation.csv', _keyword_rows(1, 16))
  config = _config(tmp_path, 'classification', _write(tmp_path / 'train.csv', _keyword_rows(0, 64)), validation,
                   num_train_steps=48, eval_every_steps=8, checkpoint_every_steps=16, log_every_steps=4,
                   max_checkpoints_to_keep=5, **{'data.test_files': validation})
  accuracies = [0.1, 0.2, 0.3, 0.4, 0.9]  # the evals of steps 8..40: a new best at each, the last after step 32
  real = metrics_lib.compute

  def fake(task, labels, predictions, names):
    out = real(task, labels, predictions, names)
    return {**out, 'accuracy': accuracies.pop(0)} if accuracies else out

  def crash(self, step, split, row):
    if step == 44:
      raise RuntimeError('crash')
    return write(self, step, split, row)

  write = writers.MetricWriter.write
  monkeypatch.setattr(metrics_lib, 'compute', fake)
  monkeypatch.setattr(writers.MetricWriter, 'write', crash)
  workdir = str(tmp_path / 'run')
  with pytest.raises(RuntimeError, match='crash'):
    finetune_lib.finetune(config, tiny_bert, workdir)
  monkeypatch.setattr(writers.MetricWriter, 'write', write)
  accuracies[:] = [0.35, 0.35]  # the rerun's evals (steps 36, 48): below step 32's 0.4
  config.eval_every_steps = 12  # free to change
  results = finetune_lib.finetune(config, tiny_bert, workdir)
  metrics = results['metrics']
  assert results['best_step'] == 32 and metrics['accuracy'] == 0.4
  assert metrics['test_loss'] == pytest.approx(metrics['loss'], abs=1e-6)  # the params of step 32
  assert os.listdir(os.path.join(workdir, 'best')) == ['32']


def test_a_non_finite_loss_skips_the_update(tiny_bert, tmp_path):
  """A NaN score in one training row: the steps whose batch holds it are skipped, the params stay finite."""
  train = _score_rows(0, 32)
  train[5]['score'] = float('nan')
  config = _config(tmp_path, 'regression', _write(tmp_path / 'train.jsonl', train),
                   _write(tmp_path / 'validation.jsonl', _score_rows(1, 16)), num_train_steps=4,
                   log_every_steps=2, **{'data.text_column': 'sentence'})
  results = finetune_lib.finetune(config, tiny_bert, str(tmp_path / 'run'))
  rows = [r for r in writers.read_metrics(str(tmp_path / 'run')) if r['split'] == 'train']
  assert np.isfinite(results['metrics']['loss']) and all(np.isfinite(r['loss']) for r in rows)
  assert sum(r['skipped_steps'] for r in rows) == 2  # one batch of two per epoch holds row 5
  config.optimizer.nonfinite = 'stop'
  with pytest.raises(FloatingPointError, match='non-finite loss or gradient'):
    finetune_lib.finetune(config, tiny_bert, str(tmp_path / 'stop'))


def test_data_edge_cases_are_named_or_reported(tiny_bert, tmp_path, caplog):
  """A test file whose label column is empty is predicted only (said in a warning), not refused; token labels
  cut by max_seq_length are counted in a warning."""
  import transformers  # pylint: disable=g-import-not-at-top
  tok = transformers.AutoTokenizer.from_pretrained(tiny_bert)
  train = [{'text': 'a good one', 'label': 'pos'}, {'text': 'a bad one', 'label': 'neg'}]
  data_cfg = _data_config(tmp_path, train, train)
  data_cfg.test_files = _write(tmp_path / 'test.csv', [{'text': 'so so', 'label': ''}, {'text': 'meh', 'label': ''}])
  with caplog.at_level('WARNING'):
    rows = task_data.load_task_data(data_cfg, 'classification', tok, 16)
  assert 'labels' not in rows.splits['test'] and 'The test split has no labels' in caplog.text
  caplog.clear()
  words = [{'tokens': ['at'] * 10 + ['rome', 'paris'], 'tags': ['O'] * 10 + ['B-LOC', 'B-LOC']}]
  (tmp_path / 'tokens').mkdir()
  data_cfg = _data_config(tmp_path / 'tokens', words, words, '.jsonl')
  with caplog.at_level('WARNING'):
    task_data.load_task_data(data_cfg, 'token_classification', tok, 8)  # [CLS] + 6 words + [SEP]
  assert '6 words of 1 rows of the train split lie past max_seq_length=8' in caplog.text


def test_default_recipe_is_the_one_the_readme_states():
  """configs/finetune.py's defaults are transformers.Trainer's (README, "Fine-tuning"); tests that pin the GLUE
  recipe set it themselves."""
  c = finetune_config.get_config()
  assert (c.optimizer.learning_rate, c.batch_size, c.num_epochs, c.optimizer.warmup_ratio,
          c.optimizer.warmup_steps, c.optimizer.weight_decay, c.optimizer.schedule, c.optimizer.grad_clip_norm) == (
              5e-5, 8, 3, 0.0, None, 0.0, 'linear', 1.0)
  with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'README.md')) as f:
    readme = ' '.join(f.read().split())
  assert 'AdamW 5e-5, no warmup, linear decay to 0, weight decay 0, 3 epochs, batch 8' in readme


@pytest.mark.slow  # ~4 minutes on 2 cores: 171 steps of the real MiniLM
def test_default_recipe_learns_the_small_docstring_task(tmp_path):
  """The defaults on docstring_topics (462 train, 116 held out, 5 labels) from MiniLM: above a floor the old
  GLUE-recipe defaults (0.68 there) stay under; README "Fine-tuning defaults" has the table."""
  from mlm_flax.data import corpora  # pylint: disable=g-import-not-at-top
  splits = corpora.docstring_topics()
  c = finetune_config.get_config()
  c.progress_bar, c.model.dtype, c.data.cache_dir = False, 'float32', str(tmp_path / 'cache')
  c.data.train_files = _write(tmp_path / 'train.jsonl', splits['train'])
  c.data.validation_files = _write(tmp_path / 'test.jsonl', splits['test'])
  finetune_lib.finetune(c, _minilm_path(), str(tmp_path / 'run'))
  last = [r for r in writers.read_metrics(str(tmp_path / 'run')) if r['split'] == 'eval'][-1]
  assert last['accuracy'] >= 0.8, last
