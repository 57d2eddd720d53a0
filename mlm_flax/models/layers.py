"""Layers shared by the architectures: mixed-precision einsum/Dense, dropout, attention, RoPE, the MLPs and norms
that `model.mlp` / `model.norm` name, the MLM decoder.

Params are kept in `param_dtype` (f32); with `dtype=bfloat16` every matmul takes bf16 inputs and accumulates in
f32 (`preferred_element_type`), forward *and* backward (`mixed_einsum`), which is what makes AMX CPUs, GPUs and
TPUs fast. Norms, softmax and the residual stream stay f32. On one CPU device those bf16 dots run on oneDNN's
kernels (`mlm_flax/kernels/onednn.py`, `MLM_FLAX_CPU_MATMUL`), the same sums as XLA's.

Packed rows carry `segment_ids` (1, 2, ... per document, 0 for padding): `attention_bias` keeps attention inside
a document (and, optionally, within a sliding window); `positions` restart per document.
"""

import functools
import logging
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mlm_flax.kernels import onednn

Dtype = Any


def _dot(spec: str, x: jax.Array, y: jax.Array) -> jax.Array:
  """`einsum(spec, x, y)` with f32 accumulation: oneDNN's matmul where `onednn.enabled` (bf16 on one CPU device
  with the library; 2.4x XLA:CPU's kernels), else XLA's dot."""
  if onednn.enabled(x.dtype):
    out = onednn.einsum(spec, x, y)
    if out is not None:
      return out
  return jnp.einsum(spec, x, y, preferred_element_type=jnp.float32)


def _transpose_specs(spec: str) -> tuple[str, str]:
  inputs, out = spec.split('->')
  a, b = inputs.split(',')
  for i in set(a + b + out) - {'.'}:
    if (i in a) + (i in b) + (i in out) < 2:
      raise ValueError(f'mixed_einsum needs every index in at least two operands: {spec}')
  return f'{out},{b}->{a}', f'{a},{out}->{b}'


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bf16_einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
  return _bf16_einsum_fwd(spec, a, b)[0]


def _bf16_einsum_fwd(spec, a, b):
  a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  out = _dot(spec, a16, b16)
  # Zero-size carriers remember the primal dtypes for the cotangents.
  return out, (a16, b16, jnp.zeros((0,), a.dtype), jnp.zeros((0,), b.dtype))


