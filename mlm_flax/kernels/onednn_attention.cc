// XLA FFI handlers for CPU: softmax attention of one (batch, head) block at a time, forward and backward, its
// matmuls on oneDNN (AMX / AVX512-BF16 brgemm) and its softmax in AVX-512, the whole block in cache. Built and
// loaded by `onednn.py`; called only where the CPU has AVX512-BF16 (`onednn.attention_enabled`).
//
// Why: as XLA ops, a layer's attention was 8 batched oneDNN calls over all heads plus ~12 XLA fusions between
// them, each streaming [batch * heads, len, len] f32 scores, probabilities or their bf16 copies through memory:
// ~29 ms of the quick start's ~86 ms step. Here each thread takes whole heads (OpenMP, static: deterministic),
// and a head's scores, probabilities and their gradients never leave its buffers. The forward keeps each row's
// maximum and 1 / sum for the backward, which recomputes the probabilities bit for bit (as flash attention
// recomputes them), not [len, len] of them. (Not one log-sum-exp: in a row with every key masked, the maximum is
// the lowest f32 and log(len) vanishes in it.)
//
// Layouts: q, k, v bf16 [batch, heads, len, head_dim] (q already scaled), bias f32 [batch, 1, len, len] (0 or the
// lowest f32: a mask), context and gradients f32 [batch, heads, len, head_dim], row statistics f32
// [batch, heads, len].
// Numerics are the XLA path's (`layers._softmax_attention`): bf16 products summed in f32, softmax in f32, the
// probabilities and score gradients rounded to bf16 (nearest even) for their matmuls; sums run in another
// order and exp is a polynomial (~1 ulp), so results agree to rounding, not bit for bit.
#include <immintrin.h>
#include <omp.h>

#include <cmath>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "cpu_simd.h"
#include "onednn_api.h"
#include "xla/ffi/api/ffi.h"

namespace {
namespace ffi = xla::ffi;
using namespace mlm_flax;  // NOLINT: the oneDNN constants

// A 2-D matmul primitive op(a)[m, k] @ op(b)[k, n] -> f32 [m, n] on dense row-major bf16 buffers, with a
// user-managed scratchpad: several threads run one primitive at once, each with its own scratchpad.
struct Matmul {
  dnnl_primitive_t primitive = nullptr;
  dnnl_memory_desc_t a = nullptr, b = nullptr, c = nullptr;
  const void* scratchpad = nullptr;  // its memory descriptor (owned by the primitive descriptor)
  size_t scratchpad_bytes = 0;
};

// (a rows, a cols, a transposed, b rows, b cols, b transposed) -> its primitive; never destroyed.
using Key = std::tuple<int64_t, int64_t, bool, int64_t, int64_t, bool>;

const Matmul* GetMatmul(const Key& key) {
  static std::mutex* mutex = new std::mutex();
  static auto* plans = new std::map<Key, Matmul>();
  std::lock_guard<std::mutex> lock(*mutex);
  auto it = plans->find(key);
  if (it != plans->end()) return &it->second;
  auto [ar, ac, ta, br, bc, tb] = key;
  Matmul m;
  m.a = Desc(1, ar, ac, ta, kBf16);  // 2-D
  m.b = Desc(1, br, bc, tb, kBf16);
  m.c = Desc(1, ta ? ac : ar, tb ? br : bc, false, kF32);
  dnnl_primitive_attr_t attr = nullptr;
  dnnl_primitive_desc_t pd = nullptr;
  bool ok = Engine() != nullptr && m.a && m.b && m.c && dnnl_primitive_attr_create(&attr) == 0 &&
            dnnl_primitive_attr_set_scratchpad_mode(attr, kScratchpadUser) == 0 &&
            dnnl_matmul_primitive_desc_create(&pd, Engine(), m.a, m.b, nullptr, m.c, attr) == 0 &&
            dnnl_primitive_create(&m.primitive, pd) == 0;
  if (attr) dnnl_primitive_attr_destroy(attr);
  if (!ok) return nullptr;  // (leaks the descriptors of a shape oneDNN refuses: once per shape)
  m.scratchpad = dnnl_primitive_desc_query_md(pd, kQueryScratchpadMd, 0);
  m.scratchpad_bytes = m.scratchpad ? dnnl_memory_desc_get_size(m.scratchpad) : 0;
  // The primitive descriptor stays alive: it owns the scratchpad's descriptor.
  return &plans->emplace(key, m).first->second;
}

// The three products of a head's attention, [len, head_dim] and [len, len] operands: a b^T (s = q k^T,
// dp = g v^T), a b (context = p v, dq = ds k) and a^T b (dv = p^T g, dk = ds^T q).
struct Products {
  const Matmul *abt, *ab, *atb;
};

bool GetProducts(int64_t len, int64_t head_dim, Products* p) {
  *p = {GetMatmul({len, head_dim, false, len, head_dim, true}), GetMatmul({len, len, false, len, head_dim, false}),
        GetMatmul({len, len, true, len, head_dim, false})};
  return p->abt && p->ab && p->atb;
}

// One thread's buffers and oneDNN objects: a stream, each primitive's memory objects (their data set per call).
struct Thread {
  dnnl_stream_t stream = nullptr;
  std::vector<char> scratchpad;
  std::map<const Matmul*, std::tuple<dnnl_memory_t, dnnl_memory_t, dnnl_memory_t, dnnl_memory_t>> memories;
  std::vector<float> scores, dscores;          // [len, len]
  std::vector<uint16_t> probs16, dscores16;    // [len, len] bf16
  std::vector<uint16_t> g16;                   // [len, head_dim] bf16
  std::vector<float> ctx, gh, dq, dk, dv;      // [len, head_dim] f32 (the fused-QKV entry point)
  std::vector<float> row;                      // [len + head_dim]

