"""The oneDNN kernels (`mlm_flax.kernels.onednn`): the matmul is XLA's dot for every einsum form the model runs,
in the bf16 model's forward and backward; the fused attention is the einsum path's; a clear refusal where they
cannot run."""

import functools
import platform
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mlm_flax.kernels import onednn
from mlm_flax.models import layers

pytestmark = pytest.mark.skipif(not (sys.platform.startswith('linux') and platform.machine() == 'x86_64'),
                                reason='the oneDNN kernel is built on x86-64 Linux only')

# Every einsum the bf16 model runs (Dense forward and its two cotangents; the decoder's three; attention's
# forward and backward dots), with distinct sizes, so that a wrong transpose or operand order fails.
SIZES_2D = {'m': 40, 'k': 24, 'n': 56, 'h': 32, 'v': 72}
SIZES_3D = {'n': 3, 'q': 20, 'k': 28, 'd': 16}
SPECS = ['mk,kn->mn', 'mn,kn->mk', 'mk,mn->kn', 'mh,vh->mv', 'mv,vh->mh', 'mh,mv->vh',
         'nqd,nkd->nqk', 'nqk,nkd->nqd', 'nkd,nqd->nkq', 'nkq,nqd->nkd']


def _operands(spec: str, dtype=jnp.bfloat16):
  sizes = SIZES_3D if len(spec.split(',')[0]) == 3 else SIZES_2D
  names = spec.split('->')[0].split(',')
  keys = jax.random.split(jax.random.key(len(spec)), 2)
  return [jax.random.normal(key, tuple(sizes[c] for c in name), jnp.float32).astype(dtype)
          for key, name in zip(keys, names)]


def test_the_kernel_builds_where_its_library_is_installed():
  """With the `onednn-cpu-gomp` wheel and g++ here, the kernel must build: `auto` would otherwise fall back to
  XLA without a word and every test below would skip."""
  if onednn.library_path() is None:
    pytest.skip('onednn-cpu-gomp is not installed')
  assert onednn._load() is None


@pytest.mark.parametrize('spec', SPECS)
def test_onednn_einsum_is_xlas_dot(spec):
  if onednn._load() is not None:
    pytest.skip(onednn._load())
  a, b = _operands(spec)
  want = jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
  got = jax.jit(lambda x, y: onednn.einsum(spec, x, y))(a, b)
  assert got.shape == want.shape and got.dtype == jnp.float32
  # Products of bf16 values are exact in f32; only the order of the f32 sums may differ.
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def _bf16_train_metrics(mode: str, monkeypatch) -> dict:
  """Metrics of 3 bf16 training steps of a small ModernBERT on one batch, with `MLM_FLAX_CPU_MATMUL=mode`."""
  import functools  # pylint: disable=g-import-not-at-top
  from mlm_flax.configs import tiny  # pylint: disable=g-import-not-at-top
  from mlm_flax import parallel, train  # pylint: disable=g-import-not-at-top
  from mlm_flax.models import make_model  # pylint: disable=g-import-not-at-top
  from mlm_flax.objectives import masking  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('MLM_FLAX_CPU_MATMUL', mode)
  c = tiny.get_config()  # the quick start's ModernBERT, narrower
  c.model.update(vocab_size=512, pad_token_id=0, hidden_size=128, intermediate_size=192, num_layers=2,
                 dtype='bfloat16')
  model, mesh, seq = make_model(c.model), parallel.make_mesh(), 128
  tx = train.make_optimizer(c.optimizer, 10)
  mask_fn = functools.partial(masking.mask_tokens, vocab_size=512, mask_id=4, special_ids=(0, 1, 2, 3, 4), pad_id=0,
                              rate=0.4)  # the recipe's rate
  state = jax.jit(functools.partial(train.create_train_state, model=model, tx=tx, seq_len=seq),
                  out_shardings=parallel.replicated(mesh))(jax.random.PRNGKey(0))
  step = train.jit_train_step(model, tx, mask_fn, masking.max_predictions(seq, 0.4), mesh)
  ids = np.random.default_rng(0).integers(5, 512, (16, seq)).astype(np.int32)
  batch = parallel.to_global({'input_ids': ids, 'segment_ids': np.ones_like(ids),
                              'positions': np.broadcast_to(np.arange(seq, dtype=np.int32), ids.shape)}, mesh)
  for _ in range(3):
    state, metrics = step(state, batch)
  return {k: float(v) for k, v in metrics.items()}