def _row_contracting_einsum(spec: str, x: jax.Array, y: jax.Array) -> jax.Array:
  """`einsum(spec, x, y)` with f32 accumulation; when `spec` contracts the first axis of two 2-D operands
  ('mk,mn->kn': a weight's gradient), in the form XLA:CPU runs fast. It runs that form as a generic dot, in f32
  after converting bf16 operands: 3-5x slower than a bf16 matmul. With the rows split in two halves that are
  contracted too, XLA transposes the left operand and runs a bf16 library dot. The same sum, in another order.
  oneDNN (`_dot`) reads a transposed operand in place: the plain form."""
  if onednn.enabled(x.dtype):
    return _dot(spec, x, y)
  inputs, out = spec.split('->')
  a, b = inputs.split(',')
  rows = x.shape[0]
  if x.ndim != 2 or y.ndim != 2 or a[0] != b[0] or a[0] in out or rows % 2:
    return jnp.einsum(spec, x, y, preferred_element_type=jnp.float32)
  m, i, j = a[0], a[1], b[1]
  halves, s = lambda t: t.reshape(2, rows // 2, t.shape[1]), next(c for c in 'hsabc' if c not in spec)
  # Transpose x only once y (the cotangent) exists: XLA would hoist the transpose of a forward activation into the
  # forward pass and keep both copies alive until the backward (+4 GB at BERT-base, 32 x 128).
  x, y = jax.lax.optimization_barrier((x, y))
  product = jnp.einsum(f'{s}{i}{m},{s}{m}{j}->{i}{j}', halves(x).transpose(0, 2, 1), halves(y),
                       preferred_element_type=jnp.float32)
  # In the other order ('mh,mv->vh': the tied decoder's gradient) XLA would transpose the (large) right operand,
  # or, with a plain transpose after the dot, fold it back into a dot it cannot run; the barrier keeps this order.
  return product if out == i + j else jax.lax.optimization_barrier(product).T


def _bf16_einsum_bwd(spec, res, g):
  a16, b16, a_dtype, b_dtype = res
  spec_a, spec_b = _transpose_specs(spec)
  g16 = g.astype(jnp.bfloat16)  # bf16 cotangent, f32 accumulation: the fast path backward too
  da = _row_contracting_einsum(spec_a, g16, b16)
  db = _row_contracting_einsum(spec_b, a16, g16)
  return da.astype(a_dtype.dtype), db.astype(b_dtype.dtype)


_bf16_einsum.defvjp(_bf16_einsum_fwd, _bf16_einsum_bwd)


def mixed_einsum(spec: str, a: jax.Array, b: jax.Array, dtype: Dtype) -> jax.Array:
  """einsum in `dtype` with f32 accumulation and f32 output. In bf16 its backward keeps bf16 (cotangents in bf16:
  the fast path backward too) and computes 2-D weight gradients in the form XLA:CPU runs fast; f32 keeps autodiff
  (the same backward in f32 measured 0.88x on CPU)."""
  if jnp.dtype(dtype) == jnp.bfloat16:  # batched (attention) dots too: ~8% faster (jax 0.10)
    return _bf16_einsum(spec, a, b)
  return jnp.einsum(spec, a.astype(dtype), b.astype(dtype), preferred_element_type=jnp.float32)


class Dense(nn.Module):
  """`y = x @ kernel + bias` through `mixed_einsum` (`use_bias=False`: no bias param)."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = 0.02
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', nn.initializers.normal(self.init_std),
                        (x.shape[-1], self.features), self.param_dtype)
    # A 2-D dot: XLA:CPU differentiates '...k,kn->...n' on 3-D inputs ~1.8x slower.
    y = mixed_einsum('mk,kn->mn', x.reshape(-1, x.shape[-1]), kernel, self.dtype)
    y = y.reshape(*x.shape[:-1], self.features)
    if not self.use_bias:
      return y
    return y + self.param('bias', nn.initializers.zeros, (self.features,), self.param_dtype)


class Dropout(nn.Module):
  """Inverted dropout from 16 random bits per element, two elements per 32-bit draw, drawn per row.

  `nn.Dropout` draws 32 bits per element; random bits are most of dropout's cost (XLA:CPU's threefry makes
  ~50-70 M words/s, and attention-probability dropout needs batch*heads*len^2 per layer), so this halves it.
  The keep probability is exact to 2^-16. Row `i` of `x` draws from `fold_in(key, row_ids[i])` (default:
  its index), so a row's mask does not depend on which micro-batch or device holds it: give the rows'
  indices in the global batch and gradient accumulation gets the full batch's dropout (same threefry work).
  """
  rate: float

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool, row_ids: jax.Array | None = None) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    key, last = self.make_rng('dropout'), x.shape[-1]
    row_ids = jnp.arange(x.shape[0]) if row_ids is None else row_ids
    shape = (*x.shape[1:-1], (last + 1) // 2)
    bits = jax.vmap(lambda r: jax.random.bits(jax.random.fold_in(key, r), shape, jnp.uint32))(row_ids)
    halves = jnp.concatenate([bits & 0xFFFF, bits >> 16], axis=-1)[..., :last]
    keep = halves >= jnp.uint32(round(self.rate * 65536))
    return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros_like(x)).astype(x.dtype)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  """The activation `model.hidden_act` names."""
  return {'gelu': functools.partial(jax.nn.gelu, approximate=False),
          'gelu_new': functools.partial(jax.nn.gelu, approximate=True),
          'gelu_pytorch_tanh': functools.partial(jax.nn.gelu, approximate=True),
          'relu': jax.nn.relu, 'silu': jax.nn.silu}[name]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _norm(epsilon: float, center: bool, x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
  return _norm_fwd(epsilon, center, x, scale, bias)[0]


def _norm_stats(epsilon, center, x):
  """x in f32, its mean (0 without centring) and 1 / sqrt(var + eps), from one pass over x and x^2."""
  x32 = x.astype(jnp.float32)
  mean2 = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
  if not center:
    return x32, jnp.zeros_like(mean2), jax.lax.rsqrt(mean2 + epsilon)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  return x32, mean, jax.lax.rsqrt(jnp.maximum(mean2 - jnp.square(mean), 0.0) + epsilon)


def _norm_fwd(epsilon, center, x, scale, bias):
  x32, mean, rstd = _norm_stats(epsilon, center, x)
  y = (x32 - mean) * rstd * scale + bias
  return y.astype(jnp.result_type(x, scale)), (x, mean, rstd, scale, bias)


def _norm_bwd(epsilon, center, res, g):
  """The closed-form backward: two row reductions (one without centring) instead of autodiff's chain."""
  del epsilon
  x, mean, rstd, scale, bias = res
  g = g.astype(jnp.float32)
  xhat = (x.astype(jnp.float32) - mean) * rstd
  gy = g * scale
  dx = gy - xhat * jnp.mean(gy * xhat, axis=-1, keepdims=True)
  if center:
    dx = dx - jnp.mean(gy, axis=-1, keepdims=True)
  rows = tuple(range(x.ndim - 1))
  return ((dx * rstd).astype(x.dtype), jnp.sum(g * xhat, axis=rows).astype(scale.dtype),
          jnp.sum(g, axis=rows).astype(bias.dtype))


