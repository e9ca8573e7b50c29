// The dtypes the fused sampler step is compiled for, on every backend: x (with model_out, noise
// and prev_x0) float32, float64, float16 or bfloat16, the coefficient table float32 or float64.
// One home so that the CPU and CUDA ops instantiate the same pairs; check_sampler_step_args
// (sampler_step_cpu.cpp) admits exactly these, so the dispatch's own error is never reached.
#pragma once

#include <ATen/Dispatch.h>

// Runs the statement(s) after NAME with x_t (x's element type) and tab_t (the table's) bound.
// A macro, as AT_DISPATCH_* are: the instantiations stay in the caller's own lambdas, so the
// compiler inlines the kernels' launch paths exactly as it does for a plain AT_DISPATCH there (a
// callback layer in between changes which of the CPU loops GCC inlines into their callers).
#define D2NWG_DISPATCH_SAMPLER_STEP_DTYPES(X, TABLE, NAME, ...)                             \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, (X).scalar_type(), NAME, [&] { \
    using x_t = scalar_t;                                                                 \
    AT_DISPATCH_FLOATING_TYPES((TABLE).scalar_type(), NAME, [&] {                         \
      using tab_t = scalar_t;                                                             \
      __VA_ARGS__;                                                                        \
    });                                                                                   \
  })
