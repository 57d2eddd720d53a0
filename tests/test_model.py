"""Model: packing semantics, padding, masked-position head, mixed precision."""

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from conftest import tiny_config
from mlm_flax import models
from mlm_flax.models import layers as model_lib


def _model(dtype='float32', **kw):
  c = tiny_config().model
  c.update(dict(vocab_size=97, pad_token_id=0, dtype=dtype, **kw))
  m = models.make_model(c)
  ids = jnp.ones((1, 8), jnp.int32)
  return m, m.init(jax.random.PRNGKey(0), ids, ids)['params']


def test_packed_documents_do_not_see_each_other():
  m, params = _model()
  a = jnp.array([[2, 11, 12, 13, 3]]); b = jnp.array([[2, 21, 22, 3]])
  packed = jnp.concatenate([a, b, jnp.zeros((1, 3), jnp.int32)], axis=1)
  segments = jnp.array([[1] * 5 + [2] * 4 + [0] * 3])
  positions = jnp.array([list(range(5)) + list(range(4)) + [0] * 3])
  h_packed = m.apply({'params': params}, packed, segments, positions, method=m.encode)
  h_a = m.apply({'params': params}, a, jnp.ones_like(a), method=m.encode)
  h_b = m.apply({'params': params}, b, jnp.ones_like(b), method=m.encode)
  np.testing.assert_allclose(h_packed[0, :5], h_a[0], atol=1e-5)
  np.testing.assert_allclose(h_packed[0, 5:9], h_b[0], atol=1e-5)


def test_padding_does_not_change_real_tokens():
  m, params = _model()
  ids = jnp.array([[2, 5, 6, 7, 3]])
  padded = jnp.pad(ids, ((0, 0), (0, 4)))
  seg = (padded != 0).astype(jnp.int32)
  h = m.apply({'params': params}, ids, jnp.ones_like(ids), method=m.encode)
  h_pad = m.apply({'params': params}, padded, seg, method=m.encode)
  np.testing.assert_allclose(h_pad[0, :5], h[0], atol=1e-5)


def test_masked_positions_head_matches_full_head():
  m, params = _model()
  ids = jax.random.randint(jax.random.PRNGKey(1), (3, 10), 5, 97)
  seg = jnp.ones_like(ids)
  full = m.apply({'params': params}, ids, seg)
  pos = jnp.array([[1, 4], [0, 9], [5, 5]])
  at = m.apply({'params': params}, ids, seg, masked_positions=pos)
  np.testing.assert_allclose(at, jnp.take_along_axis(full, pos[..., None], axis=1), atol=1e-5)
  assert full.shape == (3, 10, 97)


def test_head_is_tied_to_word_embeddings():
  _, params = _model()
  assert 'head_bias' in params and params['head_bias'].shape == (97,)
  names = {'/'.join(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}
  assert not any('decoder' in n for n in names)  # no separate output matrix


def test_bf16_compute_keeps_f32_params_and_close_gradients():
  ids = jax.random.randint(jax.random.PRNGKey(2), (2, 12), 5, 97)
  seg = jnp.ones_like(ids)

  def loss(params, m):
    return (m.apply({'params': params}, ids, seg) ** 2).mean()

  m32, params = _model('float32')
  m16, _ = _model('bfloat16')
  g32 = jax.grad(loss)(params, m32)
  g16 = jax.grad(loss)(params, m16)
  for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32)):
    assert a.dtype == jnp.float32
    assert float(jnp.abs(a - b).max()) <= 0.05 * float(jnp.abs(b).max()) + 1e-6


def test_auto_dtype_follows_the_hardware(monkeypatch):
  """'auto' is bf16 where bf16 matmuls are fast (GPU/TPU, CPUs with AVX512-BF16/AMX), f32 on other CPUs;
  an explicit name is taken as given."""
  assert model_lib.resolve_dtype('float32') == jnp.float32
  assert model_lib.resolve_dtype('bfloat16') == jnp.bfloat16
  monkeypatch.setattr(model_lib.jax, 'default_backend', lambda: 'cpu')
  monkeypatch.setattr(model_lib, '_cpu_has_fast_bf16', lambda: True)
  assert model_lib.resolve_dtype('auto') == jnp.bfloat16
  assert model_lib.resolve_dtype('float32') == jnp.float32
  monkeypatch.setattr(model_lib, '_cpu_has_fast_bf16', lambda: False)
  assert model_lib.resolve_dtype('auto') == jnp.float32
  for backend in ('gpu', 'tpu'):
    monkeypatch.setattr(model_lib.jax, 'default_backend', lambda b=backend: b)
    assert model_lib.resolve_dtype('auto') == jnp.bfloat16