_norm.defvjp(_norm_fwd, _norm_bwd)


class Norm(nn.Module):
  """LayerNorm (`center`: subtract the mean; `bias` param when `use_bias`) or RMSNorm over the last axis, with
  flax's param names and statistics (f32, one pass: var = E[x^2] - E[x]^2) and a closed-form backward: on
  XLA:CPU, autodiff of `nn.LayerNorm` makes several passes per norm, forward and backward."""
  epsilon: float
  center: bool
  use_bias: bool
  param_dtype: Dtype = jnp.float32
  dtype: Dtype = jnp.float32  # the model's compute dtype: bf16 on one CPU device runs the CPU kernel

  @nn.compact
  def __call__(self, x: jax.Array, delta: jax.Array | None = None) -> jax.Array | tuple[jax.Array, jax.Array]:
    """norm(x); with `delta` (a pre-LN layer's residual add before its norm), (x + delta, norm(x + delta))."""
    features = (x.shape[-1],)
    scale = self.param('scale', nn.initializers.ones, features, self.param_dtype)
    bias = (self.param('bias', nn.initializers.zeros, features, self.param_dtype) if self.use_bias
            else jnp.zeros(features, self.param_dtype))
    # Each row in one pass where the CPU kernel runs (`kernels/cpu_norm.cc`).
    apply = lambda v: (onednn.norm if onednn.norm_enabled(self.dtype, v) else _norm)(self.epsilon, self.center, v,
                                                                                      scale, bias)
    if delta is None:
      return apply(x)
    if onednn.norm_enabled(self.dtype, x) and delta.shape == x.shape:  # the add in the norm's pass, each way
      return onednn.add_norm(self.epsilon, self.center, x, delta, scale, bias)
    s = x + delta
    return s, apply(s)


def norm(kind: str, epsilon: float, use_bias: bool, param_dtype: Dtype, name: str | None = None,
         dtype: Dtype = jnp.float32) -> nn.Module:
  """The normalisation `model.norm` names (statistics in f32): 'layernorm' (`scale`, and a `bias` shift when
  `use_bias`), or 'rmsnorm' (x / sqrt(mean(x^2) + eps) * `scale`: no centring, no shift; Zhang & Sennrich 2019).
  `dtype`: the model's compute dtype (where the CPU kernel runs)."""
  if kind == 'layernorm':
    return Norm(epsilon=epsilon, center=True, use_bias=use_bias, param_dtype=param_dtype, dtype=dtype, name=name)
  if kind == 'rmsnorm':
    return Norm(epsilon=epsilon, center=False, use_bias=False, param_dtype=param_dtype, dtype=dtype, name=name)
  raise ValueError(f"model.norm={kind!r}; use 'layernorm' or 'rmsnorm'.")