  bool Run(const Matmul* m, const void* a, const void* b, float* c) {
    if (stream == nullptr && dnnl_stream_create(&stream, Engine(), 1) != 0) return false;
    if (scratchpad.size() < m->scratchpad_bytes + 64) {
      scratchpad.resize(m->scratchpad_bytes + 64);
      for (auto& [plan, mems] : memories) {  // their scratchpad memories point at the old buffer
        auto [ma, mb, mc, ms] = mems;
        for (dnnl_memory_t mem : {ma, mb, mc, ms}) if (mem) dnnl_memory_destroy(mem);
      }
      memories.clear();
    }
    auto it = memories.find(m);
    if (it == memories.end()) {
      dnnl_memory_t ma = nullptr, mb = nullptr, mc = nullptr, ms = nullptr;
      if (dnnl_memory_create(&ma, m->a, Engine(), nullptr) || dnnl_memory_create(&mb, m->b, Engine(), nullptr) ||
          dnnl_memory_create(&mc, m->c, Engine(), nullptr))
        return false;
      if (m->scratchpad && dnnl_memory_create(&ms, m->scratchpad, Engine(), scratchpad.data())) return false;
      it = memories.emplace(m, std::make_tuple(ma, mb, mc, ms)).first;
    }
    auto [ma, mb, mc, ms] = it->second;
    dnnl_memory_set_data_handle(ma, const_cast<void*>(a));
    dnnl_memory_set_data_handle(mb, const_cast<void*>(b));
    dnnl_memory_set_data_handle(mc, c);
    dnnl_exec_arg_t args[4] = {{kArgSrc, ma}, {kArgWeights, mb}, {kArgDst, mc}, {kArgScratchpad, ms}};
    return dnnl_primitive_execute(m->primitive, stream, ms ? 4 : 3, args) == 0 && dnnl_stream_wait(stream) == 0;
  }
};

Thread& ThisThread(int64_t len, int64_t head_dim) {
  thread_local Thread t;
  const size_t square = len * len;
  if (t.scores.size() < square) {
    t.scores.resize(square), t.dscores.resize(square), t.probs16.resize(square), t.dscores16.resize(square);
  }
  const size_t block = len * head_dim;
  if (t.g16.size() < block) {
    t.g16.resize(block);
    for (auto* v : {&t.ctx, &t.gh, &t.dq, &t.dk, &t.dv}) v->resize(block);
  }
  if (t.row.size() < static_cast<size_t>(len + head_dim)) t.row.resize(len + head_dim);
  return t;
}

// --- AVX-512 pieces: 16 lanes, the last block of a row under a mask ---------------------------------------------

// Forward of one head: context = softmax(q k^T + bias) v, and each row's maximum and 1 / sum.
__attribute__((target("avx512f,avx512bf16,avx512vl,avx512bw"))) bool ForwardHead(
    Thread& t, const Products& mm, const uint16_t* q, const uint16_t* k, const uint16_t* v, const float* bias,
    float* context, float* peaks, float* inv_totals, int64_t len) {
  float* s = t.scores.data();
  if (!t.Run(mm.abt, q, k, s)) return false;
  for (int64_t i = 0; i < len; ++i) {
    float* row = s + i * len;
    const float* b = bias + i * len;
    __m512 peak = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < len; j += 16) {
      const __mmask16 m = Tail(len, j);
      const __m512 x = _mm512_add_ps(_mm512_maskz_loadu_ps(m, row + j), _mm512_maskz_loadu_ps(m, b + j));
      _mm512_mask_storeu_ps(row + j, m, x);
      peak = _mm512_mask_max_ps(peak, m, peak, x);
    }
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(peak));
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = 0; j < len; j += 16) {
      const __mmask16 m = Tail(len, j);
      const __m512 e = _mm512_maskz_mov_ps(m, Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + j), mx)));
      _mm512_mask_storeu_ps(row + j, m, e);
      total = _mm512_add_ps(total, e);
    }
    const float inv_total = 1.0f / _mm512_reduce_add_ps(total);
    const __m512 inv = _mm512_set1_ps(inv_total);
    uint16_t* p16 = t.probs16.data() + i * len;  // the probabilities go straight to bf16 for their product
    for (int64_t j = 0; j < len; j += 16) {
      const __mmask16 m = Tail(len, j);
      StoreBf16(p16 + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, row + j), inv));
    }
    peaks[i] = _mm512_cvtss_f32(mx);
    inv_totals[i] = inv_total;
  }
  return t.Run(mm.ab, t.probs16.data(), v, context);
}

