"""CPU kernels for XLA: the bf16 model's dots on oneDNN's AMX / AVX512-BF16 kernels, and attention and norms
as one kernel each way.

XLA:CPU ran the quick start's bf16 dots at ~680 GFLOP/s on a 2-core Xeon with AMX; oneDNN, the library PyTorch
calls, ran the same dots alone at 1,600-3,000 (`experiments/benchmarks/dot_bound.py`). This module compiles a
small XLA FFI handler (`onednn_matmul.cc`) against the `onednn-cpu-gomp` wheel's library on first use (g++, ~3
s; cached under `$MLM_FLAX_CACHE/kernels`), registers it, and `einsum` runs a 2-D or batched 3-D einsum through
it: bf16 (or f32) operands, f32 out, transposed operands read in place. The sums are XLA's (f32 accumulation of
exact bf16 products); only their order may differ. Inside a step each dot takes 2-3x its time alone (operands
out of cache, oneDNN's threads waking up), so the step gains less than the kernels suggest: +7.5% tokens/s at
the quick start, +11% at BERT-base 32 x 128 (`experiments/benchmarks/README.md`).

The same library (sources `onednn_attention.cc`, `cpu_norm.cc`, built together) has `attention` /
`qkv_attention` (softmax attention a (batch, head) block at a time in cache, its products on oneDNN from each
OpenMP thread, the softmax in AVX-512; where `attention_enabled`: AVX512-BF16) and `norm` (LayerNorm / RMSNorm
rows in one pass; where `norm_enabled`): 1.225x the quick start's bf16 step together; and `gelu_glu` (GeGLU's
activation between two bf16 projections, bf16 out each way, `cpu_glu.cc`; where `glu_enabled`). The kernels
write bf16 where a bf16 matmul reads their output next and would round it there (the same bits; XLA drops the
bf16 -> f32 -> bf16 pair); `cpu_simd.h` and `cpu_parallel.h` hold their shared AVX-512 and thread-pool code.

`layers.mixed_einsum` and the bf16 attention call it where `enabled` says so. `MLM_FLAX_CPU_MATMUL` picks:
'auto' (default: oneDNN for bf16 on a single CPU device when the CPU has AMX or AVX512-BF16 and the library and a
C++ compiler are there; XLA's dots otherwise, logged once), 'onednn' (an error when it cannot run), 'xla'
(never; the attention, norm and GeGLU kernels neither). Several devices keep XLA's ops: a custom call has no SPMD
partitioning rule.
"""

import ctypes
import functools
import glob
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

_TARGET = 'mlm_flax_onednn_matmul'
_ATTENTION_TARGETS = ('mlm_flax_onednn_attention_fwd', 'mlm_flax_onednn_attention_bwd')
_QKV_ATTENTION_TARGETS = ('mlm_flax_onednn_qkv_attention_fwd', 'mlm_flax_onednn_qkv_attention_bwd')
_NORM_TARGETS = ('mlm_flax_cpu_norm_fwd', 'mlm_flax_cpu_norm_bwd')
_ADD_NORM_TARGETS = ('mlm_flax_cpu_add_norm_fwd', 'mlm_flax_cpu_add_norm_bwd')
_GLU_TARGETS = ('mlm_flax_cpu_gelu_glu_fwd', 'mlm_flax_cpu_gelu_glu_bwd')
_XENT_TARGETS = ('mlm_flax_cpu_xent_fwd', 'mlm_flax_cpu_xent_bwd')
_HERE = os.path.dirname(__file__)
_SOURCES = tuple(os.path.join(_HERE, name) for name in ('onednn_matmul.cc', 'onednn_attention.cc', 'cpu_norm.cc',
                                                              'cpu_glu.cc', 'cpu_xent.cc'))
_HEADERS = tuple(os.path.join(_HERE, name) for name in ('onednn_api.h', 'cpu_simd.h', 'cpu_parallel.h'))
_MODES = ('auto', 'onednn', 'xla')


