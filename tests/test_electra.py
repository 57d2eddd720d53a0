"""ELECTRA: `model.embedding_size`, the generator/discriminator pair, its loss, and Hugging Face parity
(`ElectraForPreTraining`, `ElectraForMaskedLM`, `ElectraForSequenceClassification`, fill-mask) and round trips."""

import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import transformers  # pylint: disable=g-import-not-at-top

from test_hf import _bert_tokenizer  # pylint: disable=g-import-not-at-top
from mlm_flax import inference  # pylint: disable=g-import-not-at-top
from mlm_flax.interop import electra as electra_hf  # pylint: disable=g-import-not-at-top
from mlm_flax.models import architecture, make_model  # pylint: disable=g-import-not-at-top
from mlm_flax.objectives import electra, masking  # pylint: disable=g-import-not-at-top
from mlm_flax.tasks import model as task_lib  # pylint: disable=g-import-not-at-top

BATCH = ['Return the number.', 'Open the file and read its contents, then close it.']
# Odd sizes: discriminator hidden 36 (3 heads), generator a third as wide (12, 1 head).
OBJECTIVE = {'type': 'electra', 'generator_hidden_fraction': 1 / 3, 'generator_layers_fraction': 1.0}
MODEL = dict(type='bert', num_layers=2, hidden_size=36, num_heads=3, intermediate_size=52, vocab_size=101,
             max_position_embeddings=40, pad_token_id=0, dtype='float32', attention='einsum')


@pytest.fixture(scope='module')
def tok():
  return _bert_tokenizer()