// Backward of one head, from the forward's row statistics: p = exp(q k^T + bias - peak) / total (the forward's
// bits); dv = p^T g; dp = g v^T; ds = p * (dp - rowsum(g * context)); dq = ds k; dk = ds^T q.
__attribute__((target("avx512f,avx512bf16,avx512vl,avx512bw"))) bool BackwardHead(
    Thread& t, const Products& mm, const uint16_t* q, const uint16_t* k, const uint16_t* v, const float* bias,
    const float* context, const float* peaks, const float* inv_totals, const float* g, float* dq, float* dk,
    float* dv, int64_t len, int64_t head_dim) {
  float* s = t.scores.data();
  float* dp = t.dscores.data();
  if (!t.Run(mm.abt, q, k, s)) return false;
  for (int64_t i = 0; i < len; ++i) {
    float* row = s + i * len;
    const float* b = bias + i * len;
    const __m512 peak = _mm512_set1_ps(peaks[i]), inv = _mm512_set1_ps(inv_totals[i]);
    uint16_t* p16 = t.probs16.data() + i * len;
    for (int64_t j = 0; j < len; j += 16) {
      const __mmask16 m = Tail(len, j);
      const __m512 x = _mm512_add_ps(_mm512_maskz_loadu_ps(m, row + j), _mm512_maskz_loadu_ps(m, b + j));
      const __m512 p = _mm512_mul_ps(Exp(_mm512_sub_ps(x, peak)), inv);
      _mm512_mask_storeu_ps(row + j, m, p);  // f32 for ds, bf16 for dv's product
      StoreBf16(p16 + j, m, p);
    }
    __m512 acc = _mm512_setzero_ps();  // rowsum(g * context) = rowsum(p * dp)
    for (int64_t d = 0; d < head_dim; d += 16) {
      const __mmask16 m = Tail(head_dim, d);
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, g + i * head_dim + d),
                            _mm512_maskz_loadu_ps(m, context + i * head_dim + d), acc);
    }
    t.row[i] = _mm512_reduce_add_ps(acc);
  }
  ToBf16(g, t.g16.data(), len * head_dim);
  if (!t.Run(mm.atb, t.probs16.data(), t.g16.data(), dv) || !t.Run(mm.abt, t.g16.data(), v, dp)) return false;
  for (int64_t i = 0; i < len; ++i) {
    const __m512 r = _mm512_set1_ps(t.row[i]);
    uint16_t* ds16 = t.dscores16.data() + i * len;
    for (int64_t j = 0; j < len; j += 16) {
      const __mmask16 m = Tail(len, j);
      const __m512 ds = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, s + i * len + j),
                                      _mm512_sub_ps(_mm512_maskz_loadu_ps(m, dp + i * len + j), r));
      StoreBf16(ds16 + j, m, ds);
    }
  }
  return t.Run(mm.ab, t.dscores16.data(), k, dq) && t.Run(mm.atb, t.dscores16.data(), q, dk);
}

