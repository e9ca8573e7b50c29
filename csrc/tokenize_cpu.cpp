// Fused chunk tokenization on CPU: many parameter tensors of many models <-> one token tensor.
//
// Mirrors kernels/tokenize.py; the reference and the exact arithmetic are in
// d2nwg/ops/tokenize_op.py:
//   tokenize:    y = dst((float)((double(x) - shift) * rscale))     (float64 tokens skip the float cast)
//   detokenize:  x = dst((float)(double(y) * scale + unshift))   (float64 weights skip it too)
// setup.py compiles with -ffp-contract=off, so `y * scale + unshift` stays a multiply and an add
// (no FMA) and every backend rounds the same way.
//
// Work is cut into pieces of at most kPiece elements of one (model, segment); at::parallel_for
// spreads the pieces over threads. Each piece runs one inner loop picked once per piece for its
// (source dtype, destination dtype) pair, so the loop body has no switch and vectorizes. The
// loops are compiled for AVX-512, AVX2 and baseline x86-64 (GCC target_clones) because the
// extension itself is built for baseline x86-64, where float<->double conversions are 2-wide.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <cstdint>
#include <cstring>
#include <vector>

#include "ops.h"

namespace d2nwg {
namespace {

constexpr int64_t kPiece = int64_t{1} << 15;  // elements per work item: 64-256 KiB of traffic
// Below this many elements one thread finishes in well under a millisecond, less than waking
// a thread pool costs on a busy machine.
constexpr int64_t kParallelMin = int64_t{1} << 19;

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define D2NWG_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define D2NWG_CLONES
#endif
#define D2NWG_INLINE inline __attribute__((always_inline))

// ---- exact conversions (bit-identical to c10::Half / c10::BFloat16, written branch-free so
// that they vectorize; float <-> double are plain casts, round-to-nearest-even) ----
D2NWG_INLINE uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
D2NWG_INLINE float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// IEEE half -> float (c10's fp16_ieee_to_fp32_value without F16C).
D2NWG_INLINE float half_to_float(uint16_t h) {
  const uint32_t w = uint32_t{h} << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = from_bits((two_w >> 4) + (0xE0u << 23)) * from_bits(0x7800000u);  // 2^-112
  const float denormalized = from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t r = two_w < (1u << 27) ? bits(denormalized) : bits(normalized);
  return from_bits(sign | r);
}

// float -> IEEE half, round to nearest even (c10's fp16_ieee_from_fp32_value without F16C).
D2NWG_INLINE uint16_t float_to_half(float f) {
  const float scale_to_inf = from_bits(239u << 23);   // 2^112
  const float scale_to_zero = from_bits(17u << 23);   // 2^-110
  float base = (__builtin_fabsf(f) * scale_to_inf) * scale_to_zero;
  const uint32_t w = bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t b = bits(base);
  const uint32_t nonsign = ((b >> 13) & 0x7C00u) + (b & 0x0FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

D2NWG_INLINE float bf16_to_float(uint16_t h) { return from_bits(uint32_t{h} << 16); }

// float -> bfloat16, round to nearest even; NaN -> 0x7FC0 (as c10::BFloat16).
D2NWG_INLINE uint16_t float_to_bf16(float f) {
  const uint32_t u = bits(f);
  const uint32_t rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
  return static_cast<uint16_t>(f != f ? 0x7FC0u : rounded);
}

// Storage types: half and bfloat16 are raw 16-bit patterns, tagged so overloads differ.
struct F16 { uint16_t x; };
struct BF16 { uint16_t x; };

D2NWG_INLINE double load(float v) { return v; }
D2NWG_INLINE double load(double v) { return v; }
D2NWG_INLINE double load(F16 v) { return half_to_float(v.x); }
D2NWG_INLINE double load(BF16 v) { return bf16_to_float(v.x); }

// float64 -> destination, through float32 (the rounding every backend uses).
D2NWG_INLINE void store(float* p, double v) { *p = static_cast<float>(v); }
D2NWG_INLINE void store(double* p, double v) { *p = v; }
D2NWG_INLINE void store(F16* p, double v) { p->x = float_to_half(static_cast<float>(v)); }
D2NWG_INLINE void store(BF16* p, double v) { p->x = float_to_bf16(static_cast<float>(v)); }

// The float32 fast path (twice the SIMD width of float64): loads and stores in float.
D2NWG_INLINE float loadf(float v) { return v; }
D2NWG_INLINE float loadf(double v) { return static_cast<float>(v); }  // never taken (see below)
D2NWG_INLINE float loadf(F16 v) { return half_to_float(v.x); }
D2NWG_INLINE float loadf(BF16 v) { return bf16_to_float(v.x); }
D2NWG_INLINE void storef(float* p, float v) { *p = v; }
D2NWG_INLINE void storef(double* p, float v) { *p = v; }
D2NWG_INLINE void storef(F16* p, float v) { p->x = float_to_half(v); }
D2NWG_INLINE void storef(BF16* p, float v) { p->x = float_to_bf16(v); }

// True when a segment is only scaled by a power of two (no shift), as WeightTokenizer's
// uncentered layers and normalize=None are, and neither side is float64. Then x * 2^k is exact
// in float64, and float32's correctly rounded x * 2^k is the same number as rounding that
// float64 product to float32: the float path gives the reference's bits at twice the speed.
// "No shift" means the zero that is an identity for every value, signed zeros included:
// x - (+0.0) in tokenize, v + (-0.0) in detokenize (kNegZero). The other zero is not one:
// -0.0 - (-0.0) and -0.0 + (+0.0) are +0.0.
template <typename S, typename D, bool kNegZero>
D2NWG_INLINE bool float_exact(double shift, double factor) {
  if (std::is_same<S, double>::value || std::is_same<D, double>::value || shift != 0.0 ||
      std::signbit(shift) != kNegZero)
    return false;
  int e = 0;
  return factor > 0.0 && std::frexp(factor, &e) == 0.5 && e - 1 >= -126 && e - 1 <= 127;
}

// The float path of a segment that float_exact accepts: y = x * factor in float32.
template <typename S, typename D>
D2NWG_INLINE void scale_float(const S* __restrict x, D* __restrict y, int64_t n, double factor) {
  const float f = static_cast<float>(factor);
  for (int64_t i = 0; i < n; ++i) storef(y + i, loadf(x[i]) * f);
}

template <typename S, typename D>
D2NWG_INLINE void tokenize_body(const S* __restrict x, D* __restrict y, int64_t n, double shift,
                                double rscale) {
  if (float_exact<S, D, false>(shift, rscale)) return scale_float(x, y, n, rscale);
  for (int64_t i = 0; i < n; ++i) store(y + i, (load(x[i]) - shift) * rscale);
}

template <typename S, typename D>
D2NWG_INLINE void detokenize_body(const S* __restrict y, D* __restrict x, int64_t n, double scale,
                                  double unshift) {
  if (float_exact<S, D, true>(unshift, scale)) return scale_float(y, x, n, scale);
  for (int64_t i = 0; i < n; ++i) store(x + i, load(y[i]) * scale + unshift);
}

// One ISA-dispatched loop per (source, destination) dtype pair.
using Loop = void (*)(const void*, void*, int64_t, double, double);

// target_clones does not apply to templates, so the 16 pairs are spelled out by a macro.
#define D2NWG_PAIR(NAME, BODY, SN, ST, DN, DT)                                              \
  D2NWG_CLONES void NAME##_##SN##_##DN(const void* x, void* y, int64_t n, double a,         \
                                       double b) {                                          \
    BODY<ST, DT>(static_cast<const ST*>(x), static_cast<DT*>(y), n, a, b);                  \
  }
#define D2NWG_ROW(NAME, BODY, SN, ST)            \
  D2NWG_PAIR(NAME, BODY, SN, ST, f32, float)    \
  D2NWG_PAIR(NAME, BODY, SN, ST, f16, F16)      \
  D2NWG_PAIR(NAME, BODY, SN, ST, bf16, BF16)    \
  D2NWG_PAIR(NAME, BODY, SN, ST, f64, double)
#define D2NWG_TABLE(NAME, BODY)                   \
  D2NWG_ROW(NAME, BODY, f32, float)               \
  D2NWG_ROW(NAME, BODY, f16, F16)                 \
  D2NWG_ROW(NAME, BODY, bf16, BF16)               \
  D2NWG_ROW(NAME, BODY, f64, double)              \
  const Loop NAME##_loops[4][4] = {                                                        \
      {NAME##_f32_f32, NAME##_f32_f16, NAME##_f32_bf16, NAME##_f32_f64},                   \
      {NAME##_f16_f32, NAME##_f16_f16, NAME##_f16_bf16, NAME##_f16_f64},                   \
      {NAME##_bf16_f32, NAME##_bf16_f16, NAME##_bf16_bf16, NAME##_bf16_f64},               \
      {NAME##_f64_f32, NAME##_f64_f16, NAME##_f64_bf16, NAME##_f64_f64}};

D2NWG_TABLE(tok, tokenize_body)
D2NWG_TABLE(detok, detokenize_body)

// A run of elements of one (model, segment): n values from x to y, then `pad` zeros.
struct Piece {
  const char* x;
  char* y;
  int64_t n, pad;
  double a, b;
  Loop loop;
};

// Run the pieces on all threads; pieces are of similar size, so contiguous ranges balance.
void run_pieces(const std::vector<Piece>& pieces, int64_t elements, int64_t dst_itemsize) {
  auto work = [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const Piece& w = pieces[p];
      if (w.n > 0) w.loop(w.x, w.y, w.n, w.a, w.b);
      if (w.pad > 0) std::memset(w.y + w.n * dst_itemsize, 0, w.pad * dst_itemsize);  // +0.0
    }
  };
  if (elements < kParallelMin || at::get_num_threads() == 1 || at::in_parallel_region()) {
    work(0, static_cast<int64_t>(pieces.size()));
  } else {
    at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, work);
  }
}

}  // namespace

int32_t dtype_code(const at::Tensor& t, const char* what, int64_t index) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kDouble: return kF64;
    default:
      TORCH_CHECK(false, "d2nwg tokenize: ", what, "[", index, "] has dtype ", t.scalar_type(),
                  "; expected float32, float16, bfloat16 or float64");
  }
  return kF32;
}

namespace {

void check_rows(const at::Tensor& rows, const char* name, c10::DeviceType device) {
  TORCH_CHECK(rows.dim() == 2, "d2nwg tokenize: ", name, " must be [N, T*C], got ", rows.sizes());
  TORCH_CHECK(rows.is_contiguous(), "d2nwg tokenize: ", name, " must be contiguous");
  TORCH_CHECK(rows.device().type() == device, "d2nwg tokenize: ", name, " must be on ", device,
              ", got ", rows.device());
  dtype_code(rows, name, 0);
}

// Each tensor of the list: on the rows' device, contiguous, a supported dtype.
void check_tensors(at::TensorList tensors, const at::Tensor& rows, const char* what) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.device() == rows.device(), "d2nwg tokenize: ", what, "[", i, "] is on ",
                t.device(), ", the tokens on ", rows.device());
    TORCH_CHECK(t.is_contiguous(), "d2nwg tokenize: ", what, "[", i, "] must be contiguous");
    dtype_code(t, what, static_cast<int64_t>(i));
  }
}

}  // namespace

