// XLA FFI handlers for CPU: LayerNorm / RMSNorm over the last axis of f32 rows, forward and backward, each row
// in one pass while it is in cache. Built with the oneDNN kernels by `onednn.py`; called where the CPU has AVX-512
// (`onednn.norm_enabled`).
//
// Why: as XLA ops, a norm was ~6 fusions forward and backward, its row statistics and parameter gradients
// reductions that ran at a fraction of memory speed (28 row reductions and 8 column sums: ~8 ms of the quick
// start's step). Numerics are `layers._norm`'s: statistics in f32 from one pass (var = E[x^2] - E[x]^2),
// 1 / sqrt(var + eps), the closed-form backward; sums run in another order.
//
// Parameter gradients sum over rows in fixed blocks of kBlock rows, then over the blocks in order: the same bits
// whatever the number of threads.
#include <immintrin.h>
#include <omp.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <mutex>
#include <vector>

#include "onednn_api.h"
#include "xla/ffi/api/ffi.h"

namespace {
namespace ffi = xla::ffi;
constexpr int64_t kBlock = 32;
// Rows ahead that the backward prefetches x for: the forward's input, out of cache by the backward (~1.5% of the
// quick start's bf16 step on AMD EPYC, `experiments/benchmarks/README.md`).
constexpr int64_t kAhead = 2;

struct Rows {
  int64_t rows, width;
};

ffi::Error CheckRows(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale, Rows* r) {
  auto dims = x.dimensions();
  if (dims.size() < 1) return ffi::Error::InvalidArgument("cpu_norm: x must have a feature axis");
  int64_t width = dims.back(), rows = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) rows *= dims[i];
  if (scale.dimensions().size() != 1 || scale.dimensions()[0] != width)
    return ffi::Error::InvalidArgument("cpu_norm: scale must be [features]");
  *r = {rows, width};
  return ffi::Error::Success();
}

// One row: y = norm(x) with its mean and 1 / std; with `delta`, of x + delta, that sum written to `sum_out` (the
// residual stream's add before a pre-LN norm, in the same pass).
__attribute__((target("avx512f"))) void ForwardRow(const float* x, const float* delta, const float* scale,
                                                   const float* bias, float* sum_out, float* y, float* mean_out,
                                                   float* rstd_out, int64_t n, float epsilon, bool center) {
  if (delta) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) sum_out[j] = x[j] + delta[j];
    x = sum_out;
  }
  float sum = 0.0f, sum2 = 0.0f;
#pragma omp simd reduction(+ : sum, sum2)
  for (int64_t j = 0; j < n; ++j) sum += x[j], sum2 += x[j] * x[j];
  const float mean2 = sum2 / n;
  const float mean = center ? sum / n : 0.0f;
  const float var = center ? std::fmax(mean2 - mean * mean, 0.0f) : mean2;
  const float rstd = 1.0f / std::sqrt(var + epsilon);
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) y[j] = (x[j] - mean) * rstd * scale[j] + bias[j];
  *mean_out = mean, *rstd_out = rstd;
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> bias,
                   ffi::Result<ffi::Buffer<ffi::F32>> y, ffi::Result<ffi::Buffer<ffi::F32>> mean,
                   ffi::Result<ffi::Buffer<ffi::F32>> rstd, float epsilon, bool center) {
  Rows r;
  if (ffi::Error e = CheckRows(x, scale, &r); e.failure()) return e;
  const float *px = x.typed_data(), *ps = scale.typed_data(), *pb = bias.typed_data();
  float *py = y->typed_data(), *pm = mean->typed_data(), *pr = rstd->typed_data();
  const int64_t n = r.width;
  std::lock_guard<std::mutex> lock(mlm_flax::ExecuteTurns());  // all cores: not beside a oneDNN call
#pragma omp parallel for schedule(static) if (r.rows * n >= 16384)
  for (int64_t i = 0; i < r.rows; ++i)
    ForwardRow(px + i * n, nullptr, ps, pb, nullptr, py + i * n, pm + i, pr + i, n, epsilon, center);
  return ffi::Error::Success();
}

// s = x + delta and y = norm(s), each row in one pass.
ffi::Error AddForward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> delta, ffi::Buffer<ffi::F32> scale,
                      ffi::Buffer<ffi::F32> bias, ffi::Result<ffi::Buffer<ffi::F32>> sum,
                      ffi::Result<ffi::Buffer<ffi::F32>> y, ffi::Result<ffi::Buffer<ffi::F32>> mean,
                      ffi::Result<ffi::Buffer<ffi::F32>> rstd, float epsilon, bool center) {
  Rows r;
  if (ffi::Error e = CheckRows(x, scale, &r); e.failure()) return e;
  if (delta.element_count() != x.element_count())
    return ffi::Error::InvalidArgument("cpu_norm: x and delta must have one shape");
  const float *px = x.typed_data(), *pd = delta.typed_data(), *ps = scale.typed_data(), *pb = bias.typed_data();
  float *psum = sum->typed_data(), *py = y->typed_data(), *pm = mean->typed_data(), *pr = rstd->typed_data();
  const int64_t n = r.width;
  std::lock_guard<std::mutex> lock(mlm_flax::ExecuteTurns());
#pragma omp parallel for schedule(static) if (r.rows * n >= 16384)
  for (int64_t i = 0; i < r.rows; ++i)
    ForwardRow(px + i * n, pd + i * n, ps, pb, psum + i * n, py + i * n, pm + i, pr + i, n, epsilon, center);
  return ffi::Error::Success();
}