struct Shape {
  int64_t batch, heads, len, head_dim;
};

constexpr char kNoMatmul[] = "onednn_attention: oneDNN has no matmul for these shapes";

ffi::Error CheckBias(ffi::AnyBuffer bias, int64_t batch, int64_t len) {
  auto db = bias.dimensions();
  if (bias.element_type() != ffi::DataType::F32 || db.size() != 4 || db[0] != batch || db[1] != 1 || db[2] != len ||
      db[3] != len)
    return ffi::Error::InvalidArgument("onednn_attention: bias must be f32 [batch, 1, len, len]");
  return ffi::Error::Success();
}

ffi::Error CheckShapes(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer bias, Shape* shape) {
  auto dq = q.dimensions();
  if (dq.size() != 4) return ffi::Error::InvalidArgument("onednn_attention: q must be [batch, heads, len, dim]");
  for (ffi::AnyBuffer x : {q, k, v}) {
    if (x.element_type() != ffi::DataType::BF16) return ffi::Error::InvalidArgument("onednn_attention: q, k, v bf16");
    auto dx = x.dimensions();
    if (dx.size() != 4 || !std::equal(dx.begin(), dx.end(), dq.begin()))
      return ffi::Error::InvalidArgument("onednn_attention: q, k, v must have one shape");
  }
  *shape = {dq[0], dq[1], dq[2], dq[3]};
  return CheckBias(bias, dq[0], dq[2]);
}

// Runs `head(t, n)` for every (batch, head) n on OpenMP's threads (static schedule: each head's sums in a fixed
// order, whatever the thread), in oneDNN's turns.
template <typename F>
ffi::Error EveryHead(const Shape& s, const char* what, F head) {
  const int64_t heads = s.batch * s.heads;
  bool ok = true;
  std::lock_guard<std::mutex> lock(ExecuteTurns());
#pragma omp parallel for schedule(static) reduction(&& : ok)
  for (int64_t n = 0; n < heads; ++n) {
    if (ok) ok = head(ThisThread(s.len, s.head_dim), n);
  }
  return ok ? ffi::Error::Success() : ffi::Error::Internal(what);
}

ffi::Error Forward(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer bias,
                   ffi::Result<ffi::Buffer<ffi::F32>> context, ffi::Result<ffi::Buffer<ffi::F32>> peak,
                   ffi::Result<ffi::Buffer<ffi::F32>> inv_total) {
  Shape s;
  if (ffi::Error e = CheckShapes(q, k, v, bias, &s); e.failure()) return e;
  if (s.batch * s.heads * s.len == 0) return ffi::Error::Success();
  if (s.head_dim == 0) return ffi::Error::InvalidArgument("onednn_attention: head_dim is 0");
  const int64_t L = s.len, D = s.head_dim;
  Products mm;
  if (!GetProducts(L, D, &mm)) return ffi::Error::Internal(kNoMatmul);
  auto* pq = static_cast<const uint16_t*>(q.untyped_data());
  auto* pk = static_cast<const uint16_t*>(k.untyped_data());
  auto* pv_ = static_cast<const uint16_t*>(v.untyped_data());
  auto* pb = static_cast<const float*>(bias.untyped_data());
  float* out = context->typed_data();
  float *peaks = peak->typed_data(), *inv_totals = inv_total->typed_data();
  return EveryHead(s, "onednn_attention: oneDNN failed in the forward", [&](Thread& t, int64_t n) {
    const int64_t x = n * L * D;
    return ForwardHead(t, mm, pq + x, pk + x, pv_ + x, pb + (n / s.heads) * L * L, out + x, peaks + n * L,
                       inv_totals + n * L, L);
  });
}

