// The part of oneDNN's C API the kernels use (stable across oneDNN 3.x): the `onednn-cpu-gomp` wheel ships the
// library without headers. Shared by `onednn_matmul.cc` and `onednn_attention.cc`.
#ifndef MLM_FLAX_ONEDNN_API_H_
#define MLM_FLAX_ONEDNN_API_H_

#include <cstddef>
#include <cstdint>
#include <mutex>

extern "C" {
typedef int dnnl_status_t;  // dnnl_success = 0
typedef struct dnnl_engine* dnnl_engine_t;
typedef struct dnnl_stream* dnnl_stream_t;
typedef struct dnnl_memory_desc* dnnl_memory_desc_t;
typedef struct dnnl_memory* dnnl_memory_t;
typedef struct dnnl_primitive_desc* dnnl_primitive_desc_t;
typedef struct dnnl_primitive* dnnl_primitive_t;
typedef struct dnnl_primitive_attr* dnnl_primitive_attr_t;
typedef int64_t dnnl_dims_t[12];
typedef struct { int arg; dnnl_memory_t memory; } dnnl_exec_arg_t;
dnnl_status_t dnnl_engine_create(dnnl_engine_t*, int kind, size_t index);
dnnl_status_t dnnl_stream_create(dnnl_stream_t*, dnnl_engine_t, unsigned flags);
dnnl_status_t dnnl_stream_wait(dnnl_stream_t);
dnnl_status_t dnnl_stream_destroy(dnnl_stream_t);
dnnl_status_t dnnl_memory_desc_create_with_strides(dnnl_memory_desc_t*, int ndims, const dnnl_dims_t dims,
                                                   int data_type, const dnnl_dims_t strides);
dnnl_status_t dnnl_memory_desc_destroy(dnnl_memory_desc_t);
size_t dnnl_memory_desc_get_size(const void* memory_desc);
dnnl_status_t dnnl_matmul_primitive_desc_create(dnnl_primitive_desc_t*, dnnl_engine_t, const void* src,
                                                const void* weights, const void* bias, const void* dst,
                                                const void* attr);
dnnl_status_t dnnl_primitive_desc_destroy(dnnl_primitive_desc_t);
const void* dnnl_primitive_desc_query_md(const void* primitive_desc, int what, int index);
dnnl_status_t dnnl_primitive_create(dnnl_primitive_t*, const void* primitive_desc);
dnnl_status_t dnnl_memory_create(dnnl_memory_t*, const void* memory_desc, dnnl_engine_t, void* handle);
dnnl_status_t dnnl_memory_set_data_handle(dnnl_memory_t, void* handle);
dnnl_status_t dnnl_memory_destroy(dnnl_memory_t);
dnnl_status_t dnnl_primitive_execute(const void* primitive, dnnl_stream_t, int nargs, const dnnl_exec_arg_t* args);
dnnl_status_t dnnl_primitive_attr_create(dnnl_primitive_attr_t*);
dnnl_status_t dnnl_primitive_attr_destroy(dnnl_primitive_attr_t);
dnnl_status_t dnnl_primitive_attr_set_scratchpad_mode(dnnl_primitive_attr_t, int mode);
}

namespace mlm_flax {
constexpr int kCpu = 1, kBf16 = 2, kF32 = 3;                                  // dnnl_cpu, dnnl_bf16, dnnl_f32
constexpr int kArgSrc = 1, kArgDst = 17, kArgWeights = 33, kArgScratchpad = 80;  // DNNL_ARG_*
constexpr int kScratchpadUser = 1, kQueryScratchpadMd = 136;  // dnnl_scratchpad_mode_user, dnnl_query_scratchpad_md

// A [batch, rows, cols] descriptor of a row-major [batch, r, c] buffer, read transposed when `transpose`; 2-D
// when there is one batch: oneDNN 3.2 runs a 2-D matmul on its AMX kernels (brgemm), the same matmul described
// in 3-D on its slower `gemm:jit`. nullptr when oneDNN refuses it.
inline dnnl_memory_desc_t Desc(int64_t batch, int64_t r, int64_t c, bool transpose, int dtype) {
  dnnl_dims_t dims = {batch, transpose ? c : r, transpose ? r : c};
  dnnl_dims_t strides = {r * c, transpose ? 1 : c, transpose ? c : 1};
  const int skip = batch == 1 ? 1 : 0;
  dnnl_memory_desc_t md = nullptr;
  return dnnl_memory_desc_create_with_strides(&md, 3 - skip, dims + skip, dtype, strides + skip) == 0 ? md : nullptr;
}

// The process's oneDNN CPU engine (nullptr when oneDNN has none), and the turns oneDNN executions take: every
// kernel uses all cores through oneDNN's or its own OpenMP threads, and XLA runs independent ops at once.
dnnl_engine_t Engine();
std::mutex& ExecuteTurns();
}  // namespace mlm_flax

#endif  // MLM_FLAX_ONEDNN_API_H_
