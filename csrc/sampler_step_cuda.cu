// The fused sampler step on CUDA (mirrors kernels/sampler_step.py; reference and the meaning
// of the coefficient columns in d2nwg/ops/sampler_step.py). In place on x [B, N] (and
// prev_x0). One block handles kThreads * kUnroll elements of one sample's row; the step index
// is read from device memory so that a captured CUDA graph replays with the right row.
// Light headers only (ATen/cuda/CUDAContext.h would pull in cuSPARSE headers).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <type_traits>

#include "ops.h"

namespace d2nwg {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;
constexpr int kBlockElems = kThreads * kUnroll;
constexpr int kK = 10;

template <typename scalar_t, typename tab_t>
__global__ void __launch_bounds__(kThreads)
sampler_step_kernel(scalar_t* __restrict__ x, const scalar_t* __restrict__ out,
                    const tab_t* __restrict__ table, const int64_t* __restrict__ step,
                    const scalar_t* __restrict__ z, scalar_t* __restrict__ prev, int64_t B,
                    int64_t N, int64_t n_blocks, int64_t num_steps, int64_t stride_ts,
                    int64_t stride_tb, bool guided) {
  // The flags are uniform over the grid: runtime branches cost nothing in this memory-bound
  // kernel and keep the number of instantiations small.
  using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
  const int64_t pid = blockIdx.x;
  const int64_t b = pid / n_blocks;
  const int64_t blk = pid - b * n_blocks;
  int64_t s = *step;
  s = s < 0 ? 0 : (s >= num_steps ? num_steps - 1 : s);
  const tab_t* r = table + s * stride_ts + b * stride_tb;
  const acc_t g = acc_t(r[0]), ax = acc_t(r[1]), ao = acc_t(r[2]), ex = acc_t(r[3]),
              eo = acc_t(r[4]), cx = acc_t(r[5]), c0 = acc_t(r[6]), ce = acc_t(r[7]),
              cp = acc_t(r[8]), cz = acc_t(r[9]);
  const int64_t base = b * N;
  const int64_t start = blk * kBlockElems + threadIdx.x;
#pragma unroll
  for (int k = 0; k < kUnroll; ++k) {
    const int64_t i = start + int64_t(k) * kThreads;
    if (i < N) {
      const int64_t e = base + i;
      const acc_t xv = acc_t(x[e]);
      acc_t o;
      if (guided) {
        const acc_t uv = acc_t(out[e + B * N]);
        o = uv + g * (acc_t(out[e]) - uv);  // classifier-free guidance
      } else {
        o = acc_t(out[e]);
      }
      const acc_t x0 = ax * xv + ao * o;      // prediction -> data
      const acc_t eps = ex * xv + eo * o;     // prediction -> noise
      acc_t nxt = cx * xv + c0 * x0 + ce * eps;
      if (prev != nullptr) {
        nxt = nxt + cp * acc_t(prev[e]);
        prev[e] = scalar_t(x0);
      }
      if (z != nullptr) nxt = nxt + cz * acc_t(z[e]);
      x[e] = scalar_t(nxt);
    }
  }
}

template <typename scalar_t, typename tab_t>
void launch(const at::Tensor& x, const at::Tensor& out, const at::Tensor& table,
            const at::Tensor& step, const at::Tensor* noise, const at::Tensor* prev, bool guided) {
  const int64_t B = x.size(0), N = x.size(1);
  const int64_t n_blocks = (N + kBlockElems - 1) / kBlockElems;
  const int64_t grid = B * n_blocks;
  TORCH_CHECK(grid < (int64_t(1) << 31), "sampler_step_: too many elements for one launch");
  const int64_t stride_tb = table.dim() == 3 ? kK : 0;
  auto stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  sampler_step_kernel<scalar_t, tab_t><<<static_cast<unsigned>(grid), kThreads, 0, stream.stream()>>>(
      x.mutable_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(),
      table.const_data_ptr<tab_t>(), step.const_data_ptr<int64_t>(),
      noise ? noise->const_data_ptr<scalar_t>() : nullptr,
      prev ? prev->mutable_data_ptr<scalar_t>() : nullptr, B, N, n_blocks, table.size(0),
      table.stride(0), stride_tb, guided);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_types(const at::Tensor& x, const at::Tensor& out, const at::Tensor& table,
                  const at::Tensor& step, const at::Tensor* noise, const at::Tensor* prev,
                  bool guided) {
  if (table.scalar_type() == at::kDouble) {
    launch<scalar_t, double>(x, out, table, step, noise, prev, guided);
  } else {
    launch<scalar_t, float>(x, out, table, step, noise, prev, guided);
  }
}

}  // namespace

void sampler_step_cuda(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& table,
                       const at::Tensor& step, const std::optional<at::Tensor>& noise,
                       const std::optional<at::Tensor>& prev_x0, bool guided) {
  check_sampler_step_args(x, model_out, table, step, noise, prev_x0, guided);
  if (x.numel() == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor* z = noise.has_value() ? &*noise : nullptr;
  const at::Tensor* p = prev_x0.has_value() ? &*prev_x0 : nullptr;
  switch (x.scalar_type()) {
    case at::kFloat: launch_types<float>(x, model_out, table, step, z, p, guided); break;
    case at::kDouble: launch_types<double>(x, model_out, table, step, z, p, guided); break;
    case at::kHalf: launch_types<c10::Half>(x, model_out, table, step, z, p, guided); break;
    case at::kBFloat16: launch_types<c10::BFloat16>(x, model_out, table, step, z, p, guided); break;
    default: TORCH_CHECK(false, "sampler_step_: unsupported dtype ", x.scalar_type());
  }
}

}  // namespace d2nwg