ffi::Error Backward(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v, ffi::AnyBuffer bias,
                    ffi::Buffer<ffi::F32> context, ffi::Buffer<ffi::F32> peak, ffi::Buffer<ffi::F32> inv_total,
                    ffi::Buffer<ffi::F32> g,
                    ffi::Result<ffi::Buffer<ffi::F32>> dq, ffi::Result<ffi::Buffer<ffi::F32>> dk,
                    ffi::Result<ffi::Buffer<ffi::F32>> dv) {
  Shape s;
  if (ffi::Error e = CheckShapes(q, k, v, bias, &s); e.failure()) return e;
  if (s.batch * s.heads * s.len == 0) return ffi::Error::Success();
  if (s.head_dim == 0) return ffi::Error::InvalidArgument("onednn_attention: head_dim is 0");
  const int64_t L = s.len, D = s.head_dim;
  Products mm;
  if (!GetProducts(L, D, &mm)) return ffi::Error::Internal(kNoMatmul);
  auto* pq = static_cast<const uint16_t*>(q.untyped_data());
  auto* pk = static_cast<const uint16_t*>(k.untyped_data());
  auto* pv = static_cast<const uint16_t*>(v.untyped_data());
  auto* pb = static_cast<const float*>(bias.untyped_data());
  const float *pc = context.typed_data(), *pp = peak.typed_data(), *pi = inv_total.typed_data(), *pg = g.typed_data();
  float *oq = dq->typed_data(), *ok = dk->typed_data(), *ov = dv->typed_data();
  return EveryHead(s, "onednn_attention: oneDNN failed in the backward", [&](Thread& t, int64_t n) {
    const int64_t x = n * L * D;
    return BackwardHead(t, mm, pq + x, pk + x, pv + x, pb + (n / s.heads) * L * L, pc + x, pp + n * L, pi + n * L,
                        pg + x, oq + x, ok + x, ov + x, L, D);
  });
}

// --- From the fused QKV projection: RoPE, the head split and the layouts inside the kernel -----------------------
//
// qkv f32 [batch, len, 3 * heads * head_dim] (features ordered q|k|v, head, head_dim: ModernBERT's Wqkv), cos and
// sin f32 [batch, len, head_dim] (RoPE tables at each token's position, 'rotate half'), context f32
// [batch, len, heads * head_dim]: what the einsum path computes from `apply_rope`, `q * scale` and its
// transposes, without those copies. The backward returns d(qkv), RoPE's transpose applied to dq and dk, rounded to
// bf16 (nearest even): the projection's bf16 backward rounds it there anyway, so it gets the same bits and XLA's
// convert of a [batch * len, 3 * hidden] f32 cotangent (and half of its memory traffic) goes.

struct Qkv {
  int64_t batch, len, heads, head_dim;
  int64_t Row() const { return 3 * heads * head_dim; }  // qkv's row length
};

// x * cos + rotate_half(x) * sin, rotate_half(x) = (-x2, x1), for one row of `d` (even) features.
__attribute__((target("avx512f"))) inline void Rope(const float* x, const float* cos, const float* sin, float* y,
                                                   int64_t d) {
  const int64_t h = d / 2;
#pragma omp simd
  for (int64_t j = 0; j < h; ++j) y[j] = x[j] * cos[j] - x[j + h] * sin[j];
#pragma omp simd
  for (int64_t j = 0; j < h; ++j) y[j + h] = x[j + h] * cos[j + h] + x[j] * sin[j + h];
}

// RoPE's transpose: dx = dy * cos + rotate_half^T(dy * sin), rotate_half^T(z) = (z2, -z1).
__attribute__((target("avx512f"))) inline void RopeTranspose(const float* dy, const float* cos, const float* sin,
                                                            float* dx, int64_t d) {
  const int64_t h = d / 2;
#pragma omp simd
  for (int64_t j = 0; j < h; ++j) dx[j] = dy[j] * cos[j] + dy[j + h] * sin[j + h];
#pragma omp simd
  for (int64_t j = 0; j < h; ++j) dx[j + h] = dy[j + h] * cos[j + h] - dy[j] * sin[j];
}