def mode() -> str:
  """`MLM_FLAX_CPU_MATMUL`: 'auto', 'onednn' or 'xla'."""
  value = os.environ.get('MLM_FLAX_CPU_MATMUL', 'auto')
  if value not in _MODES:
    raise ValueError(f'MLM_FLAX_CPU_MATMUL={value!r}; use one of {_MODES}.')
  return value


def library_path() -> str | None:
  """libdnnl.so.3 of the `onednn-cpu-gomp` wheel (installed under `sys.prefix/lib`), or `$MLM_FLAX_ONEDNN_LIB`."""
  explicit = os.environ.get('MLM_FLAX_ONEDNN_LIB')
  if explicit:
    return explicit if os.path.exists(explicit) else None
  for prefix in dict.fromkeys((sys.prefix, sys.base_prefix, os.path.dirname(os.path.dirname(sys.executable)))):
    found = sorted(glob.glob(os.path.join(prefix, 'lib', 'libdnnl.so.3')))
    if found:
      return found[0]
  return None


def _cache_dir() -> str:
  root = os.environ.get('MLM_FLAX_CACHE') or os.path.expanduser('~/.cache/mlm_flax')
  return os.path.join(root, 'kernels')


def _compiler() -> str | None:
  return os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')


def unavailable_reason(lib: str | None) -> str | None:
  """Why the kernel cannot be built here with the library `lib` (None: it can)."""
  if not sys.platform.startswith('linux'):
    return 'the oneDNN kernel is built on Linux only'
  if lib is None:
    return "no libdnnl.so.3 (pip install 'onednn-cpu-gomp', or set MLM_FLAX_ONEDNN_LIB to its path)"
  if _compiler() is None:
    return 'no C++ compiler (g++, or $CXX) to build the oneDNN kernel'
  return None


@functools.cache
def _load() -> str | None:
  """Builds (once per source, jax version and library) and registers the handler; None when it is registered,
  else why it cannot be."""
  lib = library_path()
  why_not = unavailable_reason(lib)
  if why_not is not None:
    return why_not
  digest = hashlib.sha256(jax.__version__.encode() + os.path.realpath(lib).encode())
  for path in (*_SOURCES, *_HEADERS):
    with open(path, 'rb') as f:
      digest.update(f.read())
  key = digest.hexdigest()[:16]
  target = os.path.join(_cache_dir(), f'onednn_matmul_{key}.so')
  if not os.path.exists(target):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    libdir = os.path.dirname(lib)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(target)) as tmp:
      # libdnnl.so.3 has no unversioned link name in the wheel: link it by path, find it by rpath at load.
      built = os.path.join(tmp, 'kernel.so')
      # OpenMP: the attention kernel's loop over heads, on the libgomp that the gomp wheel's oneDNN runs on.
      command = [_compiler(), '-O2', '-std=c++17', '-shared', '-fPIC', '-fopenmp', '-w',
                 f'-I{jax.ffi.include_dir()}', f'-I{_HERE}', *_SOURCES, lib, f'-Wl,-rpath,{libdir}', '-o', built]
      result = subprocess.run(command, capture_output=True, text=True)
      if result.returncode:
        return f'building the oneDNN kernel failed: {result.stderr.strip()[-2000:]}'
      os.replace(built, target)  # atomic: a concurrent builder finds a whole file or none
  try:
    built = ctypes.cdll.LoadLibrary(target)
    handlers = (built.MlmFlaxOnednnMatmul, built.MlmFlaxOnednnAttentionFwd, built.MlmFlaxOnednnAttentionBwd,
                built.MlmFlaxOnednnQkvAttentionFwd, built.MlmFlaxOnednnQkvAttentionBwd,
                built.MlmFlaxCpuNormFwd, built.MlmFlaxCpuNormBwd, built.MlmFlaxCpuAddNormFwd,
                built.MlmFlaxCpuAddNormBwd, built.MlmFlaxCpuGeluGluFwd, built.MlmFlaxCpuGeluGluBwd,
                built.MlmFlaxCpuXentFwd, built.MlmFlaxCpuXentBwd)
  except (OSError, AttributeError) as e:
    return f'loading the oneDNN kernel failed: {e}'
  targets = (_TARGET, *_ATTENTION_TARGETS, *_QKV_ATTENTION_TARGETS, *_NORM_TARGETS, *_ADD_NORM_TARGETS, *_GLU_TARGETS,
             *_XENT_TARGETS)
  for name, handler in zip(targets, handlers):
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(handler), platform='cpu')
  logging.info("bf16 matmuls run on oneDNN (%s); MLM_FLAX_CPU_MATMUL=xla for XLA's dots.", lib)
  return None