TokenizeShape check_tokenize_args(const at::Tensor& out, at::TensorList sources,
                                  c10::ArrayRef<int64_t> offsets, c10::ArrayRef<int64_t> spans,
                                  size_t num_shift, size_t num_rscale, c10::DeviceType device) {
  // Every bound below is compared without overflow, whatever the caller passes: sizes are
  // checked non-negative first, then `a <= R - b` instead of `a + b <= R` (a sum of two
  // int64 from the caller can wrap and pass).
  check_rows(out, "out", device);
  const int64_t S = static_cast<int64_t>(offsets.size());
  const int64_t N = out.size(0), R = out.size(1);
  TORCH_CHECK(S > 0, "d2nwg tokenize: the plan has no segments");
  TORCH_CHECK(spans.size() == offsets.size() && num_shift == offsets.size() &&
                  num_rscale == offsets.size(),
              "d2nwg tokenize: offsets, spans, shift and rscale must have one entry per segment, got ",
              offsets.size(), ", ", spans.size(), ", ", num_shift, ", ", num_rscale);
  // sources.size() == N * S without forming N * S (it wraps for N near 2^63 with R == 0).
  TORCH_CHECK(sources.size() % offsets.size() == 0 &&
                  static_cast<int64_t>(sources.size() / offsets.size()) == N,
              "d2nwg tokenize: got ", sources.size(), " sources for ", N, " models of ", S,
              " segments");
  // The spans must tile the row: then every output element is written exactly once, and no
  // two threads or blocks ever write the same element.
  std::vector<int64_t> order(S);
  for (int64_t s = 0; s < S; ++s) order[s] = s;
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return offsets[a] < offsets[b]; });
  int64_t covered = 0;  // 0 <= covered <= R throughout
  for (int64_t s : order) {
    TORCH_CHECK(spans[s] >= 0 && offsets[s] == covered && spans[s] <= R - covered,
                "d2nwg tokenize: the spans do not tile the row of ", R, " elements (segment ", s,
                " at offset ", offsets[s], " with span ", spans[s], ", expected offset ", covered,
                " and a span of at most ", R - covered, ")");
    covered += spans[s];
  }
  TORCH_CHECK(covered == R, "d2nwg tokenize: the spans cover ", covered, " elements, the row has ", R);
  check_tensors(sources, out, "sources");
  for (int64_t i = 0; i < N * S; ++i) {
    TORCH_CHECK(sources[i].numel() <= spans[i % S], "d2nwg tokenize: sources[", i, "] has ",
                sources[i].numel(), " elements, more than the span ", spans[i % S], " of segment ",
                i % S);
  }
  return {N, S, R};
}