def mlp(x: jax.Array, kind: str, act: str, intermediate_size: int, dense: Callable[..., nn.Module], *,
        use_bias: bool, dropout_rate: float, deterministic: bool, dropout_on: str = 'output',
        out_std: float | None = None, row_ids: jax.Array | None = None) -> jax.Array:
  """The feed-forward block `model.mlp` names, on `x` [..., hidden]: 'gelu' is dense → `act` → dense; the gated
  'geglu' (`act`) and 'swiglu' (silu) are act(x W_in) * (x W_gate) → dense (Shazeer 2020), their `intermediate`
  making 2 * intermediate_size features split into (input, gate), as ModernBERT's `Wi`.

  Call it from a module's compact method: `dense` (a `Dense` partial) makes the caller's `intermediate` and
  `output` submodules (with `use_bias`; `output`'s init std `out_std` when given), so BERT and ModernBERT keep
  their param names. Dropout where the architecture has it: on the output (`dropout_on='output'`, BERT) or on
  the hidden features (`'hidden'`, ModernBERT).
  """
  if kind == 'gelu':
    y = activation(act)(dense(intermediate_size, use_bias=use_bias, name='intermediate')(x))
  elif kind in ('geglu', 'swiglu'):
    proj = dense(2 * intermediate_size, use_bias=use_bias, name='intermediate')
    h = proj(x)
    if (kind == 'geglu' and act == 'gelu' and not use_bias and isinstance(proj, Dense)
        and not (dropout_on == 'hidden' and dropout_rate > 0.0 and not deterministic)
        and onednn.glu_enabled(proj.dtype)):
      # Both neighbours are bf16 projections that round what they read: one kernel each way, writing bf16.
      y = onednn.gelu_glu(h.reshape(-1, h.shape[-1])).reshape(*h.shape[:-1], intermediate_size)
    else:
      inputs, gate = jnp.split(h, 2, axis=-1)
      y = activation(act if kind == 'geglu' else 'silu')(inputs) * gate
  else:
    raise ValueError(f"model.mlp={kind!r}; use 'gelu', 'geglu' or 'swiglu'.")
  output = dense(x.shape[-1], use_bias=use_bias, name='output', **({} if out_std is None else {'init_std': out_std}))
  if dropout_on == 'hidden':
    return output(Dropout(dropout_rate)(y, deterministic=deterministic, row_ids=row_ids))
  return Dropout(dropout_rate)(output(y), deterministic=deterministic, row_ids=row_ids)


def use_dot_product_attention(mode: str, dropout: float, deterministic: bool) -> bool:
  """'auto': `jax.nn.dot_product_attention` on GPU/TPU; on CPU the heads-major einsums, ~3x faster there.

  The fused kernel has no attention-probability dropout, so training with `attention_dropout` > 0
  keeps the einsum path (inference never needs it).
  """
  if mode not in ('auto', 'einsum', 'dot_product_attention'):
    raise ValueError(f"model.attention={mode!r}; use 'auto', 'einsum' or 'dot_product_attention'.")
  if mode == 'einsum' or (dropout > 0 and not deterministic):
    return False
  return mode == 'dot_product_attention' or jax.default_backend() != 'cpu'


def attention_implementation(backend: str, dtype: Dtype, dropout_active: bool) -> str | None:
  """The `implementation` to ask `jax.nn.dot_product_attention` for: 'cudnn' (flash attention) on an NVIDIA
  GPU with bf16/fp16 compute and no attention dropout, which is what cuDNN's fused kernel supports; None
  (XLA's attention) elsewhere (CPU, TPU, ROCm, f32 compute)."""
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return 'cudnn' if backend in ('gpu', 'cuda') and half and not dropout_active else None


