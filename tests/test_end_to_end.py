"""The whole loop in-process on a tiny config: train, eval, checkpoint, fill-mask."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import tiny_config
from mlm_flax import evaluate, inference, train, writers


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run') / 'w')
  config = tiny_config()
  config.max_eval_batches = 0
  result = train.train_and_evaluate(config, workdir)
  return workdir, result


def test_workdir_layout_and_metrics(trained):
  workdir, result = trained
  for name in ('config.json', 'tokenizer', 'checkpoints', 'metrics.jsonl', 'tensorboard'):
    assert os.path.exists(os.path.join(workdir, name)), name
  assert os.listdir(os.path.join(workdir, 'tensorboard'))
  rows = writers.read_metrics(workdir)
  assert [r['step'] for r in rows if r['split'] == 'train'] == [4, 8, 12]
  assert [r['step'] for r in rows if r['split'] == 'eval'] == [6, 12]
  for r in rows:
    assert {'loss', 'masked_accuracy', 'perplexity', 'num_masked_tokens'} <= set(r)
    assert 0 <= r['masked_accuracy'] <= 1 and r['loss'] > 0
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['model']['vocab_size'] == 1000  # filled in from the trained tokenizer
  # max_checkpoints_to_keep=3: steps 4, 8, 12 are kept (12 is final).
  assert sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit()) == [4, 8, 12]


def test_eval_is_exact_and_covers_the_whole_split(trained):
  workdir, result = trained
  a = evaluate.evaluate_workdir(workdir)
  b = evaluate.evaluate_workdir(workdir)
  assert a == b
  assert a['step'] == 12
  for k in ('loss', 'masked_accuracy', 'num_masked_tokens'):
    assert a[k] == pytest.approx(result[k], rel=1e-6), k  # same masks as the end-of-training eval
  # Every validation row is evaluated: about 15% of its maskable tokens.
  from mlm_flax import data
  from mlm_flax.data import tokenizer
  mlm = inference.load(workdir)
  splits = data.load_text_splits(mlm.config.data, mlm.config.seed)
  rows = data.pack(splits['validation'], mlm.tokenizer, mlm.config.max_seq_length)
  maskable = ~np.isin(rows['input_ids'], tokenizer.special_token_ids(mlm.tokenizer))
  per_row = np.maximum(1, np.floor(0.15 * maskable.sum(1) + 0.5)) * (maskable.sum(1) > 0)
  assert a['num_masked_tokens'] == int(per_row.sum())


def test_fill_mask_shapes(trained):
  workdir, _ = trained
  mlm = inference.load(workdir)
  one = inference.fill_mask(mlm, 'return the [MASK] of the file.', top_k=3)
  assert isinstance(one, list) and len(one) == 3
  assert set(one[0]) == {'score', 'token', 'token_str', 'sequence'}
  scores = [p['score'] for p in one]
  assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
  assert one[0]['sequence'] == mlm.tokenizer.decode(
      mlm.tokenizer('return the [MASK] of the file.')['input_ids'][:3] + [one[0]['token']]
      + mlm.tokenizer('return the [MASK] of the file.')['input_ids'][4:], skip_special_tokens=True)
  two = inference.fill_mask(mlm, 'the [MASK] of the [MASK].', top_k=2)
  assert len(two) == 2 and all(len(m) == 2 for m in two)
  many = inference.fill_mask(mlm, ['a [MASK] b', 'the [MASK] of the [MASK] and a longer text here'], top_k=2)
  assert len(many) == 2 and len(many[0]) == 2 and len(many[1]) == 2 and isinstance(many[1][0], list)
  with pytest.raises(ValueError, match='no mask token'):
    inference.fill_mask(mlm, 'nothing to fill here')
  with pytest.raises(ValueError, match='positions'):
    inference.fill_mask(mlm, 'word ' * 100 + '[MASK]')


def test_fill_mask_matches_the_training_params(trained):
  workdir, _ = trained
  mlm = inference.load(workdir)
  ids = mlm.tokenizer('the [MASK] is', return_tensors='np')['input_ids']
  logits = mlm.model.apply({'params': mlm.params}, ids, np.ones_like(ids))
  probs = np.asarray(jax.nn.softmax(logits[0, 2]))
  top = inference.fill_mask(mlm, 'the [MASK] is', top_k=1)[0]
  assert top['token'] == int(probs.argmax()) and top['score'] == pytest.approx(float(probs.max()), rel=1e-5)


def test_eval_on_other_files(trained, tmp_path):
  """`evaluate_workdir(files=...)` scores any text files; the validation texts themselves give the split's result."""
  from mlm_flax import data
  workdir, _ = trained
  mlm = inference.load(workdir)
  texts = data.load_text_splits(mlm.config.data, mlm.config.seed)['validation']['text']
  path = tmp_path / 'val.jsonl'
  path.write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts))
  assert evaluate.evaluate_workdir(workdir, files=str(path)) == evaluate.evaluate_workdir(workdir)
  half = tmp_path / 'half.txt'
  half.write_text('\n'.join(texts[:len(texts) // 2]))
  assert (evaluate.evaluate_workdir(workdir, files=str(half))['num_masked_tokens']
          < evaluate.evaluate_workdir(workdir)['num_masked_tokens'])
