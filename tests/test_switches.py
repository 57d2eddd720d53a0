"""Architecture switches (`model.mlp`, `norm`, `positions`, `norm_position`, the biases): param trees, numerics
against numpy, RoPE on packed documents, a "modern BERT" that trains and fills masks, export refusal, validation,
FLOPs; and the defaults left exactly as they were."""

import functools
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from mlm_flax import flops, inference, parallel, train, validation
from mlm_flax.checkpoint import Checkpointer
from mlm_flax.data import tokenizer
from mlm_flax.interop import hf
from mlm_flax.models import ARCHITECTURES, config as model_config, make_model
from mlm_flax.objectives.mlm import make_mask_fn

MODERN = dict(norm_position='pre', mlp='swiglu', norm='rmsnorm', positions='rope', attention_bias=False,
              mlp_bias=False, norm_bias=False, decoder_bias=False, classifier_bias=False)
TEXTS = ['Return the number of items in the list.', 'Open the file and read its contents.',
         'If the value is None, raise an error.', 'A simple class for command interpreters.'] * 20


def _config(**kw):
  c = tiny_config()
  c.model.update(dict(vocab_size=97, pad_token_id=0, **kw))
  return c


def _shapes(**kw) -> dict:
  """{'layer_0/query/kernel': shape, ...} of a tiny model's params (traced, not computed)."""
  model = make_model(_config(**kw).model)
  ids = jnp.ones((1, 8), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, ids))['params']
  return {'/'.join(k.key for k in path): tuple(x.shape) for path, x in jax.tree_util.tree_leaves_with_path(params)}


def _random_params(model, ids, scale=0.2):
  """Random params of the model's shapes (no init compile): norm scales near 1, everything else near 0."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, jnp.ones_like(ids)))['params']
  rng = np.random.default_rng(1)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: np.asarray((path[-1].key == 'scale') + scale * rng.standard_normal(x.shape), np.float32), shapes)


def test_default_param_trees_are_unchanged():
  """Today's names and shapes (h 32, f 64, vocab 97, 2 layers): old checkpoints and the HF mappings read them."""
  norm, dense = {'scale': (32,), 'bias': (32,)}, lambda i, o: {'kernel': (i, o), 'bias': (o,)}
  bert = {'word_embeddings/embedding': (97, 32), 'position_embeddings/embedding': (64, 32),
          'token_type_embeddings/embedding': (2, 32), 'head_bias': (97,)}
  modules = {'embeddings_norm': norm, 'head_transform': dense(32, 32), 'head_norm': norm}
  for i in range(2):
    modules.update({f'layer_{i}/{n}': dense(32, 32) for n in ('query', 'key', 'value', 'attention_output')})
    modules.update({f'layer_{i}/attention_norm': norm, f'layer_{i}/intermediate': dense(32, 64),
                    f'layer_{i}/output': dense(64, 32), f'layer_{i}/output_norm': norm})
  bert.update({f'{m}/{leaf}': shape for m, leaves in modules.items() for leaf, shape in leaves.items()})
  assert _shapes() == bert
  assert _shapes(type='roberta') == bert
  assert _shapes(norm_position='pre') == {**bert, 'final_norm/scale': (32,), 'final_norm/bias': (32,)}
  modern = {'word_embeddings/embedding': (97, 32), 'embeddings_norm/scale': (32,), 'final_norm/scale': (32,),
            'head_transform/kernel': (32, 32), 'head_norm/scale': (32,), 'head_bias': (97,),
            'layer_1/attention_norm/scale': (32,)}  # layer 0 has no attention norm (Hugging Face's layout)
  for i in range(2):
    modern.update({f'layer_{i}/qkv/kernel': (32, 96), f'layer_{i}/attention_output/kernel': (32, 32),
                   f'layer_{i}/output_norm/scale': (32,), f'layer_{i}/intermediate/kernel': (32, 128),
                   f'layer_{i}/output/kernel': (64, 32)})
  assert _shapes(type='modernbert') == modern