TokenizeShape check_detokenize_args(const at::Tensor& tokens, at::TensorList dests,
                                    c10::ArrayRef<int64_t> offsets, size_t num_unshift,
                                    size_t num_scale, c10::DeviceType device) {
  check_rows(tokens, "tokens", device);
  const int64_t S = static_cast<int64_t>(offsets.size());
  const int64_t N = tokens.size(0), R = tokens.size(1);
  TORCH_CHECK(S > 0, "d2nwg detokenize: the plan has no segments");
  TORCH_CHECK(num_unshift == offsets.size() && num_scale == offsets.size(),
              "d2nwg detokenize: offsets, unshift and scale must have one entry per segment, got ",
              offsets.size(), ", ", num_unshift, ", ", num_scale);
  TORCH_CHECK(dests.size() % offsets.size() == 0 &&
                  static_cast<int64_t>(dests.size() / offsets.size()) == N,
              "d2nwg detokenize: got ", dests.size(), " destinations for ", N, " models of ", S,
              " segments");
  check_tensors(dests, tokens, "dests");
  for (int64_t i = 0; i < N * S; ++i) {
    const int64_t s = i % S, numel = dests[i].numel();
    // numel >= 0 and R >= 0, so R - numel cannot overflow; offsets[s] + numel could.
    TORCH_CHECK(offsets[s] >= 0 && numel <= R && offsets[s] <= R - numel, "d2nwg detokenize: dests[",
                i, "] (", numel, " elements at offset ", offsets[s], ") overruns the row of ",
                R, " elements");
  }
  return {N, S, R};
}