def test_bf16_training_steps_on_onednn_are_xlas(monkeypatch):
  """The training step runs independent ops at once on XLA's thread pool (a layer's two cotangent dots), and
  oneDNN's scratchpad (the packed weights) is shared by every matmul: without the handler's turns, the
  gradients mixed (grad norm 3,254 instead of 0.78 at the quick start; a 5-minute run learned nothing)."""
  if onednn._load() is not None:
    pytest.skip(onednn._load())
  ours, xla = _bf16_train_metrics('onednn', monkeypatch), _bf16_train_metrics('xla', monkeypatch)
  assert ours['count'] == xla['count'] > 0
  np.testing.assert_allclose(ours['grad_norm'], xla['grad_norm'], rtol=2e-2)
  np.testing.assert_allclose(ours['loss_sum'], xla['loss_sum'], rtol=1e-2)


def test_specs_that_are_not_a_matmul_are_left_to_xla():
  assert onednn.einsum('mk,nk->kmn', *_operands('mk,nk->mn')) is None  # no contraction
  assert onednn.einsum('mk,kn->nm', *_operands('mk,kn->mn')) is not None  # the transposed product is one
  a, b = _operands('mk,kn->mn')
  assert onednn.einsum('mk,kn->mn', a, b.astype(jnp.float32)) is None  # mixed dtypes


def _loss_and_grads(mode: str, monkeypatch, fn, *args):
  monkeypatch.setenv('MLM_FLAX_CPU_MATMUL', mode)
  loss = lambda *xs: jnp.sum(jnp.sin(fn(*xs)))
  f = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))
  text = f.lower(*args).as_text()
  return f(*args), text.count('mlm_flax_onednn_matmul')


@pytest.mark.parametrize('spec', ['mk,kn->mn', 'mh,vh->mv'])
def test_bf16_layers_run_their_dots_on_onednn_forward_and_backward(spec, monkeypatch):
  """`mixed_einsum` in bf16: its forward and both cotangent dots go to oneDNN (three custom calls), and the
  value and gradients are XLA's within bf16 rounding of the cotangent."""
  if onednn._load() is not None:
    pytest.skip(onednn._load())
  a, b = _operands(spec, jnp.float32)
  fn = lambda x, y: layers.mixed_einsum(spec, x, y, jnp.bfloat16)
  (value, grads), calls = _loss_and_grads('onednn', monkeypatch, fn, a, b)
  (value_xla, grads_xla), calls_xla = _loss_and_grads('xla', monkeypatch, fn, a, b)
  assert (calls, calls_xla) == (3, 0)
  np.testing.assert_allclose(value, value_xla, rtol=1e-5)
  for g, g_xla in zip(grads, grads_xla):
    np.testing.assert_allclose(g, g_xla, rtol=1e-5, atol=1e-5)