// dx = (g scale - xhat mean(g scale xhat) [- mean(g scale)]) rstd [+ skip] for the rows [begin, end), and that
// block's sums of g xhat and g into dscale, dbias. `skip` (or null): the cotangent the sum x also gets from the
// residual stream, added as XLA's add of the two would.
__attribute__((target("avx512f"))) void BackwardBlock(const float* x, const float* mean, const float* rstd,
                                                      const float* scale, const float* g, const float* skip,
                                                      float* dx, float* dscale, float* dbias, int64_t begin,
                                                      int64_t end, int64_t n, bool center) {
  for (int64_t j = 0; j < n; ++j) dscale[j] = 0.0f, dbias[j] = 0.0f;
  for (int64_t i = begin; i < end; ++i) {
    const float *xi = x + i * n, *gi = g + i * n;
    if (i + kAhead < end)
      for (int64_t j = 0; j < n; j += 16) _mm_prefetch(reinterpret_cast<const char*>(xi + kAhead * n + j), _MM_HINT_T0);
    const float m = mean[i], s = rstd[i];
    float a = 0.0f, b = 0.0f;  // sum(gy xhat), sum(gy)
#pragma omp simd reduction(+ : a, b)
    for (int64_t j = 0; j < n; ++j) {
      const float xhat = (xi[j] - m) * s, gy = gi[j] * scale[j];
      a += gy * xhat, b += gy;
      dscale[j] += gi[j] * xhat, dbias[j] += gi[j];
    }
    const float ma = a / n, mb = center ? b / n : 0.0f;
    float* di = dx + i * n;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) di[j] = (gi[j] * scale[j] - (xi[j] - m) * s * ma - mb) * s;
    if (skip) {
      const float* ki = skip + i * n;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) di[j] = ki[j] + di[j];
    }
  }
}

ffi::Error BackwardWith(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd,
                        ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> g, const float* skip,
                        ffi::Result<ffi::Buffer<ffi::F32>> dx, ffi::Result<ffi::Buffer<ffi::F32>> dscale,
                        ffi::Result<ffi::Buffer<ffi::F32>> dbias, bool center) {
  Rows r;
  if (ffi::Error e = CheckRows(x, scale, &r); e.failure()) return e;
  const int64_t n = r.width, blocks = (r.rows + kBlock - 1) / kBlock;
  std::vector<float> partial(2 * std::max<int64_t>(blocks, 1) * n, 0.0f);  // [blocks, 2, n]
  const float *px = x.typed_data(), *pm = mean.typed_data(), *pr = rstd.typed_data(), *ps = scale.typed_data(),
              *pg = g.typed_data();
  float* pdx = dx->typed_data();
  std::lock_guard<std::mutex> lock(mlm_flax::ExecuteTurns());  // all cores: not beside a oneDNN call
#pragma omp parallel for schedule(static) if (r.rows * n >= 16384)
  for (int64_t k = 0; k < blocks; ++k) {
    float* p = partial.data() + 2 * k * n;
    BackwardBlock(px, pm, pr, ps, pg, skip, pdx, p, p + n, k * kBlock, std::min(r.rows, (k + 1) * kBlock), n,
                  center);
  }
  float *ds = dscale->typed_data(), *db = dbias->typed_data();
  for (int64_t j = 0; j < n; ++j) ds[j] = 0.0f, db[j] = 0.0f;
  for (int64_t k = 0; k < blocks; ++k) {  // blocks in order: deterministic
    const float* p = partial.data() + 2 * k * n;
    for (int64_t j = 0; j < n; ++j) ds[j] += p[j], db[j] += p[n + j];
  }
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd,
                    ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> g, ffi::Result<ffi::Buffer<ffi::F32>> dx,
                    ffi::Result<ffi::Buffer<ffi::F32>> dscale, ffi::Result<ffi::Buffer<ffi::F32>> dbias,
                    bool center) {
  return BackwardWith(x, mean, rstd, scale, g, nullptr, dx, dscale, dbias, center);
}

// The backward of AddForward: d(s) = skip + the norm's dx, where skip is s's cotangent from the residual stream.
ffi::Error AddBackward(ffi::Buffer<ffi::F32> sum, ffi::Buffer<ffi::F32> mean, ffi::Buffer<ffi::F32> rstd,
                       ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> skip,
                       ffi::Result<ffi::Buffer<ffi::F32>> dsum, ffi::Result<ffi::Buffer<ffi::F32>> dscale,
                       ffi::Result<ffi::Buffer<ffi::F32>> dbias, bool center) {
  if (skip.element_count() != sum.element_count() || g.element_count() != sum.element_count())
    return ffi::Error::InvalidArgument("cpu_norm: the sum, g and skip must have one shape");
  return BackwardWith(sum, mean, rstd, scale, g, skip.typed_data(), dsum, dscale, dbias, center);
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MlmFlaxCpuNormFwd, Forward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("epsilon")
                                  .Attr<bool>("center"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MlmFlaxCpuNormBwd, Backward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("center"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MlmFlaxCpuAddNormFwd, AddForward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("epsilon")
                                  .Attr<bool>("center"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MlmFlaxCpuAddNormBwd, AddBackward,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("center"));