void tokenize_cpu(const at::Tensor& out, at::TensorList sources, c10::ArrayRef<int64_t> offsets,
                  c10::ArrayRef<int64_t> spans, c10::ArrayRef<double> shift,
                  c10::ArrayRef<double> rscale) {
  const auto [N, S, R] = check_tokenize_args(out, sources, offsets, spans, shift.size(),
                                             rscale.size(), c10::DeviceType::CPU);
  const int dst_code = dtype_code(out, "out", 0);
  const int64_t dst_size = out.element_size();
  char* out_base = static_cast<char*>(out.data_ptr());
  std::vector<Piece> pieces;
  int64_t elements = 0;
  for (int64_t i = 0; i < N * S; ++i) {
    const at::Tensor& src = sources[i];
    const int64_t n = i / S, s = i % S, numel = src.numel();
    const Loop loop = tok_loops[dtype_code(src, "sources", i)][dst_code];
    const char* x = static_cast<const char*>(src.data_ptr());
    char* y = out_base + (n * R + offsets[s]) * dst_size;
    for (int64_t start = 0; start < spans[s]; start += kPiece) {
      const int64_t stop = std::min(start + kPiece, spans[s]);
      const int64_t real = std::max<int64_t>(0, std::min(stop, numel) - start);
      pieces.push_back({x + start * src.element_size(), y + start * dst_size, real,
                        stop - start - real, shift[s], rscale[s], loop});
    }
    elements += spans[s];
  }
  run_pieces(pieces, elements, dst_size);
}

void detokenize_cpu(const at::Tensor& tokens, at::TensorList dests, c10::ArrayRef<int64_t> offsets,
                    c10::ArrayRef<double> unshift, c10::ArrayRef<double> scale) {
  const auto [N, S, R] = check_detokenize_args(tokens, dests, offsets, unshift.size(),
                                               scale.size(), c10::DeviceType::CPU);
  const int src_code = dtype_code(tokens, "tokens", 0);
  const int64_t src_size = tokens.element_size();
  const char* tok_base = static_cast<const char*>(tokens.data_ptr());
  std::vector<Piece> pieces;
  int64_t elements = 0;
  for (int64_t i = 0; i < N * S; ++i) {
    const at::Tensor& dst = dests[i];
    const int64_t n = i / S, s = i % S, numel = dst.numel();
    const Loop loop = detok_loops[src_code][dtype_code(dst, "dests", i)];
    const char* y = tok_base + (n * R + offsets[s]) * src_size;
    char* x = static_cast<char*>(dst.data_ptr());
    for (int64_t start = 0; start < numel; start += kPiece) {
      const int64_t stop = std::min(start + kPiece, numel);
      pieces.push_back({y + start * src_size, x + start * dst.element_size(), stop - start, 0,
                        scale[s], unshift[s], loop});
    }
    elements += numel;
  }
  run_pieces(pieces, elements, 1);
}

}  // namespace d2nwg
