"""The oneDNN matmul (`mlm_flax.kernels.onednn`): XLA's dot for every einsum form the model runs, in the bf16
model's forward and backward, and a clear refusal where it cannot run."""

import platform
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


def test_bf16_attention_runs_its_dots_on_onednn(monkeypatch):
  """The bf16 attention's 2 forward and 6 backward dots (it recomputes p^T) go to oneDNN; context and gradients
  are XLA's."""
  if onednn._load() is not None:
    pytest.skip(onednn._load())
  keys = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(key, (2, 3, 16, 8), jnp.float32) for key in keys)
  bias = layers.attention_bias(jnp.array([[1] * 10 + [2] * 6, [1] * 12 + [0] * 4]))
  fn = lambda q, k, v: layers.attention(q, k, v, bias, dtype=jnp.bfloat16, dropout_rate=0.0, deterministic=True)
  (value, grads), calls = _loss_and_grads('onednn', monkeypatch, fn, q, k, v)
  (value_xla, grads_xla), calls_xla = _loss_and_grads('xla', monkeypatch, fn, q, k, v)
  assert (calls, calls_xla) == (8, 0)
  np.testing.assert_allclose(value, value_xla, rtol=1e-5)
  for g, g_xla in zip(grads, grads_xla):
    np.testing.assert_allclose(g, g_xla, rtol=1e-4, atol=1e-5)


def test_f32_models_and_an_explicit_xla_keep_xlas_dots(monkeypatch):
  monkeypatch.setenv('MLM_FLAX_CPU_MATMUL', 'onednn')
  assert not onednn.enabled(jnp.float32)
  monkeypatch.setenv('MLM_FLAX_CPU_MATMUL', 'xla')
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
