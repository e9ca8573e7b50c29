// The one registration file of d2nwg._C: schemas of every compiled op, their CPU and CUDA
// implementations, and build_info() for `d2nwg info`.
#include <torch/extension.h>

#include "ops.h"

#ifndef D2NWG_CUDA_ARCHS
#define D2NWG_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(d2nwg, m) {
  // tokens[N, T*C] <- (sources - shift) * rscale, cast, padded (N*S tensors, model-major).
  m.def("tokenize_(Tensor(a!) out, Tensor[] sources, int[] offsets, int[] spans, float[] shift, "
        "float[] rscale) -> ()");
  // dests (N*S tensors) <- tokens[N, T*C] * scale + unshift, cast.
  m.def("detokenize_(Tensor tokens, Tensor(a!)[] dests, int[] offsets, float[] unshift, "
        "float[] scale) -> ()");
  // x[B, N] <- one fused diffusion sampler step (guidance mix, prediction conversion, update,
  // noise); prev2_x0 <- prev_x0 <- this step's x0. Coefficients: table[step] ([S, K] or
  // [S, B, K], columns in sampler_step_layout.h). prev2_x0 last, with a default, so that
  // calls written before it existed still bind.
  m.def("sampler_step_(Tensor(a!) x, Tensor model_out, Tensor table, Tensor step, "
        "Tensor? noise, Tensor(b!)? prev_x0, bool guided, Tensor(c!)? prev2_x0=None) -> ()");
}

TORCH_LIBRARY_IMPL(d2nwg, CPU, m) {
  m.impl("tokenize_", &d2nwg::tokenize_cpu);
  m.impl("detokenize_", &d2nwg::detokenize_cpu);
  m.impl("sampler_step_", &d2nwg::sampler_step_cpu);
}

#ifdef D2NWG_WITH_CUDA
TORCH_LIBRARY_IMPL(d2nwg, CUDA, m) {
  m.impl("tokenize_", &d2nwg::tokenize_cuda);
  m.impl("detokenize_", &d2nwg::detokenize_cuda);
  m.impl("sampler_step_", &d2nwg::sampler_step_cuda);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("build_info", []() {
    pybind11::dict info;
#ifdef D2NWG_WITH_CUDA
    info["with_cuda"] = true;
#else
    info["with_cuda"] = false;
#endif
    info["cuda_archs"] = std::string(D2NWG_CUDA_ARCHS);
    info["torch"] = std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR);
    return info;
  });
}
