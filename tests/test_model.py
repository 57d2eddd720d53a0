"""Model: packing semantics, padding, masked-position head, mixed precision."""

import jax
import jax.numpy as jnp
import numpy as np

from conftest import tiny_config
from mlm_flax import model as model_lib


def _model(dtype='float32', **kw):
  c = tiny_config().model
  c.update(dict(vocab_size=97, pad_token_id=0, dtype=dtype, **kw))
  m = model_lib.make_model(c)
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


def test_auto_dtype_resolves():
  assert model_lib.resolve_dtype('float32') == jnp.float32
  assert model_lib.resolve_dtype('auto') in (jnp.float32, jnp.bfloat16)


def test_pre_ln_variant_has_a_final_norm_and_differs():
  m_post, p_post = _model()
  m_pre, p_pre = _model(norm_position='pre')
  assert 'final_norm' in p_pre and 'final_norm' not in p_post
  ids = jnp.array([[2, 5, 6, 7, 3]])
  shared = jax.tree.map(lambda x: 10 * x, p_post)  # the same (large) weights in both layouts
  a = m_post.apply({'params': shared}, ids, jnp.ones_like(ids))
  b = m_pre.apply({'params': {**shared, 'final_norm': p_pre['final_norm']}}, ids, jnp.ones_like(ids))
  assert a.shape == b.shape and bool(jnp.isfinite(b).all()) and float(jnp.abs(a - b).max()) > 1e-2


def test_remat_fused_attention_and_vocab_padding_compute_the_same_function():
  """`model.remat`, `model.attention='dot_product_attention'` and `model.vocab_multiple` change how, not
  what, is computed: same logits (real vocabulary only), same params, same gradients."""
  import pytest  # pylint: disable=g-import-not-at-top
  make_model = model_lib.make_model
  c = tiny_config()
  c.model.vocab_size, c.model.pad_token_id = 100, 0
  c.model.hidden_dropout = c.model.attention_dropout = 0.0
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(1, 100, (2, 16)), jnp.int32)
  seg = jnp.asarray([[1] * 10 + [2] * 4 + [0] * 2, [1] * 16], jnp.int32)
  base = make_model(c.model)
  params = base.init(jax.random.PRNGKey(0), ids, seg)['params']

  def loss_and_grad(model):
    f = lambda p: (model.apply({'params': p}, ids, seg) * (seg > 0)[..., None]).astype(jnp.float32).sum()
    return jax.value_and_grad(f)(params)

  assert c.model.vocab_multiple == 128 and params['word_embeddings']['embedding'].shape == (100, c.model.hidden_size)
  assert base.apply({'params': params}, ids, seg).shape == (2, 16, 100)  # the padded 28 are sliced off
  ref_loss, ref_grad = loss_and_grad(base)
  for key, value in (('remat', True), ('attention', 'dot_product_attention'), ('vocab_multiple', 1)):
    c2 = tiny_config()
    c2.model.update(vocab_size=100, pad_token_id=0, hidden_dropout=0.0, attention_dropout=0.0, **{key: value})
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