// Head n's q (RoPE, then * scale), k (RoPE) and v in bf16 [len, head_dim] at q16, k16, v16 (the forward's outputs,
// which the backward reads again instead of gathering them a second time).
__attribute__((target("avx512f,avx512bf16,avx512vl,avx512bw"))) void GatherHead(
    Thread& t, const Qkv& s, const float* qkv, const float* cos, const float* sin, float scale, int64_t n,
    uint16_t* q16, uint16_t* k16, uint16_t* v16) {
  const int64_t b = n / s.heads, h = n % s.heads, D = s.head_dim, L = s.len;
  float* tmp = t.row.data() + L;  // [head_dim] after the row sums
  for (int64_t i = 0; i < L; ++i) {
    const float* row = qkv + (b * L + i) * s.Row() + h * D;
    const float *c = cos + (b * L + i) * D, *sn = sin + (b * L + i) * D;
    Rope(row, c, sn, tmp, D);
#pragma omp simd
    for (int64_t j = 0; j < D; ++j) tmp[j] *= scale;
    ToBf16(tmp, q16 + i * D, D);
    Rope(row + s.heads * D, c, sn, tmp, D);
    ToBf16(tmp, k16 + i * D, D);
    ToBf16(row + 2 * s.heads * D, v16 + i * D, D);
  }
}

ffi::Error CheckTables(ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin, const Qkv& s) {
  for (ffi::Buffer<ffi::F32> table : {cos, sin}) {
    auto dt = table.dimensions();
    if (dt.size() != 3 || dt[0] != s.batch || dt[1] != s.len || dt[2] != s.head_dim)
      return ffi::Error::InvalidArgument("onednn_attention: cos and sin must be [batch, len, head_dim]");
  }
  return ffi::Error::Success();
}

ffi::Error CheckQkv(ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                    ffi::AnyBuffer bias, int64_t heads, Qkv* s) {
  auto d = qkv.dimensions();
  if (d.size() != 3 || heads < 1 || d[2] % (3 * heads) || (d[2] / (3 * heads)) % 2)
    return ffi::Error::InvalidArgument(
        "onednn_attention: qkv must be [batch, len, 3 * heads * head_dim], head_dim even");
  *s = {d[0], d[1], heads, d[2] / (3 * heads)};
  if (ffi::Error e = CheckTables(cos, sin, *s); e.failure()) return e;
  return CheckBias(bias, s->batch, s->len);
}

ffi::Error QkvForward(ffi::Buffer<ffi::F32> qkv, ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                      ffi::AnyBuffer bias, ffi::Result<ffi::Buffer<ffi::F32>> context,
                      ffi::Result<ffi::Buffer<ffi::F32>> peak, ffi::Result<ffi::Buffer<ffi::F32>> inv_total,
                      ffi::Result<ffi::Buffer<ffi::BF16>> q16, ffi::Result<ffi::Buffer<ffi::BF16>> k16,
                      ffi::Result<ffi::Buffer<ffi::BF16>> v16, int64_t heads, float scale) {
  Qkv s;
  if (ffi::Error e = CheckQkv(qkv, cos, sin, bias, heads, &s); e.failure()) return e;
  if (s.batch * s.len == 0) return ffi::Error::Success();
  const int64_t L = s.len, D = s.head_dim;
  Products mm;
  if (!GetProducts(L, D, &mm)) return ffi::Error::Internal(kNoMatmul);
  const float *px = qkv.typed_data(), *pc = cos.typed_data(), *ps = sin.typed_data();
  const float* pb = static_cast<const float*>(bias.untyped_data());
  float *out = context->typed_data(), *peaks = peak->typed_data(), *inv_totals = inv_total->typed_data();
  uint16_t *oq = static_cast<uint16_t*>(q16->untyped_data()), *ok = static_cast<uint16_t*>(k16->untyped_data()),
           *ov = static_cast<uint16_t*>(v16->untyped_data());
  return EveryHead({s.batch, s.heads, L, D}, "onednn_attention: oneDNN failed in the forward",
                   [&](Thread& t, int64_t n) {
    uint16_t *q = oq + n * L * D, *k = ok + n * L * D, *v = ov + n * L * D;
    GatherHead(t, s, px, pc, ps, scale, n, q, k, v);
    float* ctx = t.ctx.data();
    if (!ForwardHead(t, mm, q, k, v, pb + (n / s.heads) * L * L, ctx, peaks + n * L, inv_totals + n * L, L))
      return false;
    const int64_t b = n / s.heads, h = n % s.heads;
    for (int64_t i = 0; i < L; ++i)
      std::memcpy(out + ((b * L + i) * s.heads + h) * D, ctx + i * D, D * sizeof(float));
    return true;
  });
}

