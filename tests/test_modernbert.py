"""ModernBERT: logits parity with transformers' ModernBertForMaskedLM, fill-mask parity with its pipeline,
the sliding window and packed documents, config conversion (legacy and v5 keys), export round trips."""

import dataclasses
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import transformers  # pylint: disable=g-import-not-at-top

from conftest import tiny_config  # pylint: disable=g-import-not-at-top
from mlm_flax import flops, inference, train, validation  # pylint: disable=g-import-not-at-top
from mlm_flax.data import tokenizer  # pylint: disable=g-import-not-at-top
from mlm_flax.interop import hf  # pylint: disable=g-import-not-at-top
from mlm_flax.models import make_model  # pylint: disable=g-import-not-at-top

TEXTS = ['Return the number of items in the list.', 'Open the file and read its contents.',
         'If the value is None, raise an error.', 'A simple class for command interpreters.'] * 20
LAYER_TYPES = ['full_attention', 'sliding_attention', 'sliding_attention', 'full_attention']
BIASES = ('attention_bias', 'mlp_bias', 'norm_bias', 'decoder_bias', 'classifier_bias')


def _tokenizer():
  return tokenizer.train_wordpiece(TEXTS, 120)


def _save_random(tmp_path, biases: bool, local_attention: int = 4):
  """A random ModernBertForMaskedLM of odd sizes (spread logits, non-trivial norms and biases) + tokenizer."""
  torch.manual_seed(0)
  tok = _tokenizer()
  config = transformers.ModernBertConfig(
      vocab_size=len(tok), hidden_size=48, intermediate_size=40, num_hidden_layers=4, num_attention_heads=3,
      layer_types=LAYER_TYPES, local_attention=local_attention, max_position_embeddings=64, initializer_range=0.3,
      rope_parameters={'full_attention': {'rope_type': 'default', 'rope_theta': 1000.0},
                       'sliding_attention': {'rope_type': 'default', 'rope_theta': 30.0}},
      pad_token_id=tok.pad_token_id, cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id,
      bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, attn_implementation='eager',
      **{key: biases for key in BIASES})
  model = transformers.ModernBertForMaskedLM(config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'bias' in name or 'norm' in name:
        p.add_(0.1 * torch.randn_like(p))
  model.eval()
  path = str(tmp_path / f'modernbert-{biases}')
  model.save_pretrained(path)
  tok.save_pretrained(path)
  return path, model, tok


def _f32(mlm: inference.MLM) -> inference.MLM:
  mlm.config.model.dtype = 'float32'
  return dataclasses.replace(mlm, model=make_model(mlm.config.model))


def _padded_batch(tok):
  enc = tok(['Return the number.', 'Open the file and read its contents, then close it.'], padding=True,
            return_tensors='np')
  return enc['input_ids'], enc['attention_mask']


@pytest.mark.parametrize('biases', [True, False])
def test_import_logits_match_transformers(tmp_path, biases):
  path, model, tok = _save_random(tmp_path, biases)
  mlm = _f32(inference.load(path))
  assert mlm.config.model.type == 'modernbert' and mlm.config.model.local_attention == 4
  assert ('bias' in mlm.params['layer_1']['qkv']) == biases
  ids, mask = _padded_batch(tok)
  assert mask.min() == 0 and ids.shape[1] > 8  # padded, and longer than the window (4: two tokens each side)
  with torch.no_grad():
    ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  ours = np.asarray(mlm.model.apply({'params': mlm.params}, ids, mask))
  assert np.abs(ref).max() > 3  # spread logits: a mapping error cannot hide in small numbers
  np.testing.assert_allclose(ours[mask > 0], ref[mask > 0], atol=1e-4, rtol=1e-4)
  with torch.no_grad():
    ref = model.model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  ours = np.asarray(mlm.model.apply({'params': mlm.params}, ids, mask, method=mlm.model.encode))
  np.testing.assert_allclose(ours[mask > 0], ref[mask > 0], atol=1e-4, rtol=1e-4)


def test_encoder_only_checkpoint_gets_a_fresh_head_with_a_warning(tmp_path, caplog):
  path, model, tok = _save_random(tmp_path, False)
  encoder = str(tmp_path / 'encoder')
  model.model.save_pretrained(encoder)  # a ModernBertModel: keys without the `model.` prefix, no head
  tok.save_pretrained(encoder)
  with caplog.at_level('WARNING'):
    mlm = _f32(inference.load(encoder))
  assert 'no MLM head' in caplog.text and 'head_transform' in caplog.text
  ids, mask = _padded_batch(tok)
  with torch.no_grad():
    ref = model.model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  ours = np.asarray(mlm.model.apply({'params': mlm.params}, ids, mask, method=mlm.model.encode))
  np.testing.assert_allclose(ours[mask > 0], ref[mask > 0], atol=1e-4, rtol=1e-4)


def test_legacy_and_v5_configs_convert_alike(tmp_path):
  path, model, _ = _save_random(tmp_path, False)
  with open(os.path.join(path, 'config.json')) as f:
    v5 = json.load(f)
  legacy = {k: v for k, v in v5.items() if k not in ('layer_types', 'rope_parameters')}
  legacy.update(global_attn_every_n_layers=3, global_rope_theta=1000.0, local_rope_theta=30.0)
  ours_v5, ours_legacy = hf.model_config_from_hf(v5), hf.model_config_from_hf(legacy)
  assert ours_v5 == ours_legacy
  assert ours_v5['layer_types'] == '' and ours_v5['global_attn_every_n_layers'] == 3  # the periodic rule
  assert ours_v5['global_rope_theta'] == 1000.0 and ours_v5['local_rope_theta'] == 30.0
  irregular = hf.model_config_from_hf({**v5, 'layer_types': LAYER_TYPES[::-1][1:] + ['full_attention']})
  assert irregular['layer_types'] == 'sliding_attention,sliding_attention,full_attention,full_attention'
  # transformers reads the legacy keys the same way we do (every 3rd layer full, from layer 0)
  ref = transformers.ModernBertConfig(**{k: v for k, v in legacy.items() if k != 'model_type'})
  assert ref.layer_types == LAYER_TYPES
  assert ref.rope_parameters['full_attention']['rope_theta'] == 1000.0
  # and our export of either config gives transformers the original model's settings
  config = tiny_config().model
  config.update(hf.model_config_from_hf(legacy))
  exported = transformers.ModernBertConfig(**{k: v for k, v in hf.hf_config_from_model(config, _tokenizer()).items()
                                              if k != 'model_type'})
  for key in ('layer_types', 'rope_parameters', 'sliding_window', 'norm_eps', 'hidden_activation', *BIASES):
    assert getattr(exported, key) == getattr(model.config, key), key
  with pytest.raises(ValueError, match='rope_type'):
    hf.model_config_from_hf({**v5, 'rope_parameters': {'full_attention': {'rope_type': 'yarn', 'factor': 2.0}}})


def test_fill_mask_matches_the_transformers_pipeline(tmp_path):
  path, _, _ = _save_random(tmp_path, True)
  mlm = _f32(inference.load(path))
  pipe = transformers.pipeline('fill-mask', model=path, tokenizer=path, device='cpu')
  for text in ['return the [MASK] of the file.', 'open the file and read its [MASK], then raise an error.']:
    ref, ours = pipe(text, top_k=5), inference.fill_mask(mlm, text, top_k=5)
    assert [r['token'] for r in ref] == [o['token'] for o in ours]
    assert [r['sequence'] for r in ref] == [o['sequence'] for o in ours]
    np.testing.assert_allclose([r['score'] for r in ref], [o['score'] for o in ours], atol=1e-5)


def _tiny_modernbert(**model_keys):
  c = tiny_config()
  c.model.type = 'modernbert'
  c.model.vocab_size, c.model.pad_token_id, c.model.initializer_range = 50, 0, 0.3
  c.model.update(model_keys)
  return c


def _random_params(model, ids):
  return model.init(jax.random.PRNGKey(1), ids, jnp.ones_like(ids))['params']


def test_sliding_window_hides_tokens_beyond_half_the_window():
  c = _tiny_modernbert(num_layers=1, layer_types='sliding_attention', local_attention=4)
  model = make_model(c.model)
  ids = jnp.asarray(np.random.RandomState(0).randint(1, 50, (1, 12)), jnp.int32)
  params = _random_params(model, ids)
  apply = jax.jit(lambda x: model.apply({'params': params}, x, jnp.ones_like(x), method=model.encode))
  encode = lambda x: np.asarray(apply(x))[0, 5]
  base = encode(ids)
  changed = lambda j: np.abs(encode(ids.at[0, j].set(ids[0, j] % 49 + 1)) - base).max()
  for j in (2, 8, 0, 11):  # 3 or more away from position 5: outside the window (|i - j| <= 4 // 2)
    assert changed(j) == 0, j
  for j in (3, 4, 6, 7):  # inside
    assert changed(j) > 1e-3, j
  full = _tiny_modernbert(num_layers=1, layer_types='full_attention', local_attention=4)
  full_model = make_model(full.model)
  far = ids.at[0, 11].set(ids[0, 11] % 49 + 1)
  full_out = [np.asarray(full_model.apply({'params': params}, x, jnp.ones_like(x), method=full_model.encode))[0, 5]
              for x in (ids, far)]
  assert np.abs(full_out[0] - full_out[1]).max() > 1e-3  # a full-attention layer sees the whole row


def test_packed_documents_match_each_alone():
  # RoPE is relative, so restarting positions changes only rounding; the segment mask is what this checks.
  c = _tiny_modernbert(num_layers=3, local_attention=4, global_attn_every_n_layers=2)
  model = make_model(c.model)
  rng = np.random.RandomState(0)
  a, b = rng.randint(1, 50, 7), rng.randint(1, 50, 6)
  row = jnp.asarray(np.concatenate([a, b])[None], jnp.int32)
  segments = jnp.asarray([[1] * 7 + [2] * 6])
  positions = jnp.asarray([list(range(7)) + list(range(6))])
  params = _random_params(model, row)
  packed = np.asarray(model.apply({'params': params}, row, segments, positions, method=model.encode))[0]
  for doc, where in ((a, slice(0, 7)), (b, slice(7, 13))):
    ids = np.zeros((1, 13), np.int32)
    ids[0, :len(doc)] = doc
    alone = np.asarray(model.apply({'params': params}, jnp.asarray(ids), jnp.asarray(ids > 0),
                                   method=model.encode))[0, :len(doc)]
    np.testing.assert_allclose(packed[where], alone, atol=1e-5)


def test_export_round_trip_gives_transformers_the_same_logits(tmp_path):
  c = _tiny_modernbert(num_layers=3, layer_types='sliding_attention,full_attention,sliding_attention',
                       local_attention=6, attention_bias=True, norm_bias=True)
  tok = _tokenizer()
  c.model.vocab_size, c.model.pad_token_id = len(tok), tok.pad_token_id
  model = make_model(c.model)
  ids, mask = _padded_batch(tok)
  params = _random_params(model, jnp.asarray(ids))
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
  mlm = inference.MLM(config=c, params=params, tokenizer=tok, model=model)
  out = str(tmp_path / 'exported')
  hf.export(mlm, out)
  ref_model = transformers.AutoModelForMaskedLM.from_pretrained(out, attn_implementation='eager').eval()
  assert type(ref_model).__name__ == 'ModernBertForMaskedLM'
  assert ref_model.config.layer_types == ['sliding_attention', 'full_attention', 'sliding_attention']
  with torch.no_grad():
    ref = ref_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  ours = np.asarray(model.apply({'params': params}, ids, mask))
  np.testing.assert_allclose(ours[mask > 0], ref[mask > 0], atol=1e-4, rtol=1e-4)
  reloaded = inference.load(out)  # and back: the same params, bit for bit
  assert jax.tree.structure(reloaded.params) == jax.tree.structure(params)
  for x, y in zip(jax.tree.leaves(reloaded.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert reloaded.config.model.layer_types == c.model.layer_types


def test_trained_modernbert_exports_to_the_pipeline(tmp_path):
  config = tiny_config(tmp_path)
  config.model.type, config.model.local_attention = 'modernbert', 8
  config.num_train_steps, config.eval_every_steps, config.checkpoint_every_steps = 4, 4, 4
  work = str(tmp_path / 'run')
  train.train_and_evaluate(config, work)
  mlm = inference.load(work)
  assert mlm.step == 4 and 'qkv' in mlm.params['layer_0']
  out = str(tmp_path / 'hf')
  hf.export(mlm, out)
  pipe = transformers.pipeline('fill-mask', model=out, tokenizer=out, device='cpu')
  text = 'return the [MASK] of the file, or raise an error if the value is none.'
  ref, ours = pipe(text, top_k=5), inference.fill_mask(mlm, text, top_k=5)
  assert [r['token'] for r in ref] == [o['token'] for o in ours]
  np.testing.assert_allclose([r['score'] for r in ref], [o['score'] for o in ours], atol=1e-5)


def test_config_checks_and_flops():
  c = _tiny_modernbert(layer_types='full_attention')
  with pytest.raises(ValueError, match='lists 1 layers but model.num_layers=2'):
    validation.validate_config(c, 1)
  c.model.layer_types = 'full_attention,local'
  with pytest.raises(ValueError, match="'local'"):
    validation.validate_config(c, 1)
  c = _tiny_modernbert(num_layers=3, local_attention=8)  # layers full, sliding, sliding; seq 32
  validation.validate_config(c, 1)
  h, f, v, s = 32, 64, 50, 32
  expected = 6 * 3 * (4 * h * h + 3 * h * f) + 6 * 2 * h * (s + 9 + 9) + 6 * 0.15 * (h * h + h * v)
  assert flops.config_flops_per_token(c) == pytest.approx(expected)


def test_a_bias_switch_that_differs_from_the_checkpoint_is_an_error(tmp_path):
  path, _, _ = _save_random(tmp_path, True)
  config = hf.model_config_from_hf({**hf.read_hf_config(path), 'attention_bias': False})
  mlm_config = tiny_config().model
  mlm_config.update(config)
  mlm_config.dtype = 'float32'
  model = make_model(mlm_config)
  init = _random_params(model, jnp.ones((1, 8), jnp.int32))
  with pytest.raises(ValueError, match=r"attn\.Wo\.bias.*attention_bias"):
    hf.params_from_state_dict(hf.read_state_dict(path), mlm_config.to_dict(), init)