def _attention_case(length: int):
  """q, k, v [2, 3, length, 8] and a bias with two documents in one row and padding in the other (query rows whose
  keys are all masked), under a sliding window."""
  keys = jax.random.split(jax.random.key(length), 3)
  q, k, v = (jax.random.normal(key, (2, 3, length, 8), jnp.float32) for key in keys)
  half, pad = length // 2, length // 4
  segments = jnp.array([[1] * half + [2] * (length - half), [1] * (length - pad) + [0] * pad])
  return (q, k, v), layers.attention_bias(segments, window=length // 2)


def _attention_fn(bias):
  return lambda q, k, v: layers.attention(q, k, v, bias, dtype=jnp.bfloat16, dropout_rate=0.0, deterministic=True)


@pytest.mark.parametrize('length', [16, 20])  # 20: rows of 16 lanes and a tail
def test_bf16_attention_runs_as_one_kernel_and_equals_the_dots(length, monkeypatch):
  """Where the CPU has AVX512-BF16, the bf16 attention is one kernel forward and one backward
  (`onednn.attention`), no other dot; context and gradients are the einsum path's on XLA's dots to f32
  rounding (its probabilities and score gradients rounded to bf16 as there; sums in another order). Padded
  queries (every key masked) are in the case: their probabilities are uniform in both."""
  if onednn._load() is not None:
    pytest.skip(onednn._load())
  if not onednn.attention_enabled(jnp.bfloat16, length):
    pytest.skip('the attention kernel needs AVX512-BF16')
  qkv, bias = _attention_case(length)
  fn = _attention_fn(bias)
  (value, grads), calls = _loss_and_grads('onednn', monkeypatch, fn, *qkv)
  text = jax.jit(jax.grad(lambda *x: jnp.sum(fn(*x)), argnums=(0, 1, 2))).lower(*qkv).as_text()
  (value_xla, grads_xla), calls_xla = _loss_and_grads('xla', monkeypatch, fn, *qkv)
  assert (text.count('mlm_flax_onednn_attention_fwd'), text.count('mlm_flax_onednn_attention_bwd')) == (1, 1)
  assert (calls, calls_xla) == (0, 0)
  np.testing.assert_allclose(value, value_xla, rtol=1e-5)
  for g, g_xla in zip(grads, grads_xla):
    np.testing.assert_allclose(g, g_xla, rtol=1e-4, atol=1e-5)



@pytest.mark.parametrize('length', [16, 20])
def test_attention_from_the_fused_projection_is_rope_then_attention(length, monkeypatch):
  """`onednn.qkv_attention` (ModernBERT's QKV projection in, RoPE and the head split inside) is `apply_rope`,
  the heads-major layout and `layers.attention` on XLA's dots, context and the projection's gradient, to f32
  rounding; positions restart in the second document of a row (per-token tables). The projection's gradient comes
  in bf16 (its bf16 matmul rounds it there anyway): within one bf16 rounding of XLA's; and behind a bf16
  projection, the projection weight's gradient is the einsum path's to bf16 rounding."""
  if onednn._load() is not None:
    pytest.skip(onednn._load())
  if not onednn.attention_enabled(jnp.bfloat16, length):
    pytest.skip('the attention kernel needs AVX512-BF16')
  b, heads, d = 2, 3, 8
  qkv = jax.random.normal(jax.random.key(7), (b, length, 3 * heads * d), jnp.float32)
  _, bias = _attention_case(length)
  half = length // 2
  positions = jnp.array([list(range(half)) + list(range(length - half)), list(range(length))])
  cos, sin = layers.rope_tables(positions, d, 10000.0, 64)

  def unfused(qkv):
    q, k, v = (t.reshape(b, length, heads, d).transpose(0, 2, 1, 3) for t in jnp.split(qkv, 3, axis=-1))
    q, k = layers.apply_rope(q, cos, sin), layers.apply_rope(k, cos, sin)
    return layers.attention(q, k, v, bias, dtype=jnp.bfloat16, dropout_rate=0.0, deterministic=True)

  fused = lambda qkv: onednn.qkv_attention(qkv, cos.reshape(b, length, d), sin.reshape(b, length, d),
                                           jnp.broadcast_to(bias, (b, 1, length, length)), heads)
  weights = jax.random.normal(jax.random.key(8), (b, length, heads * d))
  loss = lambda f: jax.jit(jax.value_and_grad(lambda x: jnp.sum(f(x) * weights)))
  monkeypatch.setenv('MLM_FLAX_CPU_MATMUL', 'onednn')
  value, grad = loss(fused)(qkv)
  monkeypatch.setenv('MLM_FLAX_CPU_MATMUL', 'xla')
  value_xla, grad_xla = loss(unfused)(qkv)
  np.testing.assert_allclose(value, value_xla, rtol=1e-5)
  assert np.array_equal(grad, np.asarray(grad).astype(jnp.bfloat16).astype(np.float32))  # bf16 values
  np.testing.assert_allclose(grad, grad_xla, rtol=2 ** -8, atol=1e-5)  # one bf16 rounding of the f32 gradient
  # In the model the kernel's cotangent feeds the projection's bf16 backward: its weight gradient against the
  # einsum path's (x f32 -> bf16 projection -> attention), to bf16 rounding.
  x = jax.random.normal(jax.random.key(9), (b, length, 16), jnp.float32)
  kernel = jax.random.normal(jax.random.key(10), (16, 3 * heads * d), jnp.float32) * 0.3
  project = lambda f: jax.jit(jax.grad(lambda w: jnp.sum(f(layers.mixed_einsum('blk,kn->bln', x, w, jnp.bfloat16))
                                                         * weights)))
  monkeypatch.setenv('MLM_FLAX_CPU_MATMUL', 'onednn')
  dw = project(fused)(kernel)
  monkeypatch.setenv('MLM_FLAX_CPU_MATMUL', 'xla')
  dw_xla = project(unfused)(kernel)
  np.testing.assert_allclose(dw, dw_xla, rtol=2e-2, atol=2e-3)

def test_bf16_attention_without_avx512_bf16_runs_its_dots_on_onednn(monkeypatch):
  """On a CPU with AMX-BF16 but not AVX512-BF16 (the kernel's softmax is AVX-512 code), the bf16 attention's 2
  forward and 6 backward dots (it recomputes p^T) go to oneDNN; context and gradients are XLA's."""
  if onednn._load() is not None:
    pytest.skip(onednn._load())
  monkeypatch.setattr(onednn, 'cpu_flags', lambda: frozenset({'amx_bf16', 'avx512f'}))
  assert not onednn.attention_enabled(jnp.bfloat16, 16)
  qkv, bias = _attention_case(16)
  fn = _attention_fn(bias)
  (value, grads), calls = _loss_and_grads('onednn', monkeypatch, fn, *qkv)
  (value_xla, grads_xla), calls_xla = _loss_and_grads('xla', monkeypatch, fn, *qkv)
  assert (calls, calls_xla) == (8, 0)
  np.testing.assert_allclose(value, value_xla, rtol=1e-5)
  for g, g_xla in zip(grads, grads_xla):
    np.testing.assert_allclose(g, g_xla, rtol=1e-4, atol=1e-5)


def test_attention_longer_than_the_kernels_buffers_keeps_the_dots():
  assert not onednn.attention_enabled(jnp.bfloat16, onednn.MAX_ATTENTION_LEN + 1)


def test_f32_models_several_devices_and_an_explicit_xla_keep_xlas_dots(monkeypatch):
  monkeypatch.setenv('MLM_FLAX_CPU_MATMUL', 'onednn')
  assert not onednn.enabled(jnp.float32)
  monkeypatch.setenv('MLM_FLAX_CPU_MATMUL', 'xla')
  assert not onednn.enabled(jnp.bfloat16)
  monkeypatch.setenv('MLM_FLAX_CPU_MATMUL', 'auto')
  monkeypatch.setattr(onednn, 'cpu_has_fast_bf16', lambda: True)
  monkeypatch.setattr(onednn.jax, 'device_count', lambda: 2)
  assert not onednn.attention_enabled(jnp.bfloat16, 16)  # a custom call has no partitioning rule
  assert not onednn.enabled(jnp.bfloat16)
  monkeypatch.setattr(onednn, 'cpu_has_fast_bf16', lambda: False)  # bf16 emulated: no oneDNN kernel for it
  monkeypatch.setattr(onednn.jax, 'device_count', lambda: 1)
  assert not onednn.enabled(jnp.bfloat16)


def test_a_bad_setting_or_a_missing_library_is_one_clear_error(monkeypatch):
  monkeypatch.setenv('MLM_FLAX_CPU_MATMUL', 'mkl')
  with pytest.raises(ValueError, match="MLM_FLAX_CPU_MATMUL='mkl'; use one of"):
    onednn.enabled(jnp.bfloat16)
  monkeypatch.setenv('MLM_FLAX_ONEDNN_LIB', '/nonexistent/libdnnl.so.3')
  assert onednn.library_path() is None
  monkeypatch.setenv('MLM_FLAX_CPU_MATMUL', 'onednn')
  monkeypatch.setattr(onednn, '_load', lambda: onednn.unavailable_reason(None))
  with pytest.raises(RuntimeError, match=r"MLM_FLAX_CPU_MATMUL=onednn, but no libdnnl\.so\.3 \(pip install"):
    onednn.enabled(jnp.bfloat16)
  monkeypatch.setenv('MLM_FLAX_CPU_MATMUL', 'auto')  # auto falls back to XLA's dots
  assert not onednn.enabled(jnp.bfloat16)


@pytest.mark.parametrize('center', [True, False])  # LayerNorm, RMSNorm
def test_norm_kernel_is_the_norms_formula(center, monkeypatch):
  """Where it runs (a bf16 model on one AVX-512 CPU device), the norm is one kernel each way, and its output
  and the gradients of x, scale and bias are `layers._norm`'s to f32 rounding; rows of 40 features (16 lanes
  and a tail)."""
  monkeypatch.setenv('MLM_FLAX_CPU_MATMUL', 'onednn')
  if onednn._load() is not None:
    pytest.skip(onednn._load())
  x = jax.random.normal(jax.random.key(0), (3, 70, 40), jnp.float32) * 3 + 1
  if not onednn.norm_enabled(jnp.bfloat16, x):
    pytest.skip('the norm kernel needs AVX-512')
  module = layers.norm('layernorm' if center else 'rmsnorm', 1e-5, True, jnp.float32, dtype=jnp.bfloat16)
  params = module.init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
  g = jax.random.normal(jax.random.key(3), x.shape)
  loss = lambda p, x: jnp.sum(module.apply(p, x) * g)
  text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).as_text()
  assert (text.count('mlm_flax_cpu_norm_fwd'), text.count('mlm_flax_cpu_norm_bwd')) == (1, 1)
  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
  monkeypatch.setenv('MLM_FLAX_CPU_MATMUL', 'xla')
  value_xla, grads_xla = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
  np.testing.assert_allclose(value, value_xla, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_xla)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('center', [True, False])
