// Fused chunk tokenization on CUDA: many parameter tensors of many models <-> one token tensor,
// in one launch per call.
//
// Mirrors kernels/tokenize.py; the reference and the exact arithmetic are in
// d2nwg/ops/tokenize_op.py:
//   tokenize:    y = dst(fp32((double(x) - shift) * rscale))    (float64 tokens skip fp32)
//   detokenize:  x = dst(fp32(double(y) * scale + unshift))    (float64 weights skip fp32)
// The float64 operations are spelled with __dsub_rn/__dmul_rn/__dadd_rn so that no
// multiply-add is ever fused (setup.py also passes --fmad=false).
//
// Layout of one launch: the host builds a table of work items, one per (model, segment) with
// its pointer, element counts, statistics and dtype code, and a table mapping each CUDA block
// to its item; both go to the device in one copy. Each block handles a tile of kTile
// elements of one item, so the dtype switch is uniform per block (no divergence) and the
// kernel is templated only on the dtype shared by the whole call (the token dtype).
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "ops.h"

namespace d2nwg {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;                                // elements per thread per step
constexpr int kSteps = 8;                              // steps per tile
constexpr int64_t kTile = kThreads * kVec * kSteps;    // 16384 elements per block

// Storage types: half and bfloat16 are raw 16-bit patterns, tagged so overloads differ.
struct F16 { uint16_t x; };
struct BF16 { uint16_t x; };

__device__ __forceinline__ double to_f64(float v) { return static_cast<double>(v); }
__device__ __forceinline__ double to_f64(double v) { return v; }
__device__ __forceinline__ double to_f64(F16 v) {
  return static_cast<double>(__half2float(__ushort_as_half(v.x)));
}
__device__ __forceinline__ double to_f64(BF16 v) {
  return static_cast<double>(__uint_as_float(static_cast<uint32_t>(v.x) << 16));
}

// float64 -> destination through float32, round to nearest even at each step (as the reference).
__device__ __forceinline__ void from_f64(double v, float& o) { o = __double2float_rn(v); }
__device__ __forceinline__ void from_f64(double v, double& o) { o = v; }
__device__ __forceinline__ void from_f64(double v, F16& o) {
  o.x = __half_as_ushort(__float2half_rn(__double2float_rn(v)));
}
__device__ __forceinline__ void from_f64(double v, BF16& o) {
  o.x = __bfloat16_as_ushort(__float2bfloat16_rn(__double2float_rn(v)));
}

// kVec elements as 16-byte words: 1 (16-bit types), 2 (float) or 4 (double) vector accesses.
template <typename T>
union Pack {
  static constexpr int kWords = sizeof(T) * kVec / 16;
  uint4 w[kWords];
  T v[kVec];
};

template <typename T>
__device__ __forceinline__ void load_pack(const T* p, Pack<T>& pk) {
  const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < Pack<T>::kWords; ++i) pk.w[i] = q[i];
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T>& pk) {
  uint4* q = reinterpret_cast<uint4*>(p);
#pragma unroll
  for (int i = 0; i < Pack<T>::kWords; ++i) q[i] = pk.w[i];
}

// kVec elements x[0, kVec) -> y[0, kVec) through f (double -> double), as vector accesses.
template <typename S, typename D, typename F>
__device__ __forceinline__ void convert_vec(const S* __restrict__ x, D* __restrict__ y, F f) {
  Pack<S> in;
  Pack<D> out;
  load_pack(x, in);
#pragma unroll
  for (int k = 0; k < kVec; ++k) from_f64(f(to_f64(in.v[k])), out.v[k]);
  store_pack(y, out);
}

// ---- tokenize: item = one (model, segment); writes its whole span (values, then zeros) ----
struct TokItem {
  const void* src;
  int64_t dst;       // element offset of the segment in out: n * T*C + offset[s]
  int64_t numel;
  int64_t span;
  double shift;
  double rscale;
  int32_t code;      // source dtype
  int32_t aligned;   // src and out + dst both 16-byte aligned: vector accesses allowed
  int64_t first_tile;
};

template <typename S, typename D>
__device__ __forceinline__ void tokenize_tile(const S* __restrict__ x, D* __restrict__ y,
                                              int64_t start, const TokItem& w) {
  const double shift = w.shift, rscale = w.rscale;
  const auto f = [=](double v) { return __dmul_rn(__dsub_rn(v, shift), rscale); };
#pragma unroll 2
  for (int step = 0; step < kSteps; ++step) {
    const int64_t e = start + (static_cast<int64_t>(step) * kThreads + threadIdx.x) * kVec;
    if (e >= w.span) break;
    if (w.aligned && e + kVec <= w.numel) {  // full vector of weights
      convert_vec(x + e, y + e, f);
    } else if (w.aligned && e >= w.numel && e + kVec <= w.span) {  // full vector of padding
      Pack<D> out;
#pragma unroll
      for (int i = 0; i < Pack<D>::kWords; ++i) out.w[i] = make_uint4(0, 0, 0, 0);
      store_pack(y + e, out);
    } else {  // ragged edge or unaligned tensors
      for (int k = 0; k < kVec && e + k < w.span; ++k) {
        D o;
        from_f64(e + k < w.numel ? f(to_f64(x[e + k])) : 0.0, o);
        y[e + k] = o;
      }
    }
  }
}