def _perturbed(model):
  """Non-trivial biases and norms (a mapping error cannot hide), eval mode."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'bias' in name or 'LayerNorm' in name:
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _save_hf_pair(path, tok):
  """A random HF ELECTRA pair of odd sizes sharing the embeddings (`export_electra`'s layout), spread logits
  (initializer_range 0.3); returns (discriminator, generator)."""
  torch.manual_seed(0)
  common = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, max_position_embeddings=40, num_hidden_layers=2,
                initializer_range=0.3)
  disc = _perturbed(transformers.ElectraForPreTraining(transformers.ElectraConfig(
      embedding_size=36, hidden_size=36, num_attention_heads=3, intermediate_size=52, **common)))
  gen = _perturbed(transformers.ElectraForMaskedLM(transformers.ElectraConfig(
      embedding_size=36, hidden_size=12, num_attention_heads=1, intermediate_size=17, **common)))
  gen.electra.embeddings.load_state_dict(disc.electra.embeddings.state_dict())
  gen.generator_lm_head.weight = gen.electra.embeddings.word_embeddings.weight
  for model, folder in ((disc, path), (gen, os.path.join(path, 'generator'))):
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
  return disc, gen


def _padded(tok):
  enc = tok(BATCH, padding=True, return_tensors='np')
  assert enc['attention_mask'].min() == 0  # the batch really is padded
  return enc['input_ids'], enc['attention_mask']


def _ours(params, model_cfg, objective, ids, mask):
  """Our discriminator logits [b, l] and generator logits [b, l, vocab] at every position."""
  generator, discriminator = electra.make_models(dict(model_cfg, dtype='float32'), objective)
  disc = discriminator.apply({'params': params['discriminator']}, ids, mask)
  gen = generator.apply({'params': electra.generator_params(params)}, ids, mask)
  return np.asarray(disc), np.asarray(gen)


def _theirs(disc, gen, ids, mask):
  with torch.no_grad():
    args = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask))
    return disc(**args).logits.numpy(), gen(**args).logits.numpy()


def _assert_parity(ours, theirs, mask):
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(a[mask > 0], b[mask > 0], atol=1e-4, rtol=1e-4)


@pytest.fixture(scope='module')
def hf_pair(tmp_path_factory, tok):
  path = str(tmp_path_factory.mktemp('electra') / 'hf')
  disc, gen = _save_hf_pair(path, tok)
  return path, disc, gen


def test_embedding_size_unset_leaves_the_bert_params_unchanged():
  ids = jnp.zeros((1, 8), jnp.int32)
  shapes = lambda cfg: jax.tree.map(jnp.shape, jax.eval_shape(
      lambda: make_model(cfg).init(jax.random.PRNGKey(0), ids, ids + 1))['params'])
  without = {k: v for k, v in MODEL.items()}
  assert shapes(without) == shapes(dict(MODEL, embedding_size=None)) == shapes(dict(MODEL, embedding_size=36))
  narrow = shapes(dict(MODEL, embedding_size=12))
  assert narrow['embeddings_project']['kernel'] == (12, 36)
  assert narrow['word_embeddings']['embedding'] == (101, 12) and narrow['head_transform']['kernel'] == (36, 12)
  assert set(narrow) - set(shapes(without)) == {'embeddings_project'}
  with pytest.raises(ValueError, match='embedding_size'):
    make_model(dict(MODEL, embedding_size=0)).init(jax.random.PRNGKey(0), ids, ids + 1)
  modern = dict(MODEL, type='modernbert', num_heads=6)
  assert shapes(dict(modern, embedding_size=36)) == shapes(modern)  # the hidden size: no projection
  narrow = shapes(dict(modern, embedding_size=12))
  assert set(narrow) - set(shapes(modern)) == {'embeddings_project'}
  assert narrow['word_embeddings']['embedding'] == (101, 12) and narrow['embeddings_project']['kernel'] == (12, 36)
  with pytest.raises(ValueError, match='embedding_size'):
    architecture('modernbert').check_config(dict(modern, embedding_size=0))


def test_generator_config_and_shared_embeddings():
  gen = electra.generator_model_config(MODEL, OBJECTIVE)
  assert (gen['hidden_size'], gen['num_heads'], gen['intermediate_size'], gen['embedding_size']) == (12, 1, 17, 36)
  assert electra.generator_model_config(dict(MODEL, hidden_size=40, num_heads=5), {})['num_heads'] == 1  # 10 wide
  params = electra.init_params(jax.random.PRNGKey(0), MODEL, OBJECTIVE, 8)
  assert not set(electra.SHARED) & set(params['generator'])
  full = electra.generator_params(params)
  assert full['word_embeddings'] is params['discriminator']['encoder']['word_embeddings']
  assert set(params['discriminator']) == {'encoder', 'head'}
  # ModernBERT: RoPE needs an even head size (a quarter of 72 is 18 wide; 2 heads would be 9 wide, so 1 head), and
  # an explicit layer list is cut to the generator's layers.
  modern = dict(MODEL, type='modernbert', hidden_size=72, num_heads=6, num_layers=3,
                layer_types='full_attention,sliding_attention,full_attention')
  gen = electra.generator_model_config(modern, {'generator_hidden_fraction': 0.25, 'generator_layers_fraction': 0.5})
  assert (gen['hidden_size'], gen['num_layers'], gen['layer_types']) == (18, 2, 'full_attention,sliding_attention')
  assert gen['num_heads'] == 1 and gen['embedding_size'] == 72  # 2 heads would be 9 wide (odd)
  params = electra.init_params(jax.random.PRNGKey(0), modern, OBJECTIVE, 8)
  assert set(electra.generator_params(params)) >= {'word_embeddings', 'embeddings_norm', 'embeddings_project'}
  assert not {'word_embeddings', 'embeddings_norm'} & set(params['generator'])


def test_hf_random_pair_imports_with_logits_parity(hf_pair, tok):
  path, disc, gen = hf_pair
  model_cfg, objective, params = electra_hf.import_electra(path)
  assert model_cfg['type'] == 'electra' and model_cfg['embedding_size'] is None
  np.testing.assert_allclose(objective['generator_hidden_fraction'], 1 / 3)
  ids, mask = _padded(tok)
  _assert_parity(_ours(params, model_cfg, objective, ids, mask), _theirs(disc, gen, ids, mask), mask)


def test_export_loads_in_transformers_with_parity_and_round_trips(tmp_path, tok):
  cfg = dict(MODEL, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
  params = electra.init_params(jax.random.PRNGKey(1), cfg, OBJECTIVE, 8)
  noise = iter(jax.random.split(jax.random.PRNGKey(2), len(jax.tree.leaves(params))))
  params = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(next(noise), x.shape), params)  # no zero biases
  out = str(tmp_path / 'out')
  electra_hf.export_electra(params, cfg, OBJECTIVE, tok, out)
  disc = transformers.AutoModelForPreTraining.from_pretrained(out).eval()
  gen = transformers.AutoModelForMaskedLM.from_pretrained(os.path.join(out, 'generator')).eval()
  assert type(disc).__name__ == 'ElectraForPreTraining' and type(gen).__name__ == 'ElectraForMaskedLM'
  ids, mask = _padded(tok)
  _assert_parity(_ours(params, cfg, OBJECTIVE, ids, mask), _theirs(disc, gen, ids, mask), mask)
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  a, b = (load_file(os.path.join(p, 'model.safetensors')) for p in (out, os.path.join(out, 'generator')))
  shared = [k for k in a if k.startswith('electra.embeddings.')]
  assert len(shared) == 5  # word, position, token type, LayerNorm weight and bias
  for k in shared:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  model_cfg, objective, back = electra_hf.import_electra(out)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, params))
  assert electra.generator_model_config(model_cfg, objective)['intermediate_size'] == 17


def test_export_refuses_roberta_and_ablations(tmp_path, tok):
  params = electra.init_params(jax.random.PRNGKey(1), MODEL, OBJECTIVE, 8)
  for model, match in ((dict(MODEL, type='roberta'), 'numbers positions'),
                       (dict(MODEL, norm_position='pre'), 'norm_position'),
                       (dict(MODEL, type='modernbert', num_heads=6), "BERT-style encoder.*'modernbert'")):
    with pytest.raises(ValueError, match=match):
      electra_hf.export_electra(params, model, OBJECTIVE, tok, str(tmp_path / 'x'))
  assert not os.path.exists(tmp_path / 'x')


def test_fill_mask_on_the_exported_generator_equals_the_pipeline(hf_pair, tmp_path, tok):
  model_cfg, objective, params = electra_hf.import_electra(hf_pair[0])
  out = str(tmp_path / 'out')
  electra_hf.export_electra(params, model_cfg, objective, tok, out)
  folder = os.path.join(out, 'generator')
  pipe = transformers.pipeline('fill-mask', model=folder, tokenizer=folder, device='cpu')
  mlm = inference.load(folder)
  for text in ['return the [MASK] of the file.', 'if the [MASK] is none, raise an error.']:
    ref, ours = pipe(text, top_k=5), inference.fill_mask(mlm, text, top_k=5)
    assert [r['token'] for r in ref] == [o['token'] for o in ours], text
    np.testing.assert_allclose([o['score'] for o in ours], [r['score'] for r in ref], atol=1e-5, rtol=0)


def test_electra_sequence_classifier_matches_transformers(tmp_path, tok):
  torch.manual_seed(0)
  model = _perturbed(transformers.ElectraForSequenceClassification(transformers.ElectraConfig(
      vocab_size=len(tok), embedding_size=24, hidden_size=36, num_attention_heads=3, num_hidden_layers=2,
      intermediate_size=52, max_position_embeddings=40, num_labels=3, pad_token_id=tok.pad_token_id)))
  path = str(tmp_path / 'clf')
  model.save_pretrained(path)
  tok.save_pretrained(path)
  clf = inference.load_classifier(path)
  assert clf.config.model.type == 'electra' and clf.config.model.embedding_size == 24
  ids, mask = _padded(tok)
  ours = np.asarray(clf.model.apply({'params': clf.params}, ids, mask))
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_discriminator_folder_loads_as_an_encoder(hf_pair):
  path, disc, _ = hf_pair
  enc = task_lib.load_encoder(path, dtype='float32')
  _, _, params = electra_hf.import_electra(path)
  assert enc.model.type == 'electra'
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, enc.params),
               params['discriminator']['encoder'])
  del disc


# The loss.

def _batch(seed=0, rows=4, length=16):
  ids = jax.random.randint(jax.random.PRNGKey(seed), (rows, length), 5, 101)
  segment_ids = jnp.ones_like(ids).at[1, 10:].set(0).at[3, 7:].set(0)  # padded rows
  batch = {'input_ids': ids, 'segment_ids': segment_ids, 'row_ids': jnp.arange(rows),
           'positions': jnp.broadcast_to(jnp.arange(length), ids.shape)}
  masked = masking.mask_tokens(jax.random.PRNGKey(seed + 1), ids, vocab_size=101, mask_id=4,
                               special_ids=[0, 1, 2, 3, 4], pad_id=0, maskable=segment_ids > 0, rate=0.3)
  return batch, masked, masking.max_predictions(length, 0.3)


@pytest.fixture(scope='module')
def setup():
  cfg = dict(MODEL, hidden_dropout=0.1, attention_dropout=0.1)
  generator, discriminator = electra.make_models(cfg, OBJECTIVE)
  params = electra.init_params(jax.random.PRNGKey(0), cfg, OBJECTIVE, 16)
  return params, generator, discriminator


def _loss_fn(setup, batch, masked, num, disc_weight, gen_count, disc_count, dropout=True):
  _, generator, discriminator = setup
  def f(params):
    return electra.electra_loss(params, generator, discriminator, batch, masked, num, jax.random.PRNGKey(7),
                                jax.random.PRNGKey(8) if dropout else None, disc_weight, gen_count, disc_count)
  return jax.value_and_grad(f, has_aux=True)


def test_micro_batches_sum_to_the_full_batch_loss_and_gradient(setup):
  params = setup[0]
  batch, masked, num = _batch()
  counts = electra.batch_counts(batch, masked)
  (loss, sums), grads = _loss_fn(setup, batch, masked, num, 50.0, *counts)(params)
  halves = []
  for rows in (slice(0, 2), slice(2, 4)):
    part = jax.tree.map(lambda x: x[rows], batch)
    halves.append(_loss_fn(setup, part, jax.tree.map(lambda x: x[rows], masked), num, 50.0, *counts)(params))
  np.testing.assert_allclose(halves[0][0][0] + halves[1][0][0], loss, rtol=1e-6)
  for k in sums:
    np.testing.assert_allclose(halves[0][0][1][k] + halves[1][0][1][k], sums[k], rtol=1e-6, err_msg=k)
  jax.tree.map(lambda a, b, c: np.testing.assert_allclose(a + b, c, rtol=1e-5, atol=1e-6), halves[0][1],
               halves[1][1], grads)
  assert 0 < sums['replaced'] <= sums['count'] and sums['disc_count'] == counts[1]


def test_a_sample_equal_to_the_original_is_labelled_original(setup, monkeypatch):
  params, generator, discriminator = setup
  batch, masked, num = _batch()
  positions, targets, weights = electra.mlm.gather_predictions(masked, num)
  keep = jnp.arange(num) % 2 == 0  # even prediction slots draw the original token, odd ones another
  monkeypatch.setattr(electra, '_sample', lambda rng, logits, rows: jnp.where(keep, targets, (targets + 1) % 101))
  _, labels, w = electra.disc_predictions(params, generator, discriminator, batch, masked, num, jax.random.PRNGKey(0))
  rows = jnp.arange(4)[:, None]
  expected = jnp.zeros(labels.shape).at[rows, positions].max(jnp.where(keep, 0.0, weights))
  np.testing.assert_array_equal(labels, expected)
  assert 0 < expected.sum() < weights.sum()
  assert np.all(np.asarray(w) == np.asarray(batch['segment_ids'] > 0))


def test_gradients_sampling_and_shared_embeddings(setup):
  params = setup[0]
  batch, masked, num = _batch()
  counts = electra.batch_counts(batch, masked)
  grad = lambda w: _loss_fn(setup, batch, masked, num, w, *counts, dropout=False)(params)[1]
  gen_only, both = grad(0.0), grad(1.0)
  disc_only = jax.tree.map(lambda a, b: a - b, both, gen_only)  # the loss is linear in disc_weight
  # No gradient through sampling: the discriminator's loss leaves the generator's own params alone.
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(disc_only['generator'])) == 0.0
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(gen_only['discriminator']['head'])) == 0.0
  for tree in (gen_only, disc_only):  # both losses reach the shared embeddings
    assert float(jnp.abs(tree['discriminator']['encoder']['word_embeddings']['embedding']).max()) > 0
    assert float(jnp.abs(tree['discriminator']['encoder']['embeddings_norm']['scale']).max()) > 0


def test_summarize_and_auc():
  sums = {'loss_sum': 6.0, 'count': 3.0, 'correct': 1.0, 'disc_loss_sum': 2.0, 'disc_count': 10.0,
          'disc_correct': 8.0, 'replaced': 2.0, 'replaced_correct': 1.0}
  out = electra.summarize(sums)
  assert out['loss'] == 2.0 and out['disc_loss'] == 0.2 and out['disc_accuracy'] == 0.8
  assert out['replaced_fraction'] == 0.2 and out['replaced_recall'] == 0.5 and out['num_disc_tokens'] == 10
  scores, labels = np.array([[0.9, 0.1, 0.8, 0.3]]), np.array([[1, 0, 0, 1]])
  assert electra.disc_auc(scores, labels) == 0.75  # 3 of the 4 (replaced, original) pairs ranked right
  assert electra.disc_auc(scores, labels, np.array([[1, 1, 0, 0]])) == 1.0
  assert np.isnan(electra.disc_auc(scores, np.zeros_like(labels)))