def test_residual_add_in_the_norm_kernel_is_the_add_then_the_norm_bit_for_bit(center, monkeypatch):
  """`Norm(x, delta)`, a pre-LN layer's residual add and its norm as one kernel each way (`onednn.add_norm`), has
  the bits of `x + delta` then the norm kernel: the sum, the norm, and the gradients of x, delta, scale and bias
  (the backward adds the sum's cotangent from the residual stream to the norm's, as XLA's add did)."""
  monkeypatch.setenv('MLM_FLAX_CPU_MATMUL', 'onednn')
  if onednn._load() is not None:
    pytest.skip(onednn._load())
  x = jax.random.normal(jax.random.key(0), (3, 70, 40), jnp.float32) * 3 + 1
  delta = jax.random.normal(jax.random.key(4), x.shape, jnp.float32)
  if not onednn.norm_enabled(jnp.bfloat16, x):
    pytest.skip('the norm kernel needs AVX-512')
  module = layers.norm('layernorm' if center else 'rmsnorm', 1e-5, True, jnp.float32, dtype=jnp.bfloat16)
  params = module.init(jax.random.key(1), x)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
  gs, gy = (jax.random.normal(jax.random.key(k), x.shape) for k in (3, 5))
  loss = lambda s, y: jnp.sum(s * gs) + jnp.sum(y * gy)
  fused = lambda p, x, d: loss(*module.apply(p, x, d))
  apart = lambda p, x, d: loss(x + d, module.apply(p, x + d))
  args = (params, x, delta)
  text = jax.jit(jax.grad(fused, argnums=(0, 1, 2))).lower(*args).as_text()
  assert (text.count('mlm_flax_cpu_add_norm_fwd'), text.count('mlm_flax_cpu_add_norm_bwd')) == (1, 1)
  values = [jax.jit(lambda *a, f=f: module.apply(a[0], a[1] + a[2]) if f is apart else module.apply(*a))(*args)
            for f in (fused, apart)]
  np.testing.assert_array_equal(values[0][1], values[1])
  np.testing.assert_array_equal(values[0][0], x + delta)
  got, want = (jax.jit(jax.grad(f, argnums=(0, 1, 2)))(*args) for f in (fused, apart))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)


