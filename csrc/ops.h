// Declarations of d2nwg's compiled ops. Each op's CPU and CUDA files implement these;
// registration.cpp binds them to the schemas of the `d2nwg` torch.library namespace.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

namespace d2nwg {

// ---- chunk tokenization (mirrors kernels/tokenize.py; reference in d2nwg/ops/tokenize_op.py) ----
// Dtype codes of the multi-tensor work tables: float32, float16, bfloat16, float64.
enum DtypeCode : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };
// The code of t's dtype; throws naming what[index] for any other dtype.
int32_t dtype_code(const at::Tensor& t, const char* what, int64_t index);
// The shape of one tokenize_ / detokenize_ call as its check found it: N models of S segments
// (the list holds N*S tensors, model-major), token rows of R = T*C elements. Returned by the
// checks so that every backend reads the shape the checks validated, from one place.
struct TokenizeShape {
  int64_t N, S, R;
};
// Every argument of tokenize_ / detokenize_, checked once for all backends (tokenize_cpu.cpp):
// rows [N, T*C] contiguous on `device`, one list entry per segment, N*S tensors, contiguous,
// on the rows' device, fitting their spans, and the spans tiling the row.
TokenizeShape check_tokenize_args(const at::Tensor& out, at::TensorList sources,
                                  c10::ArrayRef<int64_t> offsets, c10::ArrayRef<int64_t> spans,
                                  size_t num_shift, size_t num_rscale, c10::DeviceType device);
TokenizeShape check_detokenize_args(const at::Tensor& tokens, at::TensorList dests,
                                    c10::ArrayRef<int64_t> offsets, size_t num_unshift,
                                    size_t num_scale, c10::DeviceType device);
void tokenize_cpu(const at::Tensor& out, at::TensorList sources, c10::ArrayRef<int64_t> offsets,
                  c10::ArrayRef<int64_t> spans, c10::ArrayRef<double> shift,
                  c10::ArrayRef<double> rscale);
void detokenize_cpu(const at::Tensor& tokens, at::TensorList dests, c10::ArrayRef<int64_t> offsets,
                    c10::ArrayRef<double> unshift, c10::ArrayRef<double> scale);
#ifdef D2NWG_WITH_CUDA
void tokenize_cuda(const at::Tensor& out, at::TensorList sources, c10::ArrayRef<int64_t> offsets,
                   c10::ArrayRef<int64_t> spans, c10::ArrayRef<double> shift,
                   c10::ArrayRef<double> rscale);
void detokenize_cuda(const at::Tensor& tokens, at::TensorList dests,
                     c10::ArrayRef<int64_t> offsets, c10::ArrayRef<double> unshift,
                     c10::ArrayRef<double> scale);
#endif

// ---- further ops: declare here, define schemas and impls in registration.cpp ----

// ---- fused sampler step (mirrors kernels/sampler_step.py; reference in d2nwg/ops/sampler_step_op.py) ----
void check_sampler_step_args(const at::Tensor& x, const at::Tensor& model_out,
                             const at::Tensor& table, const at::Tensor& step,
                             const std::optional<at::Tensor>& noise,
                             const std::optional<at::Tensor>& prev_x0, bool guided,
                             const std::optional<at::Tensor>& prev2_x0);
void sampler_step_cpu(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& table,
                      const at::Tensor& step, const std::optional<at::Tensor>& noise,
                      const std::optional<at::Tensor>& prev_x0, bool guided,
                      const std::optional<at::Tensor>& prev2_x0);
#ifdef D2NWG_WITH_CUDA
void sampler_step_cuda(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& table,
                       const at::Tensor& step, const std::optional<at::Tensor>& noise,
                       const std::optional<at::Tensor>& prev_x0, bool guided,
                       const std::optional<at::Tensor>& prev2_x0);
#endif

}  // namespace d2nwg
