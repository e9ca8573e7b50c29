// The fused sampler step on CUDA (mirrors kernels/sampler_step.py; reference and the meaning
// of the coefficient columns in d2nwg/ops/sampler_step_op.py). In place on x [B, N] (and
// prev_x0, prev2_x0). One block handles kThreads * VEC elements of one sample's row (VEC = 16 bytes'
// worth when aligned); the step index is read from device memory so that a captured CUDA graph
// replays with the right row.
// Light headers only (ATen/cuda/CUDAContext.h would pull in cuSPARSE headers).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "ops.h"
#include "sampler_step_dispatch.h"
#include "sampler_step_layout.h"

namespace d2nwg {
namespace {

using namespace sampler_col;  // kG, kAX, ..., kK

constexpr int kThreads = 256;

// VEC contiguous elements per thread: one 16-byte load / store per tensor when every pointer
// is 16-byte aligned and N % VEC == 0 (VEC = 16 / sizeof(scalar_t)), else VEC scalar accesses.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename acc_t>
struct Coef {
  acc_t g, ax, ao, ex, eo, cx, c0, ce, cp, cz, cp2;
};

// One element, in the reference's order (d2nwg/ops/sampler_step_op.py); returns x0 via *x0_out.
// has_prev2 only with has_prev (the caller moves prev into prev2).
template <typename acc_t>
__device__ __forceinline__ acc_t step_one(const Coef<acc_t>& c, acc_t xv, acc_t m, acc_t u,
                                          bool guided, acc_t prev, bool has_prev, acc_t prev2,
                                          bool has_prev2, acc_t z, bool has_noise,
                                          acc_t* x0_out) {
  const acc_t o = guided ? u + c.g * (m - u) : m;  // classifier-free guidance
  const acc_t x0 = c.ax * xv + c.ao * o;           // prediction -> data
  const acc_t eps = c.ex * xv + c.eo * o;          // prediction -> noise
  acc_t nxt = c.cx * xv + c.c0 * x0 + c.ce * eps;  // the sampler's update
  if (has_prev) nxt = nxt + c.cp * prev;
  if (has_prev2) nxt = nxt + c.cp2 * prev2;
  if (has_noise) nxt = nxt + c.cz * z;
  *x0_out = x0;
  return nxt;
}

template <typename scalar_t, typename tab_t, int VEC>
__global__ void __launch_bounds__(kThreads)
sampler_step_kernel(scalar_t* __restrict__ x, const scalar_t* __restrict__ out,
                    const tab_t* __restrict__ table, const int64_t* __restrict__ step,
                    const scalar_t* __restrict__ z, scalar_t* __restrict__ prev,
                    scalar_t* __restrict__ prev2, int64_t B, int64_t N, int64_t n_blocks,
                    int64_t num_steps, int64_t stride_ts, int64_t stride_tb, bool guided) {
  // The flags are uniform over the grid: runtime branches cost nothing in this memory-bound
  // kernel and keep the number of instantiations small.
  using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
  const int64_t pid = blockIdx.x;
  const int64_t b = pid / n_blocks;
  const int64_t blk = pid - b * n_blocks;
  int64_t s = *step;  // device-side step index: graph replays read the current value
  s = s < 0 ? 0 : (s >= num_steps ? num_steps - 1 : s);
  const tab_t* r = table + s * stride_ts + b * stride_tb;
  const Coef<acc_t> c{acc_t(r[kG]),  acc_t(r[kAX]), acc_t(r[kAO]), acc_t(r[kEX]),
                      acc_t(r[kEO]), acc_t(r[kCX]), acc_t(r[kC0]), acc_t(r[kCE]),
                      acc_t(r[kCP]), acc_t(r[kCZ]), acc_t(r[kCP2])};
  const bool has_prev = prev != nullptr, has_noise = z != nullptr;
  const bool has_prev2 = has_prev && prev2 != nullptr;
  const int64_t i0 = blk * (int64_t(kThreads) * VEC) + int64_t(threadIdx.x) * VEC;
  if (i0 >= N) return;
  const int64_t e = b * N + i0;
  if (VEC > 1 && i0 + VEC <= N) {
    using P = Pack<scalar_t, VEC>;
    const P xp = *reinterpret_cast<const P*>(x + e);
    const P mp = *reinterpret_cast<const P*>(out + e);
    P up, pp, pp2, zp, xo, po;
    if (guided) up = *reinterpret_cast<const P*>(out + B * N + e);
    if (has_prev) pp = *reinterpret_cast<const P*>(prev + e);
    if (has_prev2) pp2 = *reinterpret_cast<const P*>(prev2 + e);
    if (has_noise) zp = *reinterpret_cast<const P*>(z + e);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      acc_t x0;
      const acc_t nxt = step_one<acc_t>(
          c, acc_t(xp.v[j]), acc_t(mp.v[j]), guided ? acc_t(up.v[j]) : acc_t(0), guided,
          has_prev ? acc_t(pp.v[j]) : acc_t(0), has_prev, has_prev2 ? acc_t(pp2.v[j]) : acc_t(0),
          has_prev2, has_noise ? acc_t(zp.v[j]) : acc_t(0), has_noise, &x0);
      xo.v[j] = scalar_t(nxt);
      po.v[j] = scalar_t(x0);
    }
    *reinterpret_cast<P*>(x + e) = xo;
    if (has_prev2) *reinterpret_cast<P*>(prev2 + e) = pp;  // the history moves back one step
    if (has_prev) *reinterpret_cast<P*>(prev + e) = po;
    return;
  }
  for (int j = 0; j < VEC && i0 + j < N; ++j) {
    const int64_t k = e + j;
    acc_t x0;
    const scalar_t pv = has_prev ? prev[k] : scalar_t(0);
    const acc_t nxt = step_one<acc_t>(
        c, acc_t(x[k]), acc_t(out[k]), guided ? acc_t(out[k + B * N]) : acc_t(0), guided,
        acc_t(pv), has_prev, has_prev2 ? acc_t(prev2[k]) : acc_t(0), has_prev2,
        has_noise ? acc_t(z[k]) : acc_t(0), has_noise, &x0);
    x[k] = scalar_t(nxt);
    if (has_prev2) prev2[k] = pv;
    if (has_prev) prev[k] = scalar_t(x0);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename scalar_t, typename tab_t, int VEC>
void launch_vec(const at::Tensor& x, const at::Tensor& out, const at::Tensor& table,
                const at::Tensor& step, const at::Tensor* noise, const at::Tensor* prev,
                const at::Tensor* prev2, bool guided) {
  const int64_t B = x.size(0), N = x.size(1);
  const int64_t per_block = int64_t(kThreads) * VEC;
  const int64_t n_blocks = (N + per_block - 1) / per_block;
  const int64_t grid = B * n_blocks;
  TORCH_CHECK(grid < (int64_t(1) << 31), "sampler_step_: too many elements for one launch");
  const int64_t stride_tb = table.dim() == 3 ? kK : 0;
  auto stream = c10::cuda::getCurrentCUDAStream(x.device().index());
  sampler_step_kernel<scalar_t, tab_t, VEC><<<static_cast<unsigned>(grid), kThreads, 0, stream.stream()>>>(
      x.mutable_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(),
      table.const_data_ptr<tab_t>(), step.const_data_ptr<int64_t>(),
      noise ? noise->const_data_ptr<scalar_t>() : nullptr,
      prev ? prev->mutable_data_ptr<scalar_t>() : nullptr,
      prev2 ? prev2->mutable_data_ptr<scalar_t>() : nullptr, B, N, n_blocks, table.size(0),
      table.stride(0), stride_tb, guided);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename tab_t>
void launch(const at::Tensor& x, const at::Tensor& out, const at::Tensor& table,
            const at::Tensor& step, const at::Tensor* noise, const at::Tensor* prev,
            const at::Tensor* prev2, bool guided) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  bool wide = x.size(1) % kVec == 0 && aligned16(x.const_data_ptr()) &&
              aligned16(out.const_data_ptr());
  if (noise) wide = wide && aligned16(noise->const_data_ptr());
  if (prev) wide = wide && aligned16(prev->const_data_ptr());
  if (prev2) wide = wide && aligned16(prev2->const_data_ptr());
  if (wide) {
    launch_vec<scalar_t, tab_t, kVec>(x, out, table, step, noise, prev, prev2, guided);
  } else {
    launch_vec<scalar_t, tab_t, 1>(x, out, table, step, noise, prev, prev2, guided);
  }
}

}  // namespace

void sampler_step_cuda(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& table,
                       const at::Tensor& step, const std::optional<at::Tensor>& noise,
                       const std::optional<at::Tensor>& prev_x0, bool guided,
                       const std::optional<at::Tensor>& prev2_x0) {
  check_sampler_step_args(x, model_out, table, step, noise, prev_x0, guided, prev2_x0);
  if (x.numel() == 0) return;
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor* z = noise.has_value() ? &*noise : nullptr;
  const at::Tensor* p = prev_x0.has_value() ? &*prev_x0 : nullptr;
  const at::Tensor* p2 = prev2_x0.has_value() ? &*prev2_x0 : nullptr;
  D2NWG_DISPATCH_SAMPLER_STEP_DTYPES(
      x, table, "sampler_step_cuda", launch<x_t, tab_t>(x, model_out, table, step, z, p, p2, guided));
}

}  // namespace d2nwg
