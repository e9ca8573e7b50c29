// Declarations of d2nwg's compiled ops. Each op's CPU and CUDA files implement these;
// registration.cpp binds them to the schemas of the `d2nwg` torch.library namespace.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

namespace d2nwg {

// ---- chunk tokenization (mirrors kernels/tokenize.py; reference in d2nwg/ops/tokenize.py) ----
void tokenize_cpu(const at::Tensor& out, at::TensorList sources, c10::ArrayRef<int64_t> offsets,
                  c10::ArrayRef<int64_t> spans, c10::ArrayRef<double> mean,
                  c10::ArrayRef<double> rstd);
void detokenize_cpu(const at::Tensor& tokens, at::TensorList dests, c10::ArrayRef<int64_t> offsets,
                    c10::ArrayRef<double> mean, c10::ArrayRef<double> std);
#ifdef D2NWG_WITH_CUDA
void tokenize_cuda(const at::Tensor& out, at::TensorList sources, c10::ArrayRef<int64_t> offsets,
                   c10::ArrayRef<int64_t> spans, c10::ArrayRef<double> mean,
                   c10::ArrayRef<double> rstd);
void detokenize_cuda(const at::Tensor& tokens, at::TensorList dests,
                     c10::ArrayRef<int64_t> offsets, c10::ArrayRef<double> mean,
                     c10::ArrayRef<double> std);
#endif

// ---- further ops: declare here, define schemas and impls in registration.cpp ----

}  // namespace d2nwg
