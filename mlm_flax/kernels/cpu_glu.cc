// XLA FFI handlers for CPU: GeGLU's activation, gelu(input) * gate, from the f32 output h = [input | gate] of the
// MLP's first matmul to the bf16 operand of its second, and back: d(h) in bf16 for the first matmul's gradients.
// Built with the oneDNN kernels by `onednn.py`; called through `onednn.gelu_glu` (AVX512-BF16 CPUs).
//
// Why: as XLA ops, a GeGLU layer was ~8 fusions (the activation and its products, the gate's and the input's
// gradients, their concatenation, and three f32 <-> bf16 converts of [tokens, 2 * intermediate]): ~1 ms per
// layer of the quick start's step. Here each direction reads h once and writes the bf16 operand the next matmul
// reads. Numerics are the XLA path's (`layers.mlp` with `jax.nn.gelu(approximate=False)`: 0.5 x erfc(-x / sqrt
// 2)): f32 arithmetic, erfc as XLA expands it (Cephes' polynomials), exp as a polynomial (~1 ulp), one rounding to
// bf16 (nearest even) at the end; agreement to rounding, not bit for bit.
#include <cstdint>

#include "cpu_parallel.h"
#include "cpu_simd.h"
#include "xla/ffi/api/ffi.h"

namespace {
namespace ffi = xla::ffi;
using namespace mlm_flax;  // NOLINT: the SIMD helpers

constexpr int64_t kRows = 64;  // rows per chunk of the parallel loop
// Rows ahead of the one it computes that the backward prefetches h for. The backward's h is the forward's, out
// of cache by then; its loop does enough arithmetic per load (erfc, exp, a division) that the CPU's own
// prefetching left it waiting on h (75% of its samples on two loads, in the quick start's step): prefetched, the
// step runs ~3% faster (AMD EPYC, `experiments/benchmarks/README.md`).
constexpr int64_t kAhead = 2;
constexpr float kSqrtHalf = 0.70710678118654752f, kInvSqrt2Pi = 0.39894228040143268f;

struct Glu {
  int64_t rows, width;  // width: the intermediate size (h has 2 * width features)
};

ffi::Error CheckGlu(ffi::Buffer<ffi::F32> h, Glu* g) {
  auto dims = h.dimensions();
  if (dims.size() != 2 || dims[1] % 2) return ffi::Error::InvalidArgument("cpu_glu: h must be [rows, 2 * width]");
  *g = {dims[0], dims[1] / 2};
  return ffi::Error::Success();
}

// y = gelu(a) * b = a erfc(-a / sqrt 2) / 2 * b for one row of `n` features.
__attribute__((target("avx512f,avx512bf16,avx512vl,avx512bw"))) void ForwardRow(const float* a, const float* b,
                                                                                uint16_t* y, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = Tail(n, j);
    const __m512 x = _mm512_maskz_loadu_ps(m, a + j);
    const __m512 cdf = _mm512_mul_ps(Erfc(_mm512_mul_ps(x, _mm512_set1_ps(-kSqrtHalf))), _mm512_set1_ps(0.5f));
    const __m512 gelu = _mm512_mul_ps(x, cdf);
    StoreBf16(y + j, m, _mm512_mul_ps(gelu, _mm512_maskz_loadu_ps(m, b + j)));
  }
}

// d(a) = dy b gelu'(a), gelu'(a) = erfc(-a / sqrt 2) / 2 + a exp(-a^2 / 2) / sqrt(2 pi); d(b) = dy gelu(a).
// `next`: a later row of h (2n features) to fetch into cache meanwhile, or null.
__attribute__((target("avx512f,avx512bf16,avx512vl,avx512bw"))) void BackwardRow(const float* a, const float* b,
                                                                                 const float* dy, uint16_t* da,
                                                                                 uint16_t* db, int64_t n,
                                                                                 const float* next) {
  for (int64_t j = 0; j < n; j += 16) {
    if (next) {
      _mm_prefetch(reinterpret_cast<const char*>(next + j), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(next + n + j), _MM_HINT_T0);
    }
    const __mmask16 m = Tail(n, j);
    const __m512 x = _mm512_maskz_loadu_ps(m, a + j), g = _mm512_maskz_loadu_ps(m, dy + j);
    const __m512 u = _mm512_mul_ps(x, _mm512_set1_ps(kSqrtHalf));
    const __m512 cdf = _mm512_mul_ps(Erfc(_mm512_sub_ps(_mm512_setzero_ps(), u)), _mm512_set1_ps(0.5f));
    const __m512 pdf = _mm512_mul_ps(Exp(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_mul_ps(u, u))),
                                     _mm512_set1_ps(kInvSqrt2Pi));
    const __m512 slope = _mm512_fmadd_ps(x, pdf, cdf);
    StoreBf16(da + j, m, _mm512_mul_ps(_mm512_mul_ps(g, _mm512_maskz_loadu_ps(m, b + j)), slope));
    StoreBf16(db + j, m, _mm512_mul_ps(g, _mm512_mul_ps(x, cdf)));
  }
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h, ffi::Result<ffi::Buffer<ffi::BF16>> y) {
  Glu s;
  if (ffi::Error e = CheckGlu(h, &s); e.failure()) return e;
  auto dy = y->dimensions();
  if (dy.size() != 2 || dy[0] != s.rows || dy[1] != s.width)
    return ffi::Error::InvalidArgument("cpu_glu: y must be [rows, width]");
  const float* ph = h.typed_data();
  uint16_t* py = y->typed_data();
  const int64_t n = s.width;
  ParallelFor(pool, s.rows, kRows, [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) ForwardRow(ph + 2 * i * n, ph + (2 * i + 1) * n, py + i * n, n);
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> h, ffi::Buffer<ffi::F32> dy,
                    ffi::Result<ffi::Buffer<ffi::BF16>> dh) {
  Glu s;
  if (ffi::Error e = CheckGlu(h, &s); e.failure()) return e;
  auto dg = dy.dimensions();
  if (dg.size() != 2 || dg[0] != s.rows || dg[1] != s.width)
    return ffi::Error::InvalidArgument("cpu_glu: dy must be [rows, width]");
  const float *ph = h.typed_data(), *pg = dy.typed_data();
  uint16_t* pd = dh->typed_data();
  const int64_t n = s.width, rows = s.rows;
  ParallelFor(pool, s.rows, kRows, [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      BackwardRow(ph + 2 * i * n, ph + (2 * i + 1) * n, pg + i * n, pd + 2 * i * n, pd + (2 * i + 1) * n, n,
                  i + kAhead < rows ? ph + 2 * (i + kAhead) * n : nullptr);
  });
  return ffi::Error::Success();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MlmFlaxCpuGeluGluFwd, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MlmFlaxCpuGeluGluBwd, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::BF16>>());