def _dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, dtype: Dtype,
                           dropout_active: bool) -> jax.Array:
  """`jax.nn.dot_product_attention` with cuDNN where `attention_implementation` picks it; XLA's attention
  when cuDNN refuses these inputs at trace time (head size, cuDNN version, no cuDNN, ...)."""
  implementation = attention_implementation(jax.default_backend(), dtype, dropout_active)
  if implementation is not None:
    try:
      return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
    except (RuntimeError, ValueError, NotImplementedError) as e:
      logging.info('cuDNN attention unavailable here (%s); using XLA attention.', e)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=None)


def attention_bias(segment_ids: jax.Array, window: int | None = None) -> jax.Array:
  """Additive attention bias [batch, 1, len, len]: 0 where query and key are in the same document (segment id
  > 0) and, with `window`, at most `window // 2` positions apart (documents are contiguous: row distance);
  the lowest f32 elsewhere."""
  mask = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)
  if window is not None:
    length = segment_ids.shape[-1]
    distance = jnp.abs(jnp.arange(length)[:, None] - jnp.arange(length)[None, :])
    mask = mask & (distance <= window // 2)
  return jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, dtype: Dtype) -> jax.Array:
  """softmax(q k^T + bias) v over heads-major [batch, heads, len, head_dim], dots in `dtype` with f32
  accumulation, softmax in f32: the context in f32. `attention` uses it in bf16 when no dropout is active.

  Its backward is written out for XLA:CPU, which runs a bf16 batched dot as a bf16 library call only when it is
  3-D and its left operand contracts its last axis; autodiff's dv = p^T g and dk = ds^T q are not, and run as
  generic f32 dots ~4x slower (XLA folds an explicit transpose back into them). So the backward computes the
  transposed products it needs, p^T = exp(k q^T + bias^T - max) / sum and dp^T = v g^T, as dots of their own
  (as flash attention recomputes p), and softmax's backward is one pass per layout, `p * (dp - rowsum(g *
  context))`. The forward is the einsum path's (the same dots and softmax, 3-D). In f32 the two extra dots cost
  more than they save (0.95x), so f32 keeps autodiff.
  """
  return _softmax_attention_fwd(q, k, v, bias, dtype)[0]


def _softmax_attention_fwd(q, k, v, bias, dtype):
  b, h, l, d = q.shape
  q16, k16, v16 = (t.astype(dtype).reshape(b * h, l, d) for t in (q, k, v))  # 3-D: XLA:CPU keeps bf16 dots
  scores = _dot('nqd,nkd->nqk', q16, k16).reshape(b, h, l, l) + bias
  peak = jnp.max(scores, axis=-1, keepdims=True)
  unnormalized = jnp.exp(scores - peak)
  total = jnp.sum(unnormalized, axis=-1, keepdims=True)
  p = unnormalized / total  # = jax.nn.softmax(scores), bit for bit
  context = _dot('nqk,nkd->nqd', p.astype(dtype).reshape(b * h, l, l), v16).reshape(b, h, l, d)
  carriers = tuple(jnp.zeros((0,), t.dtype) for t in (q, k, v))  # the primal dtypes of the cotangents
  return context, (q16, k16, v16, p, peak, total, context, bias, carriers)


