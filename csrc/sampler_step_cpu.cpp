// The fused sampler step on CPU (mirrors kernels/sampler_step.py; reference and the meaning of
// the coefficient columns in d2nwg/ops/sampler_step_op.py). In place on x [B, N] (and prev_x0,
// prev2_x0).
// Arithmetic in float (double for double x), in the reference's order (-ffp-contract=off);
// the inner loops are branch-free and contiguous so that the compiler vectorizes them.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>

#include "ops.h"
#include "sampler_step_dispatch.h"
#include "sampler_step_layout.h"

namespace d2nwg {
namespace {

using namespace sampler_col;  // kG, kAX, ..., kK

template <typename acc_t>
struct Coef {
  acc_t g, ax, ao, ex, eo, cx, c0, ce, cp, cz, cp2;
};

template <typename acc_t, typename tab_t>
Coef<acc_t> load_coef(const tab_t* r) {
  return {acc_t(r[kG]),  acc_t(r[kAX]), acc_t(r[kAO]), acc_t(r[kEX]), acc_t(r[kEO]), acc_t(r[kCX]),
          acc_t(r[kC0]), acc_t(r[kCE]), acc_t(r[kCP]), acc_t(r[kCZ]), acc_t(r[kCP2])};
}

// Elements [lo, hi) of one row; all pointers already offset to the row start. PREV2 only
// with PREV (the second history buffer takes the first one's values).
template <typename scalar_t, typename acc_t, bool GUIDED, bool NOISE, bool PREV, bool PREV2>
void step_row(scalar_t* __restrict x, const scalar_t* __restrict m,
              const scalar_t* __restrict u, const scalar_t* __restrict z,
              scalar_t* __restrict prev, scalar_t* __restrict prev2, const Coef<acc_t> c,
              int64_t lo, int64_t hi) {
  for (int64_t i = lo; i < hi; ++i) {
    const acc_t xv = acc_t(x[i]);
    acc_t o;
    if constexpr (GUIDED) {
      const acc_t uv = acc_t(u[i]);
      o = uv + c.g * (acc_t(m[i]) - uv);
    } else {
      o = acc_t(m[i]);
    }
    const acc_t x0 = c.ax * xv + c.ao * o;
    const acc_t eps = c.ex * xv + c.eo * o;
    acc_t nxt = c.cx * xv + c.c0 * x0 + c.ce * eps;
    if constexpr (PREV) {
      const scalar_t pv = prev[i];
      nxt = nxt + c.cp * acc_t(pv);
      if constexpr (PREV2) {
        nxt = nxt + c.cp2 * acc_t(prev2[i]);
        prev2[i] = pv;
      }
      prev[i] = scalar_t(x0);
    }
    if constexpr (NOISE) nxt = nxt + c.cz * acc_t(z[i]);
    x[i] = scalar_t(nxt);
  }
}

template <typename scalar_t, typename tab_t, bool GUIDED, bool NOISE, bool PREV, bool PREV2>
void run(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& table, int64_t s,
         const at::Tensor* noise, const at::Tensor* prev, const at::Tensor* prev2) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t B = x.size(0), N = x.size(1);
  const int64_t stride_b = table.dim() == 3 ? kK : 0;
  const tab_t* tab = table.const_data_ptr<tab_t>() + s * table.stride(0);
  scalar_t* xp = x.mutable_data_ptr<scalar_t>();
  const scalar_t* op = model_out.const_data_ptr<scalar_t>();
  const scalar_t* zp = noise ? noise->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* pp = prev ? prev->mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* pp2 = prev2 ? prev2->mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t total = B * N;
  constexpr int64_t grain = 32768;  // at::internal::GRAIN_SIZE: below it, threads cost more than they save
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {  // split [begin, end) at row boundaries
      const int64_t b = i / N, lo = i - b * N;
      const int64_t hi = std::min(N, lo + (end - i));
      const Coef<acc_t> c = load_coef<acc_t>(tab + b * stride_b);
      const int64_t r = b * N;
      step_row<scalar_t, acc_t, GUIDED, NOISE, PREV, PREV2>(
          xp + r, op + r, GUIDED ? op + (B + b) * N : nullptr, zp ? zp + r : nullptr,
          pp ? pp + r : nullptr, pp2 ? pp2 + r : nullptr, c, lo, hi);
      i += hi - lo;
    }
  });
}