def test_attention_implementation_asks_for_cudnn_only_where_it_applies():
  """cuDNN flash attention: NVIDIA GPU, 16-bit compute, no attention dropout; XLA's attention otherwise."""
  pick = model_lib.attention_implementation
  assert pick('gpu', jnp.bfloat16, False) == 'cudnn'
  assert pick('cuda', 'float16', False) == 'cudnn'
  assert pick('gpu', jnp.float32, False) is None  # cuDNN's fused kernel needs bf16/fp16 inputs
  assert pick('gpu', jnp.bfloat16, True) is None  # no attention-probability dropout in the kernel
  for backend in ('cpu', 'tpu', 'rocm'):
    assert pick(backend, jnp.bfloat16, False) is None


def test_refused_cudnn_attention_falls_back_to_xla(monkeypatch, caplog):
  """When cuDNN refuses at trace time (here: no cuDNN on a CPU machine), the layer computes XLA's attention."""
  m, params = _model('bfloat16', attention='dot_product_attention', attention_dropout=0.0)
  ids = jnp.array([[2, 11, 12, 13, 3, 21, 22, 0]])
  seg = jnp.array([[1, 1, 1, 1, 1, 2, 2, 0]])
  xla = m.apply({'params': params}, ids, seg)
  monkeypatch.setattr(model_lib, 'attention_implementation', lambda *_: 'cudnn')
  with caplog.at_level('INFO'):
    fallback = m.apply({'params': params}, ids, seg)
  assert 'cuDNN attention unavailable' in caplog.text
  np.testing.assert_array_equal(np.asarray(fallback), np.asarray(xla))


def _layer_norm(x, p, eps):
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p['scale'] + p['bias']


