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
from mlm_flax import checkpoint  # pylint: disable=g-import-not-at-top
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
  model = cls(config)
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
  enc = task_lib.load_encoder(path, dtype='float32')
  model = task_lib.make_task_model(enc.model, enc.task, len(enc.labels), enc.classifier_dropout,
                                   enc.classifier_pooling)
  params = task_lib.task_params_from_encoder(enc, task_lib.init_task_params(jax.random.PRNGKey(1), model, 8))
  batch = tok(texts, padding=True, return_tensors='np')
  logits = jax.jit(model.apply)({'params': params}, batch['input_ids'], batch['attention_mask'],
                                batch.get('token_type_ids'))
  return np.asarray(logits), batch


@pytest.mark.parametrize('kind,task,extra', [
    ('bert', 'classification', {}), ('roberta', 'classification', {}),
    ('modernbert', 'classification', {'classifier_pooling': 'mean'}), ('modernbert', 'token_classification', {}),
    ('bert', 'token_classification', {})])
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
  saved = {}
  for step in (2, 4):
    params = model.init(jax.random.PRNGKey(step), jnp.zeros((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32))['params']
    state = types.SimpleNamespace(params=params, opt_state={'mu': jnp.zeros(())}, step=jnp.int32(step),
                                  rng=jax.random.PRNGKey(0))
    ckpt.save(step, state, {'step': step})
    saved[step] = params
  ckpt.close()
  return work, saved


def test_encoder_from_pretraining_workdir_is_its_params_without_the_mlm_head(pretrain_workdir):
  work, saved = pretrain_workdir
  for init, step in ((work, 4), (f'{work}:2', 2)):
    enc = task_lib.load_encoder(init)
    assert enc.step == step and enc.task is None and enc.head == {}
    expected = {k: v for k, v in saved[step].items() if not k.startswith('head')}
    assert set(enc.params) == set(expected) and 'head_bias' not in enc.params
    model = task_lib.make_task_model(enc.model, 'classification', 3, 0.1)
    fresh = task_lib.init_task_params(jax.random.PRNGKey(0), model, 16)
    assert set(fresh) == {'encoder', 'head'} and set(fresh['encoder']) == set(expected)
    params = task_lib.task_params_from_encoder(enc, fresh)
    jax.tree.map(np.testing.assert_array_equal, params['encoder'], expected)
    jax.tree.map(np.testing.assert_array_equal, params['head'], fresh['head'])
    ids = jnp.array([[2, 5, 6, 3, 0]])
    logits = model.apply({'params': params}, ids, (ids > 0).astype(jnp.int32))
    assert logits.shape == (1, 3)
    # dropout draws per row: training mode differs from eval, and needs its rng
    train = model.apply({'params': params}, ids, (ids > 0).astype(jnp.int32), deterministic=False,
                        rngs={'dropout': jax.random.PRNGKey(0)})
    assert not np.allclose(train, logits)