template <typename scalar_t, typename tab_t>
void run_flags(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& table,
               int64_t s, const at::Tensor* noise, const at::Tensor* prev, const at::Tensor* prev2,
               bool guided) {
  // prev2 only with prev (checked): codes 9, 11, 13, 15 are the second-history variants.
  const int code = (prev2 ? 8 : 0) | (guided ? 4 : 0) | (noise ? 2 : 0) | (prev ? 1 : 0);
  switch (code) {
#define D2NWG_CASE(c, G, Z, P, P2) \
  case c: run<scalar_t, tab_t, G, Z, P, P2>(x, model_out, table, s, noise, prev, prev2); break;
    D2NWG_CASE(0, false, false, false, false)
    D2NWG_CASE(1, false, false, true, false)
    D2NWG_CASE(2, false, true, false, false)
    D2NWG_CASE(3, false, true, true, false)
    D2NWG_CASE(4, true, false, false, false)
    D2NWG_CASE(5, true, false, true, false)
    D2NWG_CASE(6, true, true, false, false)
    D2NWG_CASE(7, true, true, true, false)
    D2NWG_CASE(9, false, false, true, true)
    D2NWG_CASE(11, false, true, true, true)
    D2NWG_CASE(13, true, false, true, true)
    D2NWG_CASE(15, true, true, true, true)
#undef D2NWG_CASE
    default: TORCH_CHECK(false, "sampler_step_: prev2_x0 needs prev_x0");
  }
}

}  // namespace

void check_sampler_step_args(const at::Tensor& x, const at::Tensor& model_out,
                             const at::Tensor& table, const at::Tensor& step,
                             const std::optional<at::Tensor>& noise,
                             const std::optional<at::Tensor>& prev_x0, bool guided,
                             const std::optional<at::Tensor>& prev2_x0) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "sampler_step_: x must be a contiguous [B, N] tensor");
  const int64_t B = x.size(0), N = x.size(1);
  // guided: 2 * B rows, compared as M / 2 == B (2 * B wraps for B near 2^63 with N == 0).
  const bool rows_ok = model_out.dim() == 2 &&
                       (guided ? model_out.size(0) % 2 == 0 && model_out.size(0) / 2 == B
                               : model_out.size(0) == B);
  TORCH_CHECK(model_out.is_contiguous() && rows_ok && model_out.size(1) == N,
              "sampler_step_: model_out must be contiguous [", guided ? "2 * " : "", B, ", ", N,
              "], got ", model_out.sizes());
  const auto xt = x.scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kDouble || xt == at::kHalf || xt == at::kBFloat16,
              "sampler_step_: unsupported dtype ", xt);
  TORCH_CHECK(model_out.scalar_type() == x.scalar_type(), "sampler_step_: model_out dtype != x dtype");
  TORCH_CHECK(table.is_contiguous() &&
                  ((table.dim() == 2 && table.size(1) == kK) ||
                   (table.dim() == 3 && table.size(1) == B && table.size(2) == kK)) &&
                  table.size(0) > 0,
              "sampler_step_: table must be contiguous [S, ", kK, "] or [S, B, ", kK,
              "] with S > 0, got ", table.sizes());
  TORCH_CHECK(table.scalar_type() == at::kFloat || table.scalar_type() == at::kDouble,
              "sampler_step_: table must be float32 or float64");
  TORCH_CHECK(step.numel() == 1 && step.scalar_type() == at::kLong,
              "sampler_step_: step must be a one-element int64 tensor");
  for (const auto* t : {&noise, &prev_x0, &prev2_x0}) {
    if (t->has_value()) {
      TORCH_CHECK((*t)->is_contiguous() && (*t)->sizes() == x.sizes() &&
                      (*t)->scalar_type() == x.scalar_type() && (*t)->device() == x.device(),
                  "sampler_step_: noise / prev_x0 / prev2_x0 must be contiguous, shaped, typed "
                  "and placed like x");
    }
  }
  if (prev2_x0.has_value()) {
    TORCH_CHECK(prev_x0.has_value(), "sampler_step_: prev2_x0 needs prev_x0");
    TORCH_CHECK(x.numel() == 0 || prev2_x0->const_data_ptr() != prev_x0->const_data_ptr(),
                "sampler_step_: prev2_x0 and prev_x0 must be two different buffers");
  }
  TORCH_CHECK(model_out.device() == x.device() && table.device() == x.device() &&
                  step.device() == x.device(),
              "sampler_step_: all tensors must be on x's device");
}

void sampler_step_cpu(const at::Tensor& x, const at::Tensor& model_out, const at::Tensor& table,
                      const at::Tensor& step, const std::optional<at::Tensor>& noise,
                      const std::optional<at::Tensor>& prev_x0, bool guided,
                      const std::optional<at::Tensor>& prev2_x0) {
  check_sampler_step_args(x, model_out, table, step, noise, prev_x0, guided, prev2_x0);
  if (x.numel() == 0) return;
  int64_t s = *step.const_data_ptr<int64_t>();
  s = std::min<int64_t>(std::max<int64_t>(s, 0), table.size(0) - 1);
  const at::Tensor* z = noise.has_value() ? &*noise : nullptr;
  const at::Tensor* p = prev_x0.has_value() ? &*prev_x0 : nullptr;
  const at::Tensor* p2 = prev2_x0.has_value() ? &*prev2_x0 : nullptr;
  D2NWG_DISPATCH_SAMPLER_STEP_DTYPES(
      x, table, "sampler_step_cpu", run_flags<x_t, tab_t>(x, model_out, table, s, z, p, p2, guided));
}

}  // namespace d2nwg