def _softmax_attention_bwd(dtype, res, g):
  q16, k16, v16, p, peak, total, context, bias, carriers = res
  b, h, l, d = g.shape
  g16, swap = g.astype(dtype).reshape(b * h, l, d), lambda t: jnp.swapaxes(t, -1, -2)
  dot = _dot
  to3, to4 = lambda t: t.astype(dtype).reshape(b * h, l, l), lambda t: t.reshape(b, h, l, -1)
  rowsum = jnp.sum(g * context, axis=-1, keepdims=True)  # = rowsum(p * dp)
  p_t = jnp.exp(to4(dot('nkd,nqd->nkq', k16, q16)) + swap(bias) - swap(peak)) / swap(total)
  ds_t = p_t * (to4(dot('nkd,nqd->nkq', v16, g16)) - swap(rowsum))
  ds = p * (to4(dot('nqd,nkd->nqk', g16, v16)) - rowsum)
  dq = dot('nqk,nkd->nqd', to3(ds), k16)
  dk = dot('nkq,nqd->nkd', to3(ds_t), q16)
  dv = dot('nkq,nqd->nkd', to3(p_t), g16)
  return (*(to4(x).astype(c.dtype) for x, c in zip((dq, dk, dv), carriers)), jnp.zeros_like(bias))  # bias: a mask


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def fused_cpu_attention(dtype: Dtype, dropout_rate: float, deterministic: bool, mode: str, length: int) -> bool:
  """Whether `attention` (mode `model.attention`) runs as the CPU kernel (`onednn.attention`, or
  `onednn.qkv_attention` from a fused projection): bf16 without active attention dropout, on the einsum path,
  where `onednn.attention_enabled` (one CPU device with AVX512-BF16 and the kernels built). The kernel takes one
  (batch, head) block at a time in cache: its scores, softmax and gradients never leave it."""
  return (jnp.dtype(dtype) == jnp.bfloat16 and (dropout_rate == 0.0 or deterministic)
          and not use_dot_product_attention(mode, dropout_rate, deterministic)
          and onednn.attention_enabled(dtype, length))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, *, dtype: Dtype, dropout_rate: float,
              deterministic: bool, mode: str = 'auto', row_ids: jax.Array | None = None,
              cudnn: bool = True) -> jax.Array:
  """Multi-head attention of heads-major q, k, v [batch, heads, len, head_dim] under `bias` (`attention_bias`):
  the context [batch, len, heads * head_dim] in f32. Call it from a module's compact method (its attention
  dropout is a `Dropout` submodule of the caller).

  `mode` (`model.attention`) picks `jax.nn.dot_product_attention` (fused kernels; cuDNN flash attention where
  `attention_implementation` says so, unless `cudnn=False`) or the heads-major einsums, with dropout `row_ids`
  as `Dropout`'s.
  """
  b, heads, l, head_dim = q.shape
  if use_dot_product_attention(mode, dropout_rate, deterministic):  # fused kernels where the backend has them
    qkv = (t.transpose(0, 2, 1, 3).astype(dtype) for t in (q, k, v))
    if cudnn:
      context = _dot_product_attention(*qkv, bias == 0, dtype, dropout_active=dropout_rate > 0 and not deterministic)
    else:
      context = jax.nn.dot_product_attention(*qkv, mask=bias == 0)
    return context.astype(jnp.float32).reshape(b, l, heads * head_dim)
  if fused_cpu_attention(dtype, dropout_rate, deterministic, mode, l):  # a (batch, head) block at a time in cache
    context = onednn.attention(q * head_dim ** -0.5, k, v, bias)
    return context.transpose(0, 2, 1, 3).reshape(b, l, heads * head_dim)
  if jnp.dtype(dtype) == jnp.bfloat16 and (dropout_rate == 0.0 or deterministic):
    context = _softmax_attention(q * head_dim ** -0.5, k, v, bias, jnp.dtype(dtype))
    return context.transpose(0, 2, 1, 3).reshape(b, l, heads * head_dim)
  # Heads-major layout: batched dots over (batch, head) run ~3x faster than 'bqhd,bkhd' on CPU.
  scores = mixed_einsum('bhqd,bhkd->bhqk', q * head_dim ** -0.5, k, dtype) + bias
  probs = Dropout(dropout_rate)(jax.nn.softmax(scores, axis=-1), deterministic=deterministic, row_ids=row_ids)
  return mixed_einsum('bhqk,bhkd->bhqd', probs, v, dtype).transpose(0, 2, 1, 3).reshape(b, l, heads * head_dim)