def test_pre_ln_layer_computes_x_plus_attn_of_ln_x_then_mlp_and_a_final_norm():
  """A 1-layer pre-LN encoder against the maths written out in float64 numpy from its params:
  x = LN_emb(embeddings); x += attn(LN_a(x)); x += mlp(LN_o(x)); out = LN_final(x)."""
  m_post, p_post = _model(num_layers=1)
  m, params = _model(num_layers=1, norm_position='pre')
  assert 'final_norm' in params and 'final_norm' not in p_post
  leaves, treedef = jax.tree.flatten(params)  # random LayerNorm scales and biases too (init: 1 and 0)
  keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
  params = treedef.unflatten([x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  ids = jnp.array([[2, 5, 6, 7, 8, 3]])
  out = np.asarray(m.apply({'params': params}, ids, jnp.ones_like(ids), method=m.encode), np.float64)

  p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  c, eps = m.config, m.config.layer_norm_eps
  dense = lambda x, q: x @ q['kernel'] + q['bias']
  x = (p['word_embeddings']['embedding'][ids[0]] + p['position_embeddings']['embedding'][:ids.shape[1]]
       + p['token_type_embeddings']['embedding'][0])
  x = _layer_norm(x, p['embeddings_norm'], eps)
  layer = p['layer_0']
  h = _layer_norm(x, layer['attention_norm'], eps)
  heads = lambda t: t.reshape(len(t), c.num_heads, -1).transpose(1, 0, 2)  # [heads, length, head_dim]
  q, k, v = (heads(dense(h, layer[n])) for n in ('query', 'key', 'value'))
  scores = q @ k.transpose(0, 2, 1) / np.sqrt(q.shape[-1])
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  context = (probs @ v).transpose(1, 0, 2).reshape(len(x), -1)
  x = x + dense(context, layer['attention_output'])
  gelu = np.vectorize(lambda u: 0.5 * u * (1 + math.erf(u / math.sqrt(2))))  # exact (erf) GELU
  x = x + dense(gelu(dense(_layer_norm(x, layer['output_norm'], eps), layer['intermediate'])), layer['output'])
  np.testing.assert_allclose(out[0], _layer_norm(x, p['final_norm'], eps), atol=2e-5)


def test_remat_fused_attention_and_vocab_padding_compute_the_same_function():
  """`model.remat`, `model.attention='dot_product_attention'` and `model.vocab_multiple` change how, not
  what, is computed: same logits (real vocabulary only), same params, same gradients."""
  import pytest  # pylint: disable=g-import-not-at-top
  make_model = models.make_model
  c = tiny_config()
  c.model.vocab_size, c.model.pad_token_id, c.model.vocab_multiple = 100, 0, 128
  c.model.hidden_dropout = c.model.attention_dropout = 0.0
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(1, 100, (2, 16)), jnp.int32)
  seg = jnp.asarray([[1] * 10 + [2] * 4 + [0] * 2, [1] * 16], jnp.int32)
  base = make_model(c.model)
  params = base.init(jax.random.PRNGKey(0), ids, seg)['params']

  def loss_and_grad(model):
    f = lambda p: (model.apply({'params': p}, ids, seg) * (seg > 0)[..., None]).astype(jnp.float32).sum()
    return jax.value_and_grad(f)(params)

  assert params['word_embeddings']['embedding'].shape == (100, c.model.hidden_size)
  assert base.apply({'params': params}, ids, seg).shape == (2, 16, 100)  # the padded 28 are sliced off
  ref_loss, ref_grad = loss_and_grad(base)
  assert tiny_config().model.vocab_multiple is None and model_lib.resolve_vocab_multiple(None) == (
      1 if jax.default_backend() == 'cpu' else 128)
  for key, value in (('remat', True), ('attention', 'dot_product_attention'), ('vocab_multiple', 1),
                     ('vocab_multiple', None)):
    c2 = tiny_config()
    c2.model.update(vocab_size=100, pad_token_id=0, vocab_multiple=128, hidden_dropout=0.0, attention_dropout=0.0)
    c2.model.update(**{key: value})
    other_loss, other_grad = loss_and_grad(make_model(c2.model))
    np.testing.assert_allclose(float(other_loss), float(ref_loss), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(other_grad), jax.tree.leaves(ref_grad)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  c.model.attention = 'flash'
  with pytest.raises(ValueError, match='model.attention'):
    make_model(c.model).apply({'params': params}, ids, seg)


def test_dropout_keeps_the_right_fraction_independently_and_rescales():
  """16-bit dropout: keep rate 1 - rate (both halves of each 32-bit draw), inverted scaling, identity when
  deterministic, a different mask per key."""
  x = jnp.ones((64, 257), jnp.float32)  # odd last axis: the two halves of the draws are cut unevenly
  drop = model_lib.Dropout(0.1)
  y = drop.apply({}, x, deterministic=False, rngs={'dropout': jax.random.PRNGKey(0)})
  kept = np.asarray(y != 0)
  assert abs(kept.mean() - 0.9) < 0.01  # 16,448 draws: 5 sigma ~ 0.012
  assert abs(kept[:, :129].mean() - kept[:, 129:].mean()) < 0.02  # low and high 16 bits alike
  np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.9, rtol=1e-6)
  other = drop.apply({}, x, deterministic=False, rngs={'dropout': jax.random.PRNGKey(1)})
  assert (np.asarray(other != 0) != kept).mean() > 0.1
  assert (drop.apply({}, x, deterministic=True) == x).all()
  assert (model_lib.Dropout(1.0).apply({}, x, deterministic=False, rngs={'dropout': jax.random.PRNGKey(0)}) == 0).all()


def test_dropout_draws_each_row_from_its_row_id():
  """A row's mask depends on its row id, not on its place in the batch (micro-batches, devices)."""
  x = jnp.ones((8, 3, 33), jnp.float32)
  drop = model_lib.Dropout(0.5)
  apply = lambda x, row_ids=None: np.asarray(drop.apply({}, x, deterministic=False, row_ids=row_ids,
                                                        rngs={'dropout': jax.random.PRNGKey(0)}))
  full = apply(x)
  np.testing.assert_array_equal(apply(x, jnp.arange(8)), full)  # the default row ids are the indices
  np.testing.assert_array_equal(apply(x[:2], jnp.asarray([5, 2])), full[[5, 2]])  # x is all ones
  assert (full[0] != full[1]).any() and (apply(x[:1], jnp.asarray([1]))[0] == full[1]).all()


def _attention_reference(q, k, v, bias):
  """softmax(q k^T + bias) v in f32, differentiated by JAX: what `layers._softmax_attention` writes out."""
  return jnp.einsum('bhqk,bhkd->bhqd', jax.nn.softmax(jnp.einsum('bhqd,bhkd->bhqk', q, k) + bias, axis=-1), v)


def test_written_out_attention_backward_equals_autodiff():
  """The bf16 training path's attention (`_softmax_attention`: recomputed p^T, one-pass softmax backward) has
  the forward and the gradients of plain softmax attention: to f32 rounding when run in f32, to bf16 rounding
  in bf16. The bias is not symmetric (a transposed-bias bug shows), and one row is fully masked (padding)."""
  keys = jax.random.split(jax.random.PRNGKey(3), 5)
  q, k, v, w = (jax.random.normal(key, (2, 3, 12, 8)) for key in keys[:4])
  seg = jnp.array([[1] * 7 + [2] * 4 + [0], [1] * 12])
  bias = model_lib.attention_bias(seg, window=6) + jnp.where(
      jax.random.uniform(keys[4], (2, 1, 12, 12)) < 0.2, -1e9, 0.5 * jax.random.normal(keys[4], (2, 1, 12, 12)))
  ref_out, ref_grads = jax.value_and_grad(lambda *a: jnp.sum(_attention_reference(*a, bias) * w),
                                          argnums=(0, 1, 2))(q, k, v)
  for dtype, rtol in ((jnp.float32, 2e-6), (jnp.bfloat16, 2e-2)):
    attend = lambda *a: jnp.sum(model_lib._softmax_attention(*a, bias, jnp.dtype(dtype)) * w)
    out, grads = jax.value_and_grad(attend, argnums=(0, 1, 2))(q, k, v)
    np.testing.assert_allclose(float(out), float(ref_out), rtol=rtol)
    for name, got, want in zip('qkv', grads, ref_grads):
      assert got.dtype == jnp.float32
      scale = float(jnp.abs(want).max())
      assert float(jnp.abs(got - want).max()) <= rtol * scale, (dtype, name)


def test_bf16_attention_takes_the_written_out_path_and_f32_keeps_autodiff(monkeypatch):
  """`attention` in bf16 without active dropout (inference, or `attention_dropout=0` as the quick start trains)
  runs `_softmax_attention` (or the CPU kernel `onednn.attention` where it runs); f32 (where autodiff's backward
  is faster on CPU) and active attention dropout keep the einsums."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class Attend(nn.Module):
    dtype: Any
    deterministic: bool
    rate: float = 0.1

    @nn.compact
    def __call__(self, q, bias):
      return model_lib.attention(q, q, q, bias, dtype=self.dtype, dropout_rate=self.rate,
                                 deterministic=self.deterministic, mode='einsum')

  calls = []
  real, fused = model_lib._softmax_attention, model_lib.onednn.attention  # fused: where the CPU kernel runs
  monkeypatch.setattr(model_lib, '_softmax_attention', lambda *a: calls.append(a[-1]) or real(*a))
  monkeypatch.setattr(model_lib.onednn, 'attention', lambda *a: calls.append(a[0].dtype) or fused(*a))
  q = jnp.ones((1, 2, 4, 8))
  bias = model_lib.attention_bias(jnp.ones((1, 4), jnp.int32))
  for dtype, deterministic, rate in ((jnp.bfloat16, True, 0.1), (jnp.float32, True, 0.1),
                                    (jnp.bfloat16, False, 0.1), (jnp.bfloat16, False, 0.0)):
    out = Attend(dtype, deterministic, rate).apply({}, q, bias, rngs={'dropout': jax.random.PRNGKey(0)})
    assert out.shape == (1, 4, 16) and out.dtype == jnp.float32
  # inference, and training without attention dropout (the fused kernel takes f32 q, k, v: it rounds them)
  assert calls in ([jnp.dtype(jnp.bfloat16)] * 2, [jnp.dtype(jnp.float32)] * 2)


def test_weight_gradients_in_halves_equal_the_plain_contraction():
  """`_row_contracting_einsum` (weight gradients as two contracted halves, the form XLA:CPU runs fast) is the
  plain contraction, for both operand orders of the backward, and falls back for an odd number of rows; and
  `mixed_einsum`'s gradients equal autodiff's in f32."""
  rng = np.random.default_rng(0)
  for rows in (64, 63):
    x, y = (jnp.asarray(rng.standard_normal((rows, n)), jnp.float32) for n in (24, 40))
    for spec in ('mk,mn->kn', 'mh,mv->vh', 'mn,mk->kn'):
      np.testing.assert_allclose(model_lib._row_contracting_einsum(spec, x, y), jnp.einsum(spec, x, y),
                                 rtol=1e-5, atol=1e-5)
  a, b = jnp.asarray(rng.standard_normal((32, 24)), jnp.float32), jnp.asarray(rng.standard_normal((40, 24)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((32, 40)), jnp.float32)
  mixed = jax.grad(lambda a, b: jnp.sum(model_lib.mixed_einsum('mh,vh->mv', a, b, jnp.float32) * w), (0, 1))(a, b)
  plain = jax.grad(lambda a, b: jnp.sum(jnp.einsum('mh,vh->mv', a, b) * w), (0, 1))(a, b)
  for got, want in zip(mixed, plain):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
