"""Task models: heads equal to transformers' `*ForSequenceClassification` / `*ForTokenClassification`, loading
encoders from pretraining workdirs and Hugging Face folders, `classify` equal to the pipelines, export."""

import json
import os
import types

import numpy as np
import pytest

torch = pytest.importorskip('torch')
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import transformers  # pylint: disable=g-import-not-at-top

from conftest import tiny_config  # pylint: disable=g-import-not-at-top
from test_hf import _bert_tokenizer, _roberta_tokenizer  # pylint: disable=g-import-not-at-top
from mlm_flax import checkpoint, inference  # pylint: disable=g-import-not-at-top
from mlm_flax.interop import hf  # pylint: disable=g-import-not-at-top
from mlm_flax.models import make_model  # pylint: disable=g-import-not-at-top
from mlm_flax.tasks import model as task_lib  # pylint: disable=g-import-not-at-top

BATCH = ['Return the number.', 'Open the file and read its contents, then close it.', 'If the value is None.']


@pytest.fixture(scope='module')
def tokenizers():
  return {'bert': _bert_tokenizer(), 'roberta': _roberta_tokenizer()}


def _save_hf(path, kind, task, tok, num_labels=3, **extra):
  """A random-weight HF task model of odd sizes with non-trivial biases and norms, saved with its tokenizer."""
  torch.manual_seed(0)
  common = dict(vocab_size=len(tok), num_labels=num_labels, pad_token_id=tok.pad_token_id, **extra)
  if kind == 'bert':
    config = transformers.BertConfig(hidden_size=36, num_hidden_layers=2, num_attention_heads=3,
                                     intermediate_size=52, max_position_embeddings=40, **common)
  elif kind == 'roberta':
    config = transformers.RobertaConfig(hidden_size=40, num_hidden_layers=2, num_attention_heads=5,
                                        intermediate_size=44, max_position_embeddings=42, type_vocab_size=1,
                                        layer_norm_eps=1e-5, **common)
  else:
    config = transformers.ModernBertConfig(hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                                           intermediate_size=40, max_position_embeddings=64, local_attention=8,
                                           global_attn_every_n_layers=2, bos_token_id=tok.cls_token_id,
                                           eos_token_id=tok.sep_token_id, cls_token_id=tok.cls_token_id,
                                           sep_token_id=tok.sep_token_id, **common)
  suffix = 'ForTokenClassification' if task == 'token_classification' else 'ForSequenceClassification'
  cls = getattr(transformers, {'bert': 'Bert', 'roberta': 'Roberta', 'modernbert': 'ModernBert'}[kind] + suffix)
  return perturb_and_save(cls(config), path, tok)