def test_each_switch_shapes_the_param_tree():
  base = _shapes()
  rms = _shapes(norm='rmsnorm')  # every norm keeps its scale and loses its shift
  assert rms == {k: v for k, v in base.items() if not ('norm/' in k and k.endswith('bias'))}
  for mlp in ('geglu', 'swiglu'):  # `intermediate` makes (input, gate): 2 * intermediate_size
    glu = _shapes(mlp=mlp)
    assert glu['layer_0/intermediate/kernel'] == (32, 128) and glu['layer_0/intermediate/bias'] == (128,)
    assert glu['layer_0/output/kernel'] == (64, 32) and set(glu) == set(base)
  for kind in ('bert', 'roberta'):
    assert _shapes(type=kind, positions='rope') == {k: v for k, v in base.items() if 'position_embeddings' not in k}
  no_bias = _shapes(**{k: False for k in model_config.BIASES})
  assert no_bias == {k: v for k, v in base.items() if not k.endswith('bias')}  # also head_bias
  attention = _shapes(attention_bias=False)
  assert set(base) - set(attention) == {f'layer_{i}/{n}/bias' for i in range(2)
                                         for n in ('query', 'key', 'value', 'attention_output')}
  modern = _shapes(type='modernbert')
  gelu = _shapes(type='modernbert', mlp='gelu', norm='rmsnorm')
  assert gelu == {**modern, 'layer_0/intermediate/kernel': (32, 64), 'layer_1/intermediate/kernel': (32, 64)}


def _rms_norm(x, scale, eps):
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * scale


def _rope(x, positions, theta):
  """Rotary embedding of x [heads, length, head_dim] at `positions`, rotating (first half, second half) pairs."""
  half = x.shape[-1] // 2
  angles = positions[:, None] * theta ** (-np.arange(half) / half)
  cos, sin = np.cos(angles), np.sin(angles)
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def test_modern_bert_layer_matches_numpy():
  """A 1-layer BERT with RMSNorm, SwiGLU, RoPE, pre-LN and no biases against float64 numpy from its params:
  x = RMS_emb(word + type); x += attn(RoPE(q, k) of RMS_a(x)); x += W_out(silu(x W_in) * (x W_gate)) of RMS_o(x);
  out = RMS_final(x)."""
  c = _config(num_layers=1, global_rope_theta=100.0, layer_norm_eps=1e-6, **MODERN)
  model = make_model(c.model)
  ids = jnp.array([[2, 5, 6, 7, 8, 9, 3]])
  params = _random_params(model, ids)
  encode = jax.jit(lambda p, x: model.apply({'params': p}, x, jnp.ones_like(x), method=model.encode))
  out = np.asarray(encode(params, ids), np.float64)[0]

  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  eps, f, layer = 1e-6, c.model.intermediate_size, p['layer_0']
  x = _rms_norm(p['word_embeddings']['embedding'][ids[0]] + p['token_type_embeddings']['embedding'][0],
                p['embeddings_norm']['scale'], eps)
  h = _rms_norm(x, layer['attention_norm']['scale'], eps)
  heads = lambda t: t.reshape(len(t), c.model.num_heads, -1).transpose(1, 0, 2)  # [heads, length, head_dim]
  positions = np.arange(ids.shape[1], dtype=np.float64)
  q, k = (_rope(heads(h @ layer[n]['kernel']), positions, 100.0) for n in ('query', 'key'))
  v = heads(h @ layer['value']['kernel'])
  scores = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  x = x + (probs @ v).transpose(1, 0, 2).reshape(len(x), -1) @ layer['attention_output']['kernel']
  u = _rms_norm(x, layer['output_norm']['scale'], eps) @ layer['intermediate']['kernel']
  silu = lambda a: a / (1 + np.exp(-a))
  x = x + (silu(u[:, :f]) * u[:, f:]) @ layer['output']['kernel']
  np.testing.assert_allclose(out, _rms_norm(x, p['final_norm']['scale'], eps), atol=2e-5)