@functools.cache  # read once: `enabled` asks at every dot of a trace
def cpu_flags() -> frozenset[str]:
  """The CPU's flags in /proc/cpuinfo (empty where there is none)."""
  try:
    with open('/proc/cpuinfo') as f:
      return frozenset(next((l for l in f if l.startswith('flags')), '').split())
  except OSError:
    return frozenset()


def cpu_has_fast_bf16() -> bool:
  """Whether the CPU has AMX-BF16 or AVX512-BF16 (bf16 dots in hardware, not emulated)."""
  return bool(cpu_flags() & {'amx_bf16', 'avx512_bf16'})


def enabled(dtype) -> bool:
  """Whether the model's `dtype` dots run on oneDNN here (see the module docstring); read at trace time."""
  chosen = mode()
  if chosen == 'xla' or jnp.dtype(dtype) != jnp.bfloat16 or jax.default_backend() != 'cpu':
    return False  # a CPU kernel: GPU and TPU keep their own dots
  if chosen == 'auto' and not (jax.device_count() == 1 and cpu_has_fast_bf16()):
    return False
  why_not = _load()
  if why_not is None:
    return True
  if chosen == 'onednn':
    raise RuntimeError(f'MLM_FLAX_CPU_MATMUL=onednn, but {why_not}. Unset it to use XLA\'s dots.')
  _log_once(f'bf16 matmuls run on XLA\'s dots, not oneDNN: {why_not}.')
  return False


@functools.cache
def _log_once(message: str) -> None:
  logging.info(message)


def _plan(spec: str) -> tuple[bool, bool, bool] | None:
  """(swap, trans_a, trans_b) computing `spec` as op(a) @ op(b) (or op(b) @ op(a) when swap), or None when it
  is not a 2-D / batched 3-D matmul einsum."""
  inputs, out = spec.replace(' ', '').split('->')
  a, b = inputs.split(',')
  if len({len(a), len(b), len(out)}) != 1 or len(a) not in (2, 3) or len(set(a + b + out)) != len(a) + 1:
    return None
  if len(a) == 3:
    if not a[0] == b[0] == out[0]:
      return None
    a, b, out = a[1:], b[1:], out[1:]
  shared = set(a) & set(b)
  if len(shared) != 1 or shared & set(out):
    return None
  (k,) = shared
  fa, fb = a.replace(k, ''), b.replace(k, '')
  if out == fa + fb:
    return False, a[0] == k, b[1] == k
  if out == fb + fa:
    return True, b[0] == k, a[1] == k
  return None


def einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array | None:
  """`jnp.einsum(spec, a, b, preferred_element_type=f32)` on oneDNN, or None when `spec` is not a matmul it runs
  (the caller then uses XLA). The operands share a dtype (bf16 or f32). Call it where `enabled` is True."""
  plan = _plan(spec)
  if plan is None or a.dtype != b.dtype:
    return None
  swap, trans_a, trans_b = plan
  if swap:
    a, b = b, a
  m = a.shape[-1] if trans_a else a.shape[-2]
  n = b.shape[-2] if trans_b else b.shape[-1]
  out = jax.ShapeDtypeStruct((*a.shape[:-2], m, n), jnp.float32)
  return jax.ffi.ffi_call(_TARGET, out, vmap_method='sequential')(a, b, trans_a=trans_a, trans_b=trans_b)