def perturb_and_save(model, path, tok):
  """`model` with its biases and norm weights moved off their init (so a mapping error shows in its outputs), in
  eval mode, saved with `tok` in `path`."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'bias' in name or 'norm' in name.lower():
        p.add_(0.1 * torch.randn_like(p))
  model.eval()
  model.save_pretrained(path)
  tok.save_pretrained(path)
  return model


def _ours(path, texts, tok):
  """Logits of our task model loaded from `path`, on a padded batch, and the batch."""
  clf = inference.load_classifier(path)
  batch = tok(texts, padding=True, return_tensors='np')
  logits = jax.jit(clf.model.apply)({'params': clf.params}, batch['input_ids'], batch['attention_mask'],
                                    batch.get('token_type_ids'))
  return np.asarray(logits), batch


@pytest.mark.parametrize('kind,task,extra', [
    ('bert', 'classification', {}), ('roberta', 'classification', {}),
    ('modernbert', 'classification', {'classifier_pooling': 'mean'}),
    pytest.param('modernbert', 'token_classification', {}, marks=pytest.mark.slow),  # ModernBERT's head first
    pytest.param('bert', 'token_classification', {}, marks=pytest.mark.slow)])
def test_task_logits_match_transformers(tmp_path, tokenizers, kind, task, extra):
  tok = tokenizers['roberta' if kind == 'roberta' else 'bert']
  path = str(tmp_path / 'hf')
  model = _save_hf(path, kind, task, tok, **extra)
  ours, batch = _ours(path, BATCH, tok)
  if kind == 'modernbert':
    batch.pop('token_type_ids', None)
  with torch.no_grad():
    ref = model(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()
  assert batch['attention_mask'].min() == 0  # the batch really is padded
  if task == 'token_classification':
    mask = batch['attention_mask'] > 0
    ours, ref = ours[mask], ref[mask]
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope='module')
def pretrain_workdir(tmp_path_factory, tokenizers):
  """A pretraining workdir (config.json, tokenizer/, checkpoints of steps 2 and 4) of a random tiny BERT."""
  work = str(tmp_path_factory.mktemp('pretrain'))
  tok = tokenizers['bert']
  config = tiny_config()
  config.model.vocab_size, config.model.pad_token_id = len(tok), tok.pad_token_id
  tok.save_pretrained(os.path.join(work, 'tokenizer'))
  with open(os.path.join(work, 'config.json'), 'w') as f:
    json.dump(config.to_dict(), f)
  model = make_model(config.model)
  ckpt = checkpoint.Checkpointer(work, async_save=False)
  saved, init = {}, jax.jit(model.init)  # one compile for both steps
  for step in (2, 4):
    params = init(jax.random.PRNGKey(step), jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32))['params']
    state = types.SimpleNamespace(params=params, opt_state={'mu': jnp.zeros(())}, step=jnp.int32(step),
                                  rng=jax.random.PRNGKey(0))
    ckpt.save(step, state, {'step': step})
    saved[step] = params
  ckpt.close()
  return work, saved


@pytest.fixture(scope='module')
def fresh_classifier(pretrain_workdir):
  """A task model with a fresh head on the pretraining workdir's encoder (what fine-tuning starts from), and
  its fresh params."""
  work, _ = pretrain_workdir
  enc = task_lib.load_encoder(work, dtype='float32')
  model = task_lib.make_task_model(enc.model, 'classification', 3, 0.1)
  fresh = task_lib.init_task_params(jax.random.PRNGKey(3), model, 16)
  config = enc.config.copy_and_resolve_references()
  config.model.dtype = 'float32'
  clf = inference.Classifier(config=config, params=task_lib.task_params_from_encoder(enc, fresh),
                             tokenizer=enc.tokenizer, model=model, task='classification', labels=['neg', 'neu', 'pos'],
                             problem_type='single_label_classification', classifier_dropout=0.1)
  return clf, fresh


def test_encoder_from_pretraining_workdir_is_its_params_without_the_mlm_head(pretrain_workdir, fresh_classifier):
  work, saved = pretrain_workdir
  for init, step in ((work, 4), (f'{work}:2', 2)):
    enc = task_lib.load_encoder(init)
    assert enc.step == step and enc.task is None and enc.head == {}
    expected = {k: v for k, v in saved[step].items() if not k.startswith('head')}
    assert set(saved[step]) - set(enc.params) == {'head_bias', 'head_transform', 'head_norm'}  # the MLM head
    jax.tree.map(np.testing.assert_array_equal, enc.params, expected)
  clf, fresh = fresh_classifier  # built from `work` (step 4)
  assert set(fresh) == {'encoder', 'head'} and set(fresh['encoder']) == set(expected)
  assert set(fresh['head']) == {'pooler', 'classifier'}
  jax.tree.map(np.testing.assert_array_equal, clf.params['encoder'],
               {k: v for k, v in saved[4].items() if not k.startswith('head')})
  jax.tree.map(np.testing.assert_array_equal, clf.params['head'], fresh['head'])
  apply = jax.jit(clf.model.apply, static_argnames='deterministic')
  ids = jnp.array([[2, 5, 6, 3, 0]])
  logits = apply({'params': clf.params}, ids, (ids > 0).astype(jnp.int32))
  assert logits.shape == (1, 3)
  # dropout draws per row: training mode differs from eval, and needs its rng
  train = apply({'params': clf.params}, ids, (ids > 0).astype(jnp.int32), deterministic=False,
                rngs={'dropout': jax.random.PRNGKey(0)})
  assert not np.allclose(train, logits)


def _pipeline_scores_close(ours, ref):
  """Equal structure and labels, scores within 1e-5 (the pipeline's outputs: dicts, lists of dicts, nested)."""
  if isinstance(ref, list):
    assert isinstance(ours, list) and len(ours) == len(ref)
    for o, r in zip(ours, ref):
      _pipeline_scores_close(o, r)
    return
  assert isinstance(ours, dict) and set(ours) == set(ref)
  for key in ref:
    if key == 'score':
      assert abs(ours[key] - float(ref[key])) < 1e-5, (ours, ref)
    else:
      assert ours[key] == ref[key], (ours, ref)


SEQUENCE_CALLS = [('return the number of items', {}), (['open the file', 'if the value is none, raise an error'], {}),
                  ({'text': 'open the file', 'text_pair': 'read its contents'}, {}),
                  (['open it', {'text': 'a simple class', 'text_pair': 'for interpreters'}], {'top_k': None}),
                  ('return the number', {'top_k': 2}), ('return the number', {'function_to_apply': 'none'})]


@pytest.mark.parametrize('kind,task,labels', [
    ('bert', 'classification', ['neg', 'neu', 'pos']), ('bert', 'regression', None),
    ('roberta', 'token_classification', ['O', 'B-CODE', 'I-CODE'])])
def test_classify_equals_the_pipeline(tmp_path, tokenizers, kind, task, labels):
  tok = tokenizers['roberta' if kind == 'roberta' else 'bert']
  path = str(tmp_path / 'hf')
  extra = {'problem_type': 'regression'} if task == 'regression' else {
      'id2label': dict(enumerate(labels)), 'label2id': {l: i for i, l in enumerate(labels)}}
  _save_hf(path, kind, task, tok, num_labels=1 if task == 'regression' else 3, **extra)
  clf = inference.load_classifier(path)
  assert clf.task == task and clf.labels == (labels or ['LABEL_0'])
  if task == 'token_classification':
    pipe = transformers.pipeline('token-classification', model=path, device='cpu')
    texts = ['Return the number of items in the list.', 'Open the file and read its contents.']
    ref, ours = pipe(texts), inference.classify(clf, texts)
    tokens = sum(len(tok.tokenize(t)) for t in texts)
    assert 0 < sum(map(len, ref)) < tokens  # some tokens labelled 'O' (dropped), some not
    _pipeline_scores_close(ours, ref)
    _pipeline_scores_close(inference.classify(clf, texts[0]), pipe(texts[0]))
    return
  pipe = transformers.pipeline('text-classification', model=path, device='cpu')
  for inputs, kwargs in SEQUENCE_CALLS if task == 'classification' else SEQUENCE_CALLS[:1]:
    _pipeline_scores_close(inference.classify(clf, inputs, **kwargs), pipe(inputs, **kwargs))
  if task == 'regression':  # the raw score, no sigmoid
    assert inference.classify(clf, 'return the number')[0]['score'] == inference.classify(
        clf, 'return the number', function_to_apply='none')[0]['score']


@pytest.mark.parametrize('kind,task,extra', [('bert', 'classification', {}), ('roberta', 'regression', {}),
                                             ('modernbert', 'classification', {'classifier_pooling': 'mean'}),
                                             ('modernbert', 'token_classification', {})])
def test_hf_classifier_round_trips_through_export(tmp_path, tokenizers, kind, task, extra):
  tok = tokenizers['roberta' if kind == 'roberta' else 'bert']
  path, out = str(tmp_path / 'hf'), str(tmp_path / 'exported')
  if task == 'regression':
    extra = {**extra, 'problem_type': 'regression'}
  model = _save_hf(path, kind, task, tok, num_labels=1 if task == 'regression' else 3, **extra)
  hf.export(inference.load_classifier(path), out)
  auto = (transformers.AutoModelForTokenClassification if task == 'token_classification'
          else transformers.AutoModelForSequenceClassification)
  reloaded = auto.from_pretrained(out).eval()
  assert type(reloaded) is type(model)
  for key in ('id2label', 'label2id', 'problem_type', 'classifier_pooling'):
    assert getattr(reloaded.config, key, None) == getattr(model.config, key, None), key
  batch = {k: torch.tensor(v) for k, v in tok(BATCH, padding=True, return_tensors='np').items()
           if kind != 'modernbert' or k != 'token_type_ids'}
  # What we promise: the exported weights equal the original's bit for bit. PyTorch's own forward of two
  # objects holding those weights may differ by an ulp (its CPU kernels depend on memory layout: 3.7e-9 seen on
  # a Zen 4), so the logits are compared within a tolerance.
  original, exported = model.state_dict(), reloaded.state_dict()
  assert sorted(exported) == sorted(original)
  for k in original:
    np.testing.assert_array_equal(exported[k].numpy(), original[k].numpy(), err_msg=k)
  with torch.no_grad():
    np.testing.assert_allclose(reloaded(**batch).logits.numpy(), model(**batch).logits.numpy(), rtol=1e-6, atol=1e-6)


def test_fresh_head_on_a_pretraining_workdir_exports_and_the_pipeline_agrees(tmp_path, pretrain_workdir,
                                                                             fresh_classifier):
  work, _ = pretrain_workdir
  clf, _ = fresh_classifier
  out = str(tmp_path / 'exported')
  hf.export(clf, out)
  config = json.load(open(os.path.join(out, 'config.json')))
  assert config['architectures'] == ['BertForSequenceClassification']
  assert config['id2label'] == {'0': 'neg', '1': 'neu', '2': 'pos'}
  assert config['problem_type'] == 'single_label_classification'
  pipe = transformers.pipeline('text-classification', model=out, device='cpu')
  for inputs, kwargs in SEQUENCE_CALLS[2:4]:
    _pipeline_scores_close(inference.classify(clf, inputs, **kwargs), pipe(inputs, **kwargs))
  with pytest.raises(ValueError, match='no classification head.*fine-tune it first'):
    inference.load_classifier(work)


@pytest.fixture(scope='module')
def finetuned_workdir(tmp_path_factory, pretrain_workdir, fresh_classifier):
  """A workdir laid out as `mlm-flax finetune` writes it: config.json (`task.type`), labels.json, tokenizer/,
  checkpoints/ (step 5) and best/ (step 3, other params): the pretraining encoder with random heads."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  pretrain, _ = pretrain_workdir
  work = str(tmp_path_factory.mktemp('finetuned'))
  clf, _ = fresh_classifier
  config = clf.config.to_dict()
  config.update(task={'type': 'classification'}, classifier_dropout=0.1, init=pretrain)
  with open(os.path.join(work, 'config.json'), 'w') as f:
    json.dump(config, f)
  with open(os.path.join(work, 'labels.json'), 'w') as f:
    json.dump({'task': 'classification', 'num_labels': 3, 'label_names': clf.labels}, f)
  clf.tokenizer.save_pretrained(os.path.join(work, 'tokenizer'))
  rng = np.random.default_rng(0)
  heads = {step: jax.tree.map(lambda x: x + rng.normal(size=x.shape).astype(x.dtype), clf.params['head'])
           for step in (3, 5)}
  ckpt = checkpoint.Checkpointer(work, async_save=False)
  ckpt.save(5, types.SimpleNamespace(params={**clf.params, 'head': heads[5]}, opt_state={'mu': jnp.zeros(())},
                                     step=jnp.int32(5), rng=jax.random.PRNGKey(0)), {'step': 5})
  ckpt.close()
  with ocp.CheckpointManager(os.path.join(work, 'best')) as best:
    best.save(3, args=ocp.args.Composite(params=ocp.args.StandardSave({**clf.params, 'head': heads[3]}),
                                         meta=ocp.args.JsonSave({'step': 3})))
  return work, heads


def test_finetuned_workdir_serves_its_best_step(finetuned_workdir):
  work, heads = finetuned_workdir
  assert inference.is_task_model(work) and inference.is_task_model(f'{work}:5')
  for init, step in ((work, 3), (f'{work}:5', 5)):
    clf = inference.load_classifier(init)
    assert (clf.step, clf.task, clf.labels) == (step, 'classification', ['neg', 'neu', 'pos'])
    jax.tree.map(np.testing.assert_array_equal, clf.params['head'], heads[step])
  result = inference.classify(clf, ['open the file', 'return it'], top_k=2)
  assert [len(r) for r in result] == [2, 2] and result[0][0]['score'] >= result[0][1]['score']


@pytest.mark.slow
def test_cli_classify_and_export_a_finetuned_workdir(tmp_path, finetuned_workdir):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  work, _ = finetuned_workdir
  cli = [sys.executable, '-m', 'mlm_flax.cli']
  texts = ['open the file', 'return the number of items']
  proc = subprocess.run(cli + ['classify', f'--model={work}', '--top_k=2'] + texts, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  clf = inference.load_classifier(work)
  _pipeline_scores_close(json.loads(proc.stdout), inference.classify(clf, texts, top_k=2))
  proc = subprocess.run(cli + ['classify', f'--model={work}', texts[0]], capture_output=True, text=True)
  _pipeline_scores_close(json.loads(proc.stdout), inference.classify(clf, texts[0]))
  out = str(tmp_path / 'exported')
  proc = subprocess.run(cli + ['export', f'--workdir={work}', f'--out={out}'], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  pipe = transformers.pipeline('text-classification', model=out, device='cpu')
  _pipeline_scores_close(inference.classify(clf, texts, top_k=None), pipe(texts, top_k=None))
  proc = subprocess.run(cli + ['classify', f'--model={work}/missing', texts[0]], capture_output=True, text=True)
  assert proc.returncode == 2 and proc.stderr.startswith('error: ') and 'no config.json' in proc.stderr