def test_rope_bert_packed_document_matches_it_alone():
  c = _config(num_layers=1, positions='rope', global_rope_theta=50.0)
  model = make_model(c.model)
  rng = np.random.RandomState(0)
  a, b = rng.randint(5, 97, 7), rng.randint(5, 97, 6)
  row = jnp.asarray(np.concatenate([a, b])[None], jnp.int32)
  params = _random_params(model, row)
  encode = jax.jit(lambda *args: model.apply({'params': params}, *args, method=model.encode))  # one shape: one compile
  restarted = jnp.asarray([list(range(7)) + list(range(6))])
  packed = np.asarray(encode(row, jnp.asarray([[1] * 7 + [2] * 6]), restarted))[0]
  for doc, where in ((a, slice(0, 7)), (b, slice(7, 13))):
    ids = np.zeros((1, 13), np.int32)
    ids[0, :len(doc)] = doc
    alone = np.asarray(encode(jnp.asarray(ids), jnp.asarray(ids > 0, jnp.int32), jnp.arange(13)[None]))[0, :len(doc)]
    np.testing.assert_allclose(packed[where], alone, atol=1e-5)
  # RoPE is relative, so within a document the restart changes only rounding; where attention spans the row
  # (one segment), the positions given are the ones used: restarted positions give other outputs.
  one_segment = jnp.ones_like(row)
  counting = jnp.arange(13)[None]
  moved = np.abs(np.asarray(encode(row, one_segment, restarted)) - np.asarray(encode(row, one_segment, counting)))
  assert moved.max() > 1e-2


@pytest.fixture(scope='module')
def modern_run(tmp_path_factory):
  """A modern BERT (pre-LN, SwiGLU, RMSNorm, RoPE, no biases) trained a few steps on a fixed batch through the
  jitted train step, and a workdir holding it."""
  tok = tokenizer.train_wordpiece(TEXTS, 120)
  c = tiny_config()
  c.model.update(dict(num_layers=1, vocab_size=len(tok), pad_token_id=tok.pad_token_id, hidden_dropout=0.0,
                      attention_dropout=0.0, **MODERN))
  c.masking.rate = 0.3
  c.optimizer.learning_rate, c.optimizer.warmup_steps, c.optimizer.schedule = 3e-3, 2, 'constant'
  validation.validate_config(c, 1)
  model = make_model(c.model)
  mesh = parallel.make_mesh(1)
  tx = train.make_optimizer(c.optimizer, 100)
  mask_fn, num_predictions = make_mask_fn(c, tok)
  state = jax.jit(functools.partial(train.create_train_state, model=model, tx=tx, seq_len=32),
                  out_shardings=parallel.replicated(mesh))(jax.random.PRNGKey(0))  # as the step's: one compile
  step = train.jit_train_step(model, tx, mask_fn, num_predictions, mesh)
  ids = np.zeros((8, 32), np.int32)
  segments, positions = np.zeros_like(ids), np.zeros_like(ids)
  for row in range(8):  # two documents a row, positions restarting
    first, second = (tok(TEXTS[row + j])['input_ids'] for j in (0, 1))
    ids[row, :len(first) + len(second)] = first + second
    segments[row, :len(first) + len(second)] = [1] * len(first) + [2] * len(second)
    positions[row, :len(first) + len(second)] = list(range(len(first))) + list(range(len(second)))
  batch = parallel.to_global({'input_ids': ids, 'segment_ids': segments, 'positions': positions}, mesh)
  losses = []
  for _ in range(12):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss_sum'] / metrics['count']))
  work = str(tmp_path_factory.mktemp('modern') / 'run')
  os.makedirs(work)
  with open(os.path.join(work, 'config.json'), 'w') as f:
    json.dump(c.to_dict(), f)
  tokenizer.save_atomic(tok, os.path.join(work, 'tokenizer'))
  ckpt = Checkpointer(work)
  ckpt.save_imported(jax.device_get(state.params))
  ckpt.close()
  mlm = inference.MLM(config=c, params=jax.device_get(state.params), tokenizer=tok, model=model)
  return {'losses': losses, 'mlm': mlm, 'workdir': work}