// From the forward's bf16 q, k, v [batch, heads, len, head_dim] (RoPE applied, q scaled).
ffi::Error QkvBackward(ffi::AnyBuffer q16, ffi::AnyBuffer k16, ffi::AnyBuffer v16,
                       ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                       ffi::AnyBuffer bias, ffi::Buffer<ffi::F32> context, ffi::Buffer<ffi::F32> peak,
                       ffi::Buffer<ffi::F32> inv_total, ffi::Buffer<ffi::F32> g,
                       ffi::Result<ffi::Buffer<ffi::BF16>> dqkv, int64_t heads, float scale) {
  Shape q;
  if (ffi::Error e = CheckShapes(q16, k16, v16, bias, &q); e.failure()) return e;
  auto dout = dqkv->dimensions();
  if (q.heads != heads || dout.size() != 3 || dout[0] != q.batch || dout[1] != q.len ||
      dout[2] != 3 * heads * q.head_dim)
    return ffi::Error::InvalidArgument("onednn_attention: d(qkv) must be [batch, len, 3 * heads * head_dim]");
  const Qkv s = {q.batch, q.len, heads, q.head_dim};
  if (ffi::Error e = CheckTables(cos, sin, s); e.failure()) return e;
  if (s.batch * s.len == 0) return ffi::Error::Success();
  const int64_t L = s.len, D = s.head_dim;
  Products mm;
  if (!GetProducts(L, D, &mm)) return ffi::Error::Internal(kNoMatmul);
  const float *pc = cos.typed_data(), *ps = sin.typed_data();
  const float* pb = static_cast<const float*>(bias.untyped_data());
  auto *pq = static_cast<const uint16_t*>(q16.untyped_data()), *pk = static_cast<const uint16_t*>(k16.untyped_data()),
       *pv = static_cast<const uint16_t*>(v16.untyped_data());
  const float *pctx = context.typed_data(), *pp = peak.typed_data(), *pi = inv_total.typed_data(),
              *pg = g.typed_data();
  auto* out = static_cast<uint16_t*>(dqkv->untyped_data());
  return EveryHead({s.batch, s.heads, L, D}, "onednn_attention: oneDNN failed in the backward",
                   [&](Thread& t, int64_t n) {
    const int64_t b = n / s.heads, h = n % s.heads;
    float *ctx = t.ctx.data(), *gh = t.gh.data();  // this head's context and its cotangent, [len, head_dim]
    for (int64_t i = 0; i < L; ++i) {
      std::memcpy(ctx + i * D, pctx + ((b * L + i) * s.heads + h) * D, D * sizeof(float));
      std::memcpy(gh + i * D, pg + ((b * L + i) * s.heads + h) * D, D * sizeof(float));
    }
    float *dq = t.dq.data(), *dk = t.dk.data(), *dv = t.dv.data();
    if (!BackwardHead(t, mm, pq + n * L * D, pk + n * L * D, pv + n * L * D, pb + b * L * L, ctx, pp + n * L,
                      pi + n * L, gh, dq, dk, dv, L, D))
      return false;
    float* tmp = t.row.data() + L;  // [head_dim] after the row sums
    for (int64_t i = 0; i < L; ++i) {
      uint16_t* row = out + (b * L + i) * s.Row() + h * D;
      const float *cs = pc + (b * L + i) * D, *sn = ps + (b * L + i) * D;
#pragma omp simd
      for (int64_t j = 0; j < D; ++j) dq[i * D + j] *= scale;
      RopeTranspose(dq + i * D, cs, sn, tmp, D);
      ToBf16(tmp, row, D);
      RopeTranspose(dk + i * D, cs, sn, tmp, D);
      ToBf16(tmp, row + s.heads * D, D);
      ToBf16(dv + i * D, row + 2 * s.heads * D, D);
    }
    return true;
  });
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MlmFlaxOnednnAttentionFwd, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MlmFlaxOnednnAttentionBwd, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MlmFlaxOnednnQkvAttentionFwd, QkvForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<int64_t>("heads")
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MlmFlaxOnednnQkvAttentionBwd, QkvBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>()
                                  .Attr<int64_t>("heads")
                                  .Attr<float>("scale"));