def test_norm_kernel_only_for_f32_rows_of_a_bf16_model(monkeypatch):
  monkeypatch.setenv('MLM_FLAX_CPU_MATMUL', 'onednn')
  if onednn._load() is not None:
    pytest.skip(onednn._load())
  assert not onednn.norm_enabled(jnp.float32, jnp.zeros((2, 8)))  # f32 models keep XLA's norm
  assert not onednn.norm_enabled(jnp.bfloat16, jnp.zeros((2, 8), jnp.bfloat16))
  monkeypatch.setattr(onednn, 'cpu_flags', lambda: frozenset({'avx2', 'amx_bf16'}))
  assert not onednn.norm_enabled(jnp.bfloat16, jnp.zeros((2, 8)))


def _mlp_module(kind: str = 'geglu', use_bias: bool = False, dropout: float = 0.0):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class Mlp(nn.Module):
    @nn.compact
    def __call__(self, x, deterministic=True):
      dense = functools.partial(layers.Dense, dtype=jnp.bfloat16, init_std=0.05)  # as the models pass it
      return layers.mlp(x, kind, 'gelu', 40, dense, use_bias=use_bias, dropout_rate=dropout,
                        deterministic=deterministic, dropout_on='hidden', out_std=0.03)
  return Mlp()


def test_glu_activation_is_one_kernel_each_way_and_the_mlps_formula(monkeypatch):
  """Where it runs (a bf16 model on one AVX512-BF16 CPU device), the activation of ModernBERT's bias-free GeGLU
  MLP is one kernel each way, and no f32 concatenation or convert of [tokens, 2 * intermediate] is left between
  it and the projections; value and gradients of x and both kernels are the XLA path's to bf16 rounding; rows
  of 40 features (16 lanes and a tail)."""
  monkeypatch.setenv('MLM_FLAX_CPU_MATMUL', 'onednn')
  if onednn._load() is not None:
    pytest.skip(onednn._load())
  if not onednn.glu_enabled(jnp.bfloat16):
    pytest.skip('the GLU kernel needs AVX512-BF16')
  module, x = _mlp_module(), jax.random.normal(jax.random.key(0), (2, 70, 24)) * 2
  params = module.init(jax.random.key(1), x)
  g = jax.random.normal(jax.random.key(3), x.shape)
  loss = lambda p, x: jnp.sum(module.apply(p, x) * g)
  text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).as_text()
  assert (text.count('mlm_flax_cpu_gelu_glu_fwd'), text.count('mlm_flax_cpu_gelu_glu_bwd')) == (1, 1)
  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile().as_text()
  # [140, 80] (tokens, 2 * intermediate) values come from custom calls only: no concatenation, no convert
  assert not [l for l in compiled.splitlines() if re.search(r'= \w+\[140,80\]', l) and 'custom-call(' not in l]
  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
  monkeypatch.setenv('MLM_FLAX_CPU_MATMUL', 'xla')
  params_xla = module.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, params_xla) == jax.tree.map(jnp.shape, params)
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, params_xla)))
  value_xla, grads_xla = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
  np.testing.assert_allclose(value, value_xla, rtol=1e-2)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_xla)):
    np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * float(jnp.max(jnp.abs(want))))