def test_modern_bert_trains_and_fills_masks(modern_run):
  losses = modern_run['losses']
  assert all(math.isfinite(l) for l in losses)
  assert np.mean(losses[-3:]) < 0.9 * losses[0] and losses[-1] < min(losses[:3]), losses
  mlm = inference.load(modern_run['workdir'])  # its config.json and params, as `mlm-flax fill-mask` reads them
  for x, y in zip(jax.tree.leaves(mlm.params), jax.tree.leaves(modern_run['mlm'].params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  answers = inference.fill_mask(mlm, 'open the [MASK] and read its contents.', top_k=3)
  assert len(answers) == 3 and answers[0]['score'] >= answers[1]['score'] >= answers[2]['score'] > 0
  assert all(a['sequence'].startswith('open the') and a['sequence'].endswith('and read its contents.') for a in answers)


def test_export_refuses_switches_without_a_hugging_face_equivalent(modern_run, tmp_path):
  out = tmp_path / 'exports' / 'hf'
  with pytest.raises(ValueError) as e:
    hf.export(modern_run['mlm'], str(out))
  message = str(e.value)
  for key, value in MODERN.items():  # every offending key with its value, and the value export needs
    assert f'model.{key}={value!r}' in message and f'model.{key}={model_config.OWN["bert"][key]!r}' in message
  assert 'BertForMaskedLM' in message and 'fill-mask work' in message
  assert os.listdir(tmp_path) == []  # nothing written, not even a temporary folder
  cli = subprocess.run([sys.executable, '-m', 'mlm_flax.cli', 'export', '--workdir', modern_run['workdir'],
                        '--out', str(out)], capture_output=True, text=True, timeout=600)
  errors = [line for line in cli.stderr.splitlines() if line.startswith('error: ')]
  assert cli.returncode == 2 and errors == [f'error: {message}'], cli.stderr[-2000:]
  assert 'Traceback' not in cli.stderr and not out.exists()
  pre_ln = _config(norm_position='pre').model  # pre-LN BERT alone: the same message, one key
  with pytest.raises(ValueError, match=r"no equivalent of model.norm_position='pre'\. .* export needs "
                                       r"model.norm_position='post'\.$"):
    hf.hf_config_from_model(pre_ln, modern_run['mlm'].tokenizer)
  modern = _config(type='modernbert', mlp='swiglu', norm='rmsnorm', norm_bias=True).model
  with pytest.raises(ValueError, match=r"ModernBertForMaskedLM has no equivalent of model.mlp='swiglu', model.norm="
                                       r"'rmsnorm'\. .* export needs model.mlp='geglu', model.norm='layernorm'"):
    hf.hf_config_from_model(modern, modern_run['mlm'].tokenizer)


def test_validation_choices_and_modernbert_own_parts():
  c = _config(mlp='relu_glu')
  with pytest.raises(ValueError, match=r"--config.model.mlp='relu_glu' is not one of gelu, geglu, swiglu"):
    validation.validate_config(c, 1)
  for key, value in (('norm', 'batchnorm'), ('positions', 'alibi')):
    with pytest.raises(ValueError, match=f'--config.model.{key}={value!r} is not one of'):
      validation.validate_config(_config(**{key: value}), 1)
  for key, value in (('positions', 'learned'), ('norm_position', 'post')):  # ModernBERT's by definition
    with pytest.raises(ValueError, match=f"model.{key}={value!r}: ModernBERT .* leave model.{key} unset"):
      validation.validate_config(_config(type='modernbert', **{key: value}), 1)
  validation.validate_config(_config(type='modernbert', positions='rope', norm_position='pre', mlp='swiglu'), 1)
  with pytest.raises(ValueError, match='even head size'):
    validation.validate_config(_config(positions='rope', hidden_size=36, num_heads=4), 1)
  assert set(model_config.OWN) == set(ARCHITECTURES)


def test_older_configs_mean_what_they_meant():
  """A config.json from before the switches (norm_position='post' for every type, no switch keys) builds the
  same model and resumes without a change reported; a switch that changes the architecture is one."""
  for kind, own in (('bert', 'post'), ('modernbert', 'pre')):
    new = _config(type=kind).to_dict()
    old = json.loads(json.dumps(new))
    for key in model_config.SWITCHES:
      del old['model'][key]
    old['model']['norm_position'] = 'post'
    assert validation.config_changes(old, new) == {}
    assert model_config.ModelConfig.from_dict(old['model']).resolved.norm_position == own
    swiglu = _config(type=kind, mlp='swiglu').to_dict()
    assert validation.config_changes(old, swiglu) == {'model.mlp': ('gelu' if kind == 'bert' else 'geglu', 'swiglu')}


def test_flops_count_a_gated_mlp_on_any_architecture():
  h, f, v, s, n = 32, 64, 97, 32, 2
  expected = lambda matmuls: 6 * n * (4 * h * h + matmuls * h * f) + 6 * 2 * h * n * s + 6 * 0.15 * (h * h + h * v)
  assert flops.config_flops_per_token(_config()) == pytest.approx(expected(2))
  assert flops.config_flops_per_token(_config(mlp='swiglu', positions='rope')) == pytest.approx(expected(3))
  c = _config(type='modernbert', mlp='gelu', global_attn_every_n_layers=1)
  assert flops.config_flops_per_token(c) == pytest.approx(expected(2))
