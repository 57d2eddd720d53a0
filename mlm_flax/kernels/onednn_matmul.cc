// An XLA FFI handler for CPU: out[f32] = op(a) @ op(b) (op: an optional transpose of the last two axes), for 2-D
// or 3-D (batched) bf16 or f32 operands, by oneDNN's matmul: its AMX / AVX512-BF16 kernels (brgemm) where the CPU
// has them. Built and loaded by `onednn.py`.
//
// Transposed operands are read in place through strides; oneDNN 3.2 takes brgemm only for dense operands, so a
// call is one matmul over whole buffers, threaded by oneDNN (OpenMP). Cutting it into blocks run on XLA's
// intra-op pool, single-threaded each, made strided blocks that oneDNN ran on its slower `gemm:jit` (2x slower in
// the quick start's step).
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>

#include "onednn_api.h"
#include "xla/ffi/api/ffi.h"

namespace {
namespace ffi = xla::ffi;
using namespace mlm_flax;  // NOLINT: the oneDNN constants

// One matmul primitive per (shapes, transposes, dtype), with the memory descriptors it runs on.
struct Plan {
  dnnl_primitive_t primitive = nullptr;
  dnnl_memory_desc_t src = nullptr, weights = nullptr, dst = nullptr;
};

struct State {
  std::mutex mutex;
  std::map<std::tuple<int64_t, int64_t, int64_t, int64_t, bool, bool, int>, Plan> plans;
};

State& state() {
  static State* s = new State();  // never destroyed: plans outlive every computation
  return *s;
}
}  // namespace

namespace mlm_flax {
dnnl_engine_t Engine() {
  static dnnl_engine_t engine = [] {
    dnnl_engine_t e = nullptr;
    return dnnl_engine_create(&e, kCpu, 0) == 0 ? e : nullptr;
  }();
  return engine;
}

std::mutex& ExecuteTurns() {
  // Two oneDNN matmuls at once gave wrong results (most likely the library-managed scratchpad, e.g. the packed
  // weights, which the wheel's build shares between primitives). XLA runs independent ops concurrently (a
  // layer's two cotangent dots), so executions take turns; each already has all cores through OpenMP threads.
  // tests/test_kernels.py trains three steps against XLA's dots: without the turns its gradients were 23x off.
  static std::mutex* turns = new std::mutex();
  return *turns;
}
}  // namespace mlm_flax

namespace {
ffi::Error Matmul(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::Buffer<ffi::F32>> out, bool trans_a,
                  bool trans_b) {
  auto da = a.dimensions(), db = b.dimensions();
  if (da.size() != db.size() || (da.size() != 2 && da.size() != 3))
    return ffi::Error::InvalidArgument("onednn_matmul: operands must both be 2-D or both 3-D");
  if (a.element_type() != b.element_type())
    return ffi::Error::InvalidArgument("onednn_matmul: operands must have one dtype");
  int dtype;
  if (a.element_type() == ffi::DataType::BF16) dtype = kBf16;
  else if (a.element_type() == ffi::DataType::F32) dtype = kF32;
  else return ffi::Error::InvalidArgument("onednn_matmul: operands must be bf16 or f32");
  const size_t n = da.size();
  const int64_t batch = n == 3 ? da[0] : 1;
  if (n == 3 && db[0] != batch) return ffi::Error::InvalidArgument("onednn_matmul: batch sizes differ");
  const int64_t ar = da[n - 2], ac = da[n - 1], br = db[n - 2], bc = db[n - 1];
  const int64_t m = trans_a ? ac : ar, k = trans_a ? ar : ac, kb = trans_b ? bc : br, cols = trans_b ? br : bc;
  if (k != kb) return ffi::Error::InvalidArgument("onednn_matmul: contracted sizes differ");
  if (batch * m * cols == 0) return ffi::Error::Success();
  if (k == 0) {  // an empty sum
    std::memset(out->untyped_data(), 0, sizeof(float) * batch * m * cols);
    return ffi::Error::Success();
  }
  dnnl_engine_t engine = Engine();
  if (engine == nullptr) return ffi::Error::Internal("onednn_matmul: no oneDNN CPU engine");
  State& s = state();
  Plan plan;
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    auto key = std::make_tuple(batch, m, k, cols, trans_a, trans_b, dtype);
    auto it = s.plans.find(key);
    if (it == s.plans.end()) {
      Plan p;
      p.src = Desc(batch, ar, ac, trans_a, dtype);
      p.weights = Desc(batch, br, bc, trans_b, dtype);
      p.dst = Desc(batch, m, cols, false, kF32);
      dnnl_primitive_desc_t pd = nullptr;
      if (!p.src || !p.weights || !p.dst ||
          dnnl_matmul_primitive_desc_create(&pd, engine, p.src, p.weights, nullptr, p.dst, nullptr) != 0 ||
          dnnl_primitive_create(&p.primitive, pd) != 0) {
        if (pd) dnnl_primitive_desc_destroy(pd);
        for (dnnl_memory_desc_t md : {p.src, p.weights, p.dst}) if (md) dnnl_memory_desc_destroy(md);
        return ffi::Error::Internal("onednn_matmul: oneDNN has no matmul for these operands");
      }
      dnnl_primitive_desc_destroy(pd);
      it = s.plans.emplace(key, p).first;
    }
    plan = it->second;
  }
  thread_local dnnl_stream_t stream = nullptr;  // in order (flag 1), one per calling thread
  if (stream == nullptr && dnnl_stream_create(&stream, engine, 1) != 0) stream = nullptr;
  dnnl_memory_t ma = nullptr, mb = nullptr, mc = nullptr;
  bool ok = stream != nullptr &&
            dnnl_memory_create(&ma, plan.src, engine, a.untyped_data()) == 0 &&
            dnnl_memory_create(&mb, plan.weights, engine, b.untyped_data()) == 0 &&
            dnnl_memory_create(&mc, plan.dst, engine, out->untyped_data()) == 0;
  if (ok) {
    dnnl_exec_arg_t args[3] = {{kArgSrc, ma}, {kArgWeights, mb}, {kArgDst, mc}};
    std::lock_guard<std::mutex> lock(ExecuteTurns());
    ok = dnnl_primitive_execute(plan.primitive, stream, 3, args) == 0 && dnnl_stream_wait(stream) == 0;
  }
  for (dnnl_memory_t mem : {ma, mb, mc}) if (mem) dnnl_memory_destroy(mem);
  return ok ? ffi::Error::Success() : ffi::Error::Internal("onednn_matmul: oneDNN failed to run the matmul");
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MlmFlaxOnednnMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b"));