def test_glu_kernel_is_gelu_times_gate_rounded_to_bf16(monkeypatch):
  """The activation kernel each way against `jax.nn.gelu(approximate=False) * gate` and its autodiff rounded to
  bf16, over [-12, 12] (the far tail, where 1 + erf cancels, included) and random rows: the same bf16 value, or
  the neighbour where f32 sums land by a rounding boundary."""
  monkeypatch.setenv('MLM_FLAX_CPU_MATMUL', 'onednn')
  if onednn._load() is not None:
    pytest.skip(onednn._load())
  if not onednn.glu_enabled(jnp.bfloat16):
    pytest.skip('the GLU kernel needs AVX512-BF16')
  a = jnp.concatenate([jnp.linspace(-12, 12, 8000).reshape(-1, 40),
                       jax.random.normal(jax.random.key(0), (500, 40)) * 3])
  b, dy = (jax.random.normal(jax.random.key(i), a.shape) for i in (1, 2))
  h = jnp.concatenate([a, b], axis=1)
  y = jax.ffi.ffi_call(onednn._GLU_TARGETS[0], jax.ShapeDtypeStruct(a.shape, jnp.bfloat16))(h)
  dh = jax.ffi.ffi_call(onednn._GLU_TARGETS[1], jax.ShapeDtypeStruct(h.shape, jnp.bfloat16))(h, dy)
  ref = lambda a, b: jax.nn.gelu(a, approximate=False) * b
  want_y, vjp = jax.vjp(ref, a, b)
  for got, want in ((y, want_y), (dh, jnp.concatenate(vjp(dy), axis=1))):
    got, want = np.asarray(got, np.float32), np.asarray(want)
    rounded = np.asarray(jnp.asarray(want).astype(jnp.bfloat16), np.float32)
    assert np.mean(got == rounded) > 0.999
    np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=1e-30)


