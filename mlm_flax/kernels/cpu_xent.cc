// XLA FFI handlers for CPU: the MLM loss's softmax cross-entropy and the accuracy metric's argmax over f32 logits
// [rows, vocab], each row in one pass each way. Built with the oneDNN kernels by `onednn.py`; called through
// `onednn.cross_entropy_argmax` (`mlm.prediction_sums` in a bf16 model on an AVX512-BF16 CPU).
//
// Why: as XLA ops the loss and the metric were ~8 fusions over the [predictions, vocab] logits (a maximum, an
// index reduction materialised as s32, exp and its sum, the take, the backward's select and exp): ~1.5 ms of the
// quick start's ~47 ms bf16 step on AMD EPYC. Numerics are `mlm.cross_entropy`'s formulas in f32 (exp as a
// polynomial, ~1 ulp, and sums in another order: agreement to rounding) and `mlm.argmax`'s index exactly (the
// first maximum; the first NaN where there is one). Rows with a NaN or an infinite maximum take a scalar path
// with the same IEEE semantics as XLA's ops (NaN loss).
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>

#include "cpu_simd.h"
#include "onednn_api.h"
#include "xla/ffi/api/ffi.h"

namespace {
namespace ffi = xla::ffi;
using namespace mlm_flax;  // NOLINT: the SIMD helpers

struct Stats {
  float ce, peak, total;
  int32_t best;
};

// The scalar row: x - peak, exp, sum, log, as the XLA path's ops compute them (NaNs and infinities included).
Stats ScalarRow(const float* x, int64_t n, int64_t target) {
  float peak = -std::numeric_limits<float>::infinity();
  int32_t best = static_cast<int32_t>(n), nan = -1;
  for (int64_t j = 0; j < n; ++j) {
    if (std::isnan(x[j])) {
      if (nan < 0) nan = static_cast<int32_t>(j);
    } else if (x[j] > peak) {
      peak = x[j];
    }
  }
  if (nan >= 0) {
    peak = std::numeric_limits<float>::quiet_NaN(), best = nan;
  } else {
    for (int64_t j = 0; j < n; ++j)
      if (x[j] == peak) { best = static_cast<int32_t>(j); break; }
  }
  float total = 0.0f;
  for (int64_t j = 0; j < n; ++j) total += std::exp(x[j] - peak);
  const float at = target >= 0 && target < n ? x[target] - peak : std::numeric_limits<float>::quiet_NaN();
  return {-(at - std::log(total)), peak, total, best};
}

__attribute__((target("avx512f"))) Stats ForwardRow(const float* x, int64_t n, int64_t target) {
  __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __mmask16 nan = 0;
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = Tail(n, j);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + j);
    nan |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
    mx = _mm512_mask_max_ps(mx, m, mx, v);
  }
  const float peak = _mm512_reduce_max_ps(mx);
  if (nan || !std::isfinite(peak)) return ScalarRow(x, n, target);
  const __m512 p = _mm512_set1_ps(peak);
  int32_t best = static_cast<int32_t>(n);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 hit = _mm512_mask_cmp_ps_mask(Tail(n, j), _mm512_maskz_loadu_ps(Tail(n, j), x + j), p,
                                                  _CMP_EQ_OQ);
    if (hit) { best = static_cast<int32_t>(j + __builtin_ctz(hit)); break; }
  }
  __m512 sum = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = Tail(n, j);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + j), p))));
  }
  const float total = _mm512_reduce_add_ps(sum);
  const float at = target >= 0 && target < n ? x[target] - peak : std::numeric_limits<float>::quiet_NaN();
  return {-(at - std::log(total)), peak, total, best};
}

// d = [j == target] (-g) + (g / total) exp(x - peak): the XLA path's closed form, term for term.
__attribute__((target("avx512f"))) void BackwardRow(const float* x, int64_t n, int64_t target, float peak,
                                                    float total, float g, float* d) {
  const float scale = g / total;
  if (!std::isfinite(peak) || !std::isfinite(total)) {
    for (int64_t j = 0; j < n; ++j) d[j] = (j == target ? -g : 0.0f) + scale * std::exp(x[j] - peak);
    return;
  }
  const __m512 p = _mm512_set1_ps(peak), s = _mm512_set1_ps(scale);
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = Tail(n, j);
    const __m512 e = _mm512_mul_ps(s, Exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + j), p)));
    _mm512_mask_storeu_ps(d + j, m, e);
  }
  if (target >= 0 && target < n) d[target] = -g + d[target];
}

ffi::Error CheckRows(ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::S32> targets, int64_t* rows, int64_t* n) {
  auto dims = logits.dimensions();
  if (dims.size() < 1) return ffi::Error::InvalidArgument("cpu_xent: logits must have a vocabulary axis");
  *n = dims.back(), *rows = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) *rows *= dims[i];
  if (static_cast<int64_t>(targets.element_count()) != *rows)
    return ffi::Error::InvalidArgument("cpu_xent: one target per row of logits");
  return ffi::Error::Success();
}

ffi::Error Forward(ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::S32> targets, ffi::Result<ffi::Buffer<ffi::F32>> ce,
                   ffi::Result<ffi::Buffer<ffi::S32>> best, ffi::Result<ffi::Buffer<ffi::F32>> peak,
                   ffi::Result<ffi::Buffer<ffi::F32>> total) {
  int64_t rows, n;
  if (ffi::Error e = CheckRows(logits, targets, &rows, &n); e.failure()) return e;
  const float* x = logits.typed_data();
  const int32_t* t = targets.typed_data();
  float *pce = ce->typed_data(), *pp = peak->typed_data(), *pt = total->typed_data();
  int32_t* pb = best->typed_data();
  std::lock_guard<std::mutex> lock(ExecuteTurns());  // all cores: not beside a oneDNN call
#pragma omp parallel for schedule(static) if (rows * n >= 16384)
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t target = t[i] < 0 ? t[i] + n : t[i];
    const Stats s = ForwardRow(x + i * n, n, target);
    pce[i] = s.ce, pb[i] = s.best, pp[i] = s.peak, pt[i] = s.total;
  }
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::S32> targets, ffi::Buffer<ffi::F32> peak,
                    ffi::Buffer<ffi::F32> total, ffi::Buffer<ffi::F32> g, ffi::Result<ffi::Buffer<ffi::F32>> d) {
  int64_t rows, n;
  if (ffi::Error e = CheckRows(logits, targets, &rows, &n); e.failure()) return e;
  const float *x = logits.typed_data(), *pp = peak.typed_data(), *pt = total.typed_data(), *pg = g.typed_data();
  const int32_t* t = targets.typed_data();
  float* pd = d->typed_data();
  std::lock_guard<std::mutex> lock(ExecuteTurns());
#pragma omp parallel for schedule(static) if (rows * n >= 16384)
  for (int64_t i = 0; i < rows; ++i)
    BackwardRow(x + i * n, n, t[i] < 0 ? t[i] + n : t[i], pp[i], pt[i], pg[i], pd + i * n);
  return ffi::Error::Success();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MlmFlaxCpuXentFwd, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MlmFlaxCpuXentBwd, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