template <typename D>
__global__ void __launch_bounds__(kThreads)
    tokenize_kernel(D* __restrict__ out, const TokItem* __restrict__ items,
                    const int32_t* __restrict__ tile_item) {
  const TokItem w = items[tile_item[blockIdx.x]];
  const int64_t start = (static_cast<int64_t>(blockIdx.x) - w.first_tile) * kTile;
  D* y = out + w.dst;
  switch (w.code) {  // uniform per block
    case kF32: tokenize_tile(static_cast<const float*>(w.src), y, start, w); break;
    case kF16: tokenize_tile(static_cast<const F16*>(w.src), y, start, w); break;
    case kBF16: tokenize_tile(static_cast<const BF16*>(w.src), y, start, w); break;
    default: tokenize_tile(static_cast<const double*>(w.src), y, start, w); break;
  }
}

// ---- detokenize: item = one (model, segment); reads numel tokens, writes the tensor ----
struct DetokItem {
  void* dst;
  int64_t src;       // element offset of the segment in tokens
  int64_t numel;
  double scale;
  double unshift;
  int32_t code;      // destination dtype
  int32_t aligned;
  int64_t first_tile;
};

template <typename S, typename D>
__device__ __forceinline__ void detokenize_tile(const S* __restrict__ y, D* __restrict__ x,
                                                int64_t start, const DetokItem& w) {
  const double scale = w.scale, unshift = w.unshift;
  const auto f = [=](double v) { return __dadd_rn(__dmul_rn(v, scale), unshift); };
#pragma unroll 2
  for (int step = 0; step < kSteps; ++step) {
    const int64_t e = start + (static_cast<int64_t>(step) * kThreads + threadIdx.x) * kVec;
    if (e >= w.numel) break;
    if (w.aligned && e + kVec <= w.numel) {
      convert_vec(y + e, x + e, f);
    } else {
      for (int k = 0; k < kVec && e + k < w.numel; ++k) {
        D o;
        from_f64(f(to_f64(y[e + k])), o);
        x[e + k] = o;
      }
    }
  }
}

template <typename S>
__global__ void __launch_bounds__(kThreads)
    detokenize_kernel(const S* __restrict__ tokens, const DetokItem* __restrict__ items,
                      const int32_t* __restrict__ tile_item) {
  const DetokItem w = items[tile_item[blockIdx.x]];
  const int64_t start = (static_cast<int64_t>(blockIdx.x) - w.first_tile) * kTile;
  const S* y = tokens + w.src;
  switch (w.code) {
    case kF32: detokenize_tile(y, static_cast<float*>(w.dst), start, w); break;
    case kF16: detokenize_tile(y, static_cast<F16*>(w.dst), start, w); break;
    case kBF16: detokenize_tile(y, static_cast<BF16*>(w.dst), start, w); break;
    default: detokenize_tile(y, static_cast<double*>(w.dst), start, w); break;
  }
}

// ---- host side ----

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Items, then the block -> item map, in one device buffer (one host-to-device copy). The
// buffer is freed through the caching allocator, which orders its reuse after this stream's
// kernel.
template <typename Item>
std::pair<at::Tensor, int64_t> upload(const at::Tensor& like, const std::vector<Item>& items,
                                      const std::vector<int32_t>& tile_item,
                                      cudaStream_t stream) {
  const int64_t item_bytes = static_cast<int64_t>(items.size() * sizeof(Item));
  const int64_t map_at = (item_bytes + 15) / 16 * 16;
  const int64_t total = map_at + static_cast<int64_t>(tile_item.size() * sizeof(int32_t));
  std::vector<char> host(total);
  std::memcpy(host.data(), items.data(), item_bytes);
  std::memcpy(host.data() + map_at, tile_item.data(), tile_item.size() * sizeof(int32_t));
  at::Tensor dev = like.new_empty({total}, like.options().dtype(at::kByte));
  // From pageable memory: returns once `host` is staged, so it may be freed right after.
  C10_CUDA_CHECK(cudaMemcpyAsync(dev.data_ptr(), host.data(), total, cudaMemcpyHostToDevice,
                                 stream));
  return {dev, map_at};
}

template <typename F>
void with_dtype(const at::Tensor& t, F&& f) {
  switch (t.scalar_type()) {
    case at::kFloat: f(static_cast<float*>(nullptr)); break;
    case at::kHalf: f(static_cast<F16*>(nullptr)); break;
    case at::kBFloat16: f(static_cast<BF16*>(nullptr)); break;
    case at::kDouble: f(static_cast<double*>(nullptr)); break;
    default: TORCH_CHECK(false, "d2nwg tokenize: tokens have dtype ", t.scalar_type(),
                         "; expected float32, float16, bfloat16 or float64");
  }
}