# The CPU features of the AVX-512 kernels that round to bf16 in hardware (attention, GeGLU).
_AVX512_BF16 = frozenset({'avx512f', 'avx512bw', 'avx512vl', 'avx512_bf16'})
MAX_ATTENTION_LEN = 2048  # each OpenMP thread keeps a head's [len, len] scores and gradients (f32 + bf16)


def attention_enabled(dtype, length: int) -> bool:
  """Whether bf16 attention of `length` tokens runs as one fused kernel (`attention`): where `enabled` puts the
  dots on oneDNN, the CPU has AVX512-BF16 (the kernel's softmax and bf16 rounding are AVX-512 code), and
  `length` <= MAX_ATTENTION_LEN. Read at trace time."""
  return length <= MAX_ATTENTION_LEN and _AVX512_BF16 <= cpu_flags() and enabled(dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
  """softmax(q k^T + bias) v over heads-major [batch, heads, len, head_dim] (q already scaled), as the bf16
  einsum path computes it (`layers._softmax_attention`: bf16 operands, f32 sums and softmax), one (batch, head)
  block at a time in cache (`onednn_attention.cc`); bias: `layers.attention_bias`'s mask (broadcast to
  [batch, 1, len, len]). The context in f32; the cotangents in the operands' dtypes. Call it where
  `attention_enabled` is True."""
  b, _, l, _ = q.shape
  return _attention(q, k, v, _mask(bias, b, l))


def _mask(bias: jax.Array, batch: int, length: int) -> jax.Array:
  """The additive mask as the kernels read it: f32 [batch, 1, len, len]."""
  return jnp.broadcast_to(bias, (batch, 1, length, length)).astype(jnp.float32)


@jax.custom_vjp
def _attention(q, k, v, bias):
  return _attention_fwd(q, k, v, bias)[0]


def _attention_fwd(q, k, v, bias):
  b, h, l, d = q.shape
  q16, k16, v16 = (t.astype(jnp.bfloat16) for t in (q, k, v))
  rows = jax.ShapeDtypeStruct((b, h, l), jnp.float32)
  out = (jax.ShapeDtypeStruct((b, h, l, d), jnp.float32), rows, rows)
  # The rows' maximum and 1 / sum of exp: the backward recomputes the probabilities from them.
  context, peak, inv_total = jax.ffi.ffi_call(_ATTENTION_TARGETS[0], out, vmap_method='sequential')(
      q16, k16, v16, bias)
  carriers = tuple(jnp.zeros((0,), t.dtype) for t in (q, k, v))  # the primal dtypes of the cotangents
  return context, (q16, k16, v16, bias, context, peak, inv_total, carriers)


def _attention_bwd(res, g):
  q16, k16, v16, bias, context, peak, inv_total, carriers = res
  out = (jax.ShapeDtypeStruct(q16.shape, jnp.float32),) * 3
  grads = jax.ffi.ffi_call(_ATTENTION_TARGETS[1], out, vmap_method='sequential')(
      q16, k16, v16, bias, context, peak, inv_total, g.astype(jnp.float32))
  # The bias is a mask: no gradient (as `layers._softmax_attention`).
  return (*(x.astype(c.dtype) for x, c in zip(grads, carriers)), jnp.zeros_like(bias))


_attention.defvjp(_attention_fwd, _attention_bwd)


def qkv_attention(qkv: jax.Array, cos: jax.Array, sin: jax.Array, bias: jax.Array, heads: int) -> jax.Array:
  """`attention` from a fused QKV projection, RoPE inside the kernel: qkv f32 [batch, len, 3 * heads * head_dim]
  (q|k|v, head, head_dim), cos and sin f32 (`layers.rope_tables`' [batch, 1, len, head_dim], or [batch, len,
  head_dim]), bias `layers.attention_bias`'s mask; the context f32 [batch, len, heads * head_dim]. The einsum
  path's `attention(apply_rope(q) ...)` with q scaled by head_dim ** -0.5, without its transposes and RoPE
  passes; its gradient for qkv comes rounded to bf16, as the projection's bf16 backward reads it. Call it where
  `attention_enabled` is True and qkv is a bf16 projection's output."""
  b, l, features = qkv.shape
  tables = (t.reshape(b, l, features // (3 * heads)) for t in (cos, sin))
  return _qkv_attention(qkv, *tables, _mask(bias, b, l), heads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _qkv_attention(qkv, cos, sin, bias, heads):
  return _qkv_attention_fwd(qkv, cos, sin, bias, heads)[0]


def _qkv_attention_fwd(qkv, cos, sin, bias, heads):
  b, l, features = qkv.shape
  head_dim = features // (3 * heads)
  rows = jax.ShapeDtypeStruct((b, heads, l), jnp.float32)
  heads_major = jax.ShapeDtypeStruct((b, heads, l, head_dim), jnp.bfloat16)
  out = (jax.ShapeDtypeStruct((b, l, heads * head_dim), jnp.float32), rows, rows, heads_major, heads_major,
         heads_major)
  scale = np.float32(head_dim ** -0.5)
  # Also q (RoPE, scaled), k (RoPE) and v in bf16 heads-major, as the kernel gathers them: the backward reads
  # them again (not qkv in f32, gathered and rotated a second time).
  context, peak, inv_total, q16, k16, v16 = jax.ffi.ffi_call(
      _QKV_ATTENTION_TARGETS[0], out, vmap_method='sequential')(qkv, cos, sin, bias, heads=np.int64(heads),
                                                                scale=scale)
  carrier = jnp.zeros((0,), qkv.dtype)  # the primal dtype of the cotangent
  return context, (q16, k16, v16, cos, sin, bias, context, peak, inv_total, carrier)


def _qkv_attention_bwd(heads, res, g):
  q16, k16, v16, cos, sin, bias, context, peak, inv_total, carrier = res
  b, _, l, head_dim = q16.shape
  scale = np.float32(head_dim ** -0.5)
  dqkv = jax.ffi.ffi_call(_QKV_ATTENTION_TARGETS[1], jax.ShapeDtypeStruct((b, l, 3 * heads * head_dim),
                                                                          jnp.bfloat16),
                          vmap_method='sequential')(q16, k16, v16, cos, sin, bias, context, peak, inv_total,
                                                    g.astype(jnp.float32), heads=np.int64(heads), scale=scale)
  # In bf16: the projection's bf16 backward (`layers._bf16_einsum_bwd`) rounds its cotangent to bf16 anyway, and
  # XLA drops the convert pair (bf16 -> f32 -> bf16), so the projection reads the kernel's bf16 bits.
  # The tables and the mask are constants of the positions and segments: no gradient.
  return dqkv.astype(carrier.dtype), jnp.zeros_like(cos), jnp.zeros_like(sin), jnp.zeros_like(bias)


_qkv_attention.defvjp(_qkv_attention_fwd, _qkv_attention_bwd)


def norm_enabled(dtype, x: jax.Array) -> bool:
  """Whether a norm of f32 `x` in a model computing in `dtype` runs as one kernel per direction (`norm`): where
  `enabled(dtype)` (a bf16 model on one CPU device with the oneDNN kernels built) and the CPU has AVX-512."""
  return x.dtype == jnp.float32 and 'avx512f' in cpu_flags() and enabled(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def norm(epsilon: float, center: bool, x: jax.Array, scale: jax.Array, bias: jax.Array) -> jax.Array:
  """`layers.Norm`'s LayerNorm (`center`) or RMSNorm of f32 `x` over its last axis, each row in one pass
  (`cpu_norm.cc`): the same statistics and closed-form backward, sums in another order. Call it where
  `norm_enabled` is True."""
  return _norm_fwd(epsilon, center, x, scale, bias)[0]


def _norm_fwd(epsilon, center, x, scale, bias):
  rows = jax.ShapeDtypeStruct(x.shape[:-1], jnp.float32)
  out = (jax.ShapeDtypeStruct(x.shape, jnp.float32), rows, rows)
  y, mean, rstd = jax.ffi.ffi_call(_NORM_TARGETS[0], out, vmap_method='sequential')(
      x, scale.astype(jnp.float32), bias.astype(jnp.float32), epsilon=np.float32(epsilon), center=bool(center))
  return y, (x, mean, rstd, scale, bias)


def _norm_bwd(epsilon, center, res, g):
  del epsilon
  x, mean, rstd, scale, bias = res
  out = (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct(scale.shape, jnp.float32),
         jax.ShapeDtypeStruct(scale.shape, jnp.float32))
  dx, dscale, dbias = jax.ffi.ffi_call(_NORM_TARGETS[1], out, vmap_method='sequential')(
      x, mean, rstd, scale.astype(jnp.float32), g.astype(jnp.float32), center=bool(center))
  return dx, dscale.astype(scale.dtype), dbias.astype(bias.dtype)


norm.defvjp(_norm_fwd, _norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def add_norm(epsilon: float, center: bool, x: jax.Array, delta: jax.Array, scale: jax.Array,
             bias: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(s, `norm`(s)) for s = x + delta (f32): a residual add and the pre-LN norm after it, each row in one pass
  each way (`cpu_norm.cc`), the bits of `x + delta` and `norm` (its backward adds the residual stream's
  cotangent of s to the norm's, as XLA's add would). Saves the add's pass over both, and in the backward the add
  of the two cotangents. Call it where `norm_enabled` is True."""
  return _add_norm_fwd(epsilon, center, x, delta, scale, bias)[0]


def _add_norm_fwd(epsilon, center, x, delta, scale, bias):
  rows = jax.ShapeDtypeStruct(x.shape[:-1], jnp.float32)
  full = jax.ShapeDtypeStruct(x.shape, jnp.float32)
  s, y, mean, rstd = jax.ffi.ffi_call(_ADD_NORM_TARGETS[0], (full, full, rows, rows), vmap_method='sequential')(
      x, delta.astype(jnp.float32), scale.astype(jnp.float32), bias.astype(jnp.float32),
      epsilon=np.float32(epsilon), center=bool(center))
  return (s, y), (s, mean, rstd, scale, bias, jnp.zeros((0,), delta.dtype))


def _add_norm_bwd(epsilon, center, res, g):
  del epsilon
  s, mean, rstd, scale, bias, delta_dtype = res
  g_sum, g_y = g
  out = (jax.ShapeDtypeStruct(s.shape, jnp.float32), jax.ShapeDtypeStruct(scale.shape, jnp.float32),
         jax.ShapeDtypeStruct(scale.shape, jnp.float32))
  ds, dscale, dbias = jax.ffi.ffi_call(_ADD_NORM_TARGETS[1], out, vmap_method='sequential')(
      s, mean, rstd, scale.astype(jnp.float32), g_y.astype(jnp.float32), g_sum.astype(jnp.float32),
      center=bool(center))
  return ds, ds.astype(delta_dtype.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


add_norm.defvjp(_add_norm_fwd, _add_norm_bwd)


def glu_enabled(dtype) -> bool:
  """Whether GeGLU's activation in a model computing in `dtype` runs as `gelu_glu`: where `attention_enabled`
  would (bf16 dots on oneDNN, AVX512-BF16 for the kernel's bf16 rounding). Read at trace time."""
  return _AVX512_BF16 <= cpu_flags() and enabled(dtype)


@jax.custom_vjp
def gelu_glu(h: jax.Array) -> jax.Array:
  """GeGLU's activation, gelu(h[:, :n]) * h[:, n:] (exact erf GELU), on the f32 output h [tokens, 2n] of a
  bias-free bf16 projection, for a bf16 projection to read: one kernel each way (`cpu_glu.cc`), each reading h
  once and writing bf16, the value (forward) and h's cotangent (backward) rounded to bf16 once, where the
  projections' `layers._bf16_einsum` would round them; XLA drops the bf16 -> f32 -> bf16 pairs, so the
  projections read the kernel's bits. Replaces ~8 XLA fusions per layer (the activation, its gradient, the
  halves' concatenation, three converts). Call it where `glu_enabled` is True, and only where both neighbours
  are bf16 projections without bias and nothing (dropout) comes between."""
  return _gelu_glu_fwd(h)[0]


def _gelu_glu_fwd(h):
  y16 = jax.ffi.ffi_call(_GLU_TARGETS[0], jax.ShapeDtypeStruct((h.shape[0], h.shape[1] // 2), jnp.bfloat16),
                         vmap_method='sequential')(h)
  return y16.astype(h.dtype), h


def _gelu_glu_bwd(h, g):
  dh16 = jax.ffi.ffi_call(_GLU_TARGETS[1], jax.ShapeDtypeStruct(h.shape, jnp.bfloat16),
                          vmap_method='sequential')(h, g.astype(jnp.float32))
  return (dh16.astype(h.dtype),)


gelu_glu.defvjp(_gelu_glu_fwd, _gelu_glu_bwd)


def cross_entropy_enabled(dtype) -> bool:
  """Whether the MLM loss of a model computing in `dtype` runs as `cross_entropy_argmax`: where `glu_enabled`
  (bf16 on one AVX512-BF16 CPU device with the kernels built; other models keep the XLA ops and their bits)."""
  return glu_enabled(dtype)


def cross_entropy_argmax(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(`mlm.cross_entropy(logits, targets)`, `mlm.argmax(logits)`) of f32 `logits` [..., vocab] at int `targets`
  [...], each row in one pass each way (`cpu_xent.cc`): the loss to f32 rounding (exp as a polynomial, sums in
  another order), the index exactly (the first maximum, the first NaN); the closed-form gradient of the loss.
  For the loss of a model whose `glu_enabled` is True (bf16 on one AVX512-BF16 CPU device)."""
  return _cross_entropy_argmax(logits.astype(jnp.float32), targets.astype(jnp.int32))


@jax.custom_vjp
def _cross_entropy_argmax(logits, targets):
  return _cross_entropy_argmax_fwd(logits, targets)[0]


def _cross_entropy_argmax_fwd(logits, targets):
  rows = jax.ShapeDtypeStruct(targets.shape, jnp.float32)
  out = (rows, jax.ShapeDtypeStruct(targets.shape, jnp.int32), rows, rows)
  ce, best, peak, total = jax.ffi.ffi_call(_XENT_TARGETS[0], out, vmap_method='sequential')(logits, targets)
  return (ce, best), (logits, targets, peak, total)  # the row statistics: the backward reads the logits once


def _cross_entropy_argmax_bwd(res, cotangents):
  logits, targets, peak, total = res
  g = cotangents[0]  # the index has no gradient
  dlogits = jax.ffi.ffi_call(_XENT_TARGETS[1], jax.ShapeDtypeStruct(logits.shape, jnp.float32),
                             vmap_method='sequential')(logits, targets, peak, total, g.astype(jnp.float32))
  return dlogits, np.zeros(targets.shape, jax.dtypes.float0)


_cross_entropy_argmax.defvjp(_cross_entropy_argmax_fwd, _cross_entropy_argmax_bwd)