@pytest.mark.parametrize('case', [dict(kind='swiglu'), dict(use_bias=True), dict(dropout=0.1)])
def test_other_mlps_keep_xlas_ops(case, monkeypatch):
  """SwiGLU, an MLP with biases, and hidden dropout while training keep the XLA path (the kernel is GeGLU's,
  bias-free, without dropout)."""
  monkeypatch.setenv('MLM_FLAX_CPU_MATMUL', 'onednn')
  if onednn._load() is not None:
    pytest.skip(onednn._load())
  module, x = _mlp_module(**case), jnp.ones((2, 8, 24))
  params = module.init(jax.random.key(1), x)
  apply = lambda p, x: module.apply(p, x, deterministic=False, rngs={'dropout': jax.random.key(2)})
  assert 'gelu_glu' not in jax.jit(apply).lower(params, x).as_text()


def test_loss_kernel_is_the_loss_and_the_metric(monkeypatch):
  """Where it runs (`cross_entropy_enabled`: a bf16 model on one AVX512-BF16 CPU device), the MLM loss and the
  accuracy metric are one kernel each way (`onednn.cross_entropy_argmax`): the argmax index is `jnp.argmax`'s
  exactly (ties, NaNs, signed zeros, infinities), the loss and its gradient are `mlm.cross_entropy`'s to f32
  rounding, NaN where it is NaN; vocabularies of 300 (16 lanes and a tail)."""
  from mlm_flax.objectives import mlm  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('MLM_FLAX_CPU_MATMUL', 'onednn')
  if onednn._load() is not None:
    pytest.skip(onednn._load())
  if not onednn.cross_entropy_enabled(jnp.bfloat16):
    pytest.skip('the loss kernel runs where the GLU kernel does (AVX512-BF16)')
  x = np.random.default_rng(0).normal(size=(6, 5, 300)).astype(np.float32) * 3
  x[0, 0, [7, 40, 299]] = 9.0  # a tie: the first
  x[0, 1, [3, 8]] = np.nan  # NaNs: the first NaN
  x[0, 2] = 0.0
  x[0, 2, 5] = -0.0  # signed zeros compare equal: the first
  x[0, 3] = -np.inf
  x[0, 4, 299] = np.inf
  x[1] = np.round(x[1] * 2) / 2  # many ties
  targets = np.random.default_rng(1).integers(0, 300, (6, 5)).astype(np.int32)
  targets[2, 0] = 299  # the last lane of the tail
  ce, best = jax.jit(onednn.cross_entropy_argmax)(x, targets)
  np.testing.assert_array_equal(best, jnp.argmax(x, axis=-1))
  want = mlm.cross_entropy(jnp.asarray(x), targets)
  np.testing.assert_array_equal(np.isnan(ce), np.isnan(want))
  np.testing.assert_allclose(ce, want, rtol=2e-6, atol=2e-6)
  finite = np.where(np.isfinite(x).all(-1, keepdims=True), x, 0.0)  # gradients of rows with a finite loss
  w = np.random.default_rng(2).uniform(size=targets.shape).astype(np.float32)
  grad = lambda f: jax.jit(jax.grad(lambda z: jnp.sum(f(z, targets) * w)))(finite)
  got, want = grad(lambda z, t: onednn.cross_entropy_argmax(z, t)[0]), grad(mlm.cross_entropy)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  sums = {fused: mlm.prediction_sums(jnp.asarray(finite), targets, w, fused=fused) for fused in (True, False)}
  assert float(sums[True]['correct']) == float(sums[False]['correct'])
  text = jax.jit(lambda z: mlm.prediction_sums(z, targets, w, fused=True)['loss_sum']).lower(finite).as_text()
  assert 'mlm_flax_cpu_xent_fwd' in text and 'reduce' in text  # one kernel; the weighted sums stay XLA's