// The work of one launch: items, and one block per kTile elements of each item (the block ->
// item map). Both go to the device in one buffer; `launch` runs the kernel on the dtype of
// `rows` (the token tensor).
template <typename Item>
struct WorkList {
  std::vector<Item> items;
  std::vector<int32_t> tile_item;

  void add(Item w, int64_t elements) {
    const int64_t tiles = (elements + kTile - 1) / kTile;
    if (tiles == 0) return;
    w.first_tile = static_cast<int64_t>(tile_item.size());
    tile_item.insert(tile_item.end(), tiles, static_cast<int32_t>(items.size()));
    items.push_back(w);
  }

  template <typename F>
  void launch(const at::Tensor& rows, const char* op, F&& kernel) const {
    if (tile_item.empty()) return;
    TORCH_CHECK(tile_item.size() < (size_t{1} << 31), op, ": too many tiles");
    const c10::cuda::CUDAGuard guard(rows.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(rows.device().index()).stream();
    auto [table, map_at] = upload(rows, items, tile_item, stream);
    const auto* dev_items = reinterpret_cast<const Item*>(table.data_ptr());
    const auto* dev_map =
        reinterpret_cast<const int32_t*>(static_cast<char*>(table.data_ptr()) + map_at);
    const dim3 grid(static_cast<unsigned>(tile_item.size()));
    with_dtype(rows, [&](auto* tag) { kernel(tag, grid, stream, dev_items, dev_map); });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

void tokenize_cuda(const at::Tensor& out, at::TensorList sources, c10::ArrayRef<int64_t> offsets,
                   c10::ArrayRef<int64_t> spans, c10::ArrayRef<double> shift,
                   c10::ArrayRef<double> rscale) {
  const auto [N, S, R] = check_tokenize_args(out, sources, offsets, spans, shift.size(),
                                             rscale.size(), c10::DeviceType::CUDA);
  const int64_t dsize = out.element_size();
  const char* out_base = static_cast<const char*>(out.data_ptr());
  WorkList<TokItem> work;
  work.items.reserve(N * S);
  for (int64_t i = 0; i < N * S; ++i) {
    const at::Tensor& src = sources[i];
    const int64_t n = i / S, s = i % S;
    if (spans[s] == 0) continue;
    TokItem w;
    w.src = src.data_ptr();
    w.dst = n * R + offsets[s];
    w.numel = src.numel();
    w.span = spans[s];
    w.shift = shift[s];
    w.rscale = rscale[s];
    w.code = dtype_code(src, "sources", i);
    w.aligned = aligned16(w.src) && aligned16(out_base + w.dst * dsize);
    work.add(w, spans[s]);  // the padding is written too
  }
  work.launch(out, "d2nwg tokenize", [&](auto* tag, dim3 grid, cudaStream_t stream,
                                         const TokItem* items, const int32_t* map) {
    using D = std::remove_pointer_t<decltype(tag)>;
    tokenize_kernel<D><<<grid, kThreads, 0, stream>>>(static_cast<D*>(out.data_ptr()), items, map);
  });
}

void detokenize_cuda(const at::Tensor& tokens, at::TensorList dests,
                     c10::ArrayRef<int64_t> offsets, c10::ArrayRef<double> unshift,
                     c10::ArrayRef<double> scale) {
  const auto [N, S, R] = check_detokenize_args(tokens, dests, offsets, unshift.size(),
                                               scale.size(), c10::DeviceType::CUDA);
  const int64_t ssize = tokens.element_size();
  const char* tok_base = static_cast<const char*>(tokens.data_ptr());
  WorkList<DetokItem> work;
  work.items.reserve(N * S);
  for (int64_t i = 0; i < N * S; ++i) {
    const at::Tensor& dst = dests[i];
    const int64_t n = i / S, s = i % S;
    if (dst.numel() == 0) continue;
    DetokItem w;
    w.dst = dst.data_ptr();
    w.src = n * R + offsets[s];
    w.numel = dst.numel();
    w.scale = scale[s];
    w.unshift = unshift[s];
    w.code = dtype_code(dst, "dests", i);
    w.aligned = aligned16(w.dst) && aligned16(tok_base + w.src * ssize);
    work.add(w, w.numel);
  }
  work.launch(tokens, "d2nwg detokenize", [&](auto* tag, dim3 grid, cudaStream_t stream,
                                              const DetokItem* items, const int32_t* map) {
    using S = std::remove_pointer_t<decltype(tag)>;
    detokenize_kernel<S><<<grid, kThreads, 0, stream>>>(static_cast<const S*>(tokens.data_ptr()),
                                                        items, map);
  });
}

}  // namespace d2nwg