def rope_tables(positions: jax.Array, head_dim: int, theta: float, max_positions: int) -> tuple[jax.Array, jax.Array]:
  """cos and sin [batch, 1, len, head_dim] of rotary embeddings at `positions` [batch, len] (f32).

  Looked up in tables of the `max_positions` positions, computed once when the function is traced (f32, as the
  reference's `inv_freq * position`): computed in the graph, XLA:CPU fuses the cos and sin into every RoPE fusion
  of every layer, forward and backward, and recomputes them per element (14% of the quick start's step on CPU).
  """
  with jax.ensure_compile_time_eval():
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = jnp.arange(max_positions, dtype=jnp.float32)[:, None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    tables = jnp.cos(angles), jnp.sin(angles)
  return tuple(jnp.take(table, positions, axis=0, mode='clip')[:, None] for table in tables)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates [batch, heads, len, head_dim] by the tables (the 'rotate half' convention of Hugging Face)."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def at_positions(x: jax.Array, masked_positions: jax.Array | None) -> jax.Array:
  """Hidden states [batch, P, hidden] at `masked_positions` [batch, P] (all of `x` when None): the MLM head
  runs only where predictions are scored."""
  return x if masked_positions is None else jnp.take_along_axis(x, masked_positions[..., None], axis=1)


def resolve_vocab_multiple(vocab_multiple: int | None) -> int:
  """`model.vocab_multiple`, None resolved for this backend: 128 on GPU/TPU (aligned tiles); 1 on CPU, where the
  matmul gains nothing from it and the pad, its bf16 convert and the gradient's slice cost ~3% of a
  ModernBERT-base step (vocabulary 30,522 -> 30,592)."""
  if vocab_multiple is not None:
    return vocab_multiple
  return 1 if jax.default_backend() == 'cpu' else 128


def decode(x: jax.Array, embedding: jax.Array, vocab_multiple: int | None, dtype: Dtype) -> jax.Array:
  """Vocabulary logits of `x` [batch, P, hidden] through `embedding` [vocab, hidden] (tied or untied decoder).

  The matmul runs on the embedding padded with zero rows to a multiple of `vocab_multiple` (aligned tiles for
  GPU tensor cores / TPU MXUs); the padded logits are sliced off, so params, checkpoints and Hugging Face exports
  keep the tokenizer's vocabulary size.
  """
  vocab = embedding.shape[0]
  pad = -vocab % resolve_vocab_multiple(vocab_multiple)
  if pad:
    embedding = jnp.pad(embedding, ((0, pad), (0, 0)))
  # A 2-D dot, as `Dense`'s: on [batch, P, hidden] XLA:CPU transposes the logits' cotangent for the embedding's
  # gradient (a ~2 ms copy per step at the quick start's shapes).
  logits = mixed_einsum('mh,vh->mv', x.reshape(-1, x.shape[-1]), embedding, dtype)
  return logits.reshape(*x.shape[:-1], -1)[..., :vocab]


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """`y + bias` over the last axis, the bias gradient (a sum over every other axis) as a dot with ones: XLA:CPU
  (YNNPACK) reduces the leading axis of a wide matrix slowly, 84 ms per ModernBERT-base step for the decoder
  bias's [1632, 30522] against 6 ms as a matrix-vector product (f32 both: the same sum in another order)."""
  return y + bias


def _add_bias_fwd(y, bias):
  return y + bias, (jnp.zeros((0,), y.dtype), jnp.zeros((0,), bias.dtype))  # the primal dtypes


def _add_bias_bwd(carriers, g):
  rows = g.reshape(-1, g.shape[-1])
  ones = jnp.ones((rows.shape[0],), rows.dtype)
  dbias = jnp.einsum('m,mv->v', ones, rows, preferred_element_type=jnp.float32)
  return g.astype(carriers[0].dtype), dbias.astype(carriers[1].dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


_cpu_has_fast_bf16 = onednn.cpu_has_fast_bf16  # a module global: tests stand in for the CPU


def resolve_dtype(name: str) -> jnp.dtype:
  """'auto' is the fastest safe compute dtype here: bf16 (f32 accumulation) on TPU, GPU and
  CPUs with AMX/AVX512-BF16; f32 on other CPUs, where bf16 dots are emulated and slower."""
  if name != 'auto':
    return jnp.dtype(name)
  fast = jax.default_backend() in ('tpu', 'gpu', 'cuda', 'rocm') or _cpu_has_fast_bf16()
  return jnp.dtype(jnp.bfloat16 if fast else jnp.float32)
