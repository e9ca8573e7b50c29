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

// ---- work items: one (model, segment) of a launch, filled on the host, read by its blocks ----
// One record for both directions: tokenize reads the list entry and writes the token row,
// detokenize the reverse. V is const void (tokenize's sources) or void (detokenize's dests).
template <typename V>
struct Item {
  V* tensor;         // the list entry
  int64_t row_at;    // element offset of the segment in the token rows: n * T*C + offset[s]
  int64_t numel;     // the list entry's elements
  int64_t span;      // elements the item's blocks write: tokenize, the segment's span (values,
                     // then zeros); detokenize, numel
  double a, b;       // the segment's map: tokenize (x - a) * b, detokenize y * a + b
  int32_t code;      // the list entry's dtype
  int32_t aligned;   // the list entry and the segment's row start 16-byte aligned: vector accesses
  int64_t first_tile;
};
using TokItem = Item<const void>;
using DetokItem = Item<void>;

// T, const when V is (the list entry keeps the constness of its direction).
template <typename V, typename T>
using ConstLike = std::conditional_t<std::is_const<V>::value, const T, T>;

// f(the item's list entry as a pointer to its dtype). The code is the same for the whole block,
// so the switch does not diverge and the kernels are templated only on the token dtype.
template <typename V, typename F>
__device__ __forceinline__ void with_item_dtype(const Item<V>& w, F f) {
  switch (w.code) {
    case kF32: f(static_cast<ConstLike<V, float>*>(w.tensor)); break;
    case kF16: f(static_cast<ConstLike<V, F16>*>(w.tensor)); break;
    case kBF16: f(static_cast<ConstLike<V, BF16>*>(w.tensor)); break;
    default: f(static_cast<ConstLike<V, double>*>(w.tensor)); break;
  }
}

// Where item w's writes end: tokenize pads up to the span, detokenize writes numel elements.
// Read at each use (a local copy changes how the tile loop below is unrolled and scheduled).
template <bool kPad, typename V>
__device__ __forceinline__ int64_t item_end(const Item<V>& w) { return kPad ? w.span : w.numel; }

// This block's tile of item w: x[e] -> y[e] through f for e < numel, as kVec-element vectors
// where both sides are aligned. kPad (tokenize): y continues with zeros up to the span.
template <bool kPad, typename S, typename D, typename V, typename F>
__device__ __forceinline__ void convert_tile(const S* __restrict__ x, D* __restrict__ y,
                                             const Item<V>& w, F f) {
  const int64_t start = (static_cast<int64_t>(blockIdx.x) - w.first_tile) * kTile;
#pragma unroll 2
  for (int step = 0; step < kSteps; ++step) {
    const int64_t e = start + (static_cast<int64_t>(step) * kThreads + threadIdx.x) * kVec;
    if (e >= item_end<kPad>(w)) break;
    if (w.aligned && e + kVec <= w.numel) {  // full vector of values
      convert_vec(x + e, y + e, f);
    } else if (kPad && w.aligned && e >= w.numel && e + kVec <= item_end<kPad>(w)) {
      // full vector of padding
      Pack<D> out;
#pragma unroll
      for (int i = 0; i < Pack<D>::kWords; ++i) out.w[i] = make_uint4(0, 0, 0, 0);
      store_pack(y + e, out);
    } else {  // ragged edge or unaligned tensors
      for (int k = 0; k < kVec && e + k < item_end<kPad>(w); ++k) {
        D o;
        from_f64(!kPad || e + k < w.numel ? f(to_f64(x[e + k])) : 0.0, o);
        y[e + k] = o;
      }
    }
  }
}

// tokenize: the item's source -> its segment of the token rows `out`, padded to the span.
template <typename D>
__global__ void __launch_bounds__(kThreads)
    tokenize_kernel(D* __restrict__ out, const TokItem* __restrict__ items,
                    const int32_t* __restrict__ tile_item) {
  const TokItem w = items[tile_item[blockIdx.x]];
  const double shift = w.a, rscale = w.b;
  const auto f = [=](double v) { return __dmul_rn(__dsub_rn(v, shift), rscale); };
  with_item_dtype(w, [&](const auto* x) { convert_tile<true>(x, out + w.row_at, w, f); });
}

// detokenize: the item's segment of the token rows `tokens` -> its destination.
template <typename S>
__global__ void __launch_bounds__(kThreads)
    detokenize_kernel(const S* __restrict__ tokens, const DetokItem* __restrict__ items,
                      const int32_t* __restrict__ tile_item) {
  const DetokItem w = items[tile_item[blockIdx.x]];
  const double scale = w.a, unshift = w.b;
  const auto f = [=](double v) { return __dadd_rn(__dmul_rn(v, scale), unshift); };
  with_item_dtype(w, [&](auto* x) { convert_tile<false>(tokens + w.row_at, x, w, f); });
}

// ---- host side ----

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Items, then the block -> item map, in one device buffer (one host-to-device copy). The
// buffer is freed through the caching allocator, which orders its reuse after this stream's
// kernel.
template <typename V>
std::pair<at::Tensor, int64_t> upload(const at::Tensor& like, const std::vector<Item<V>>& items,
                                      const std::vector<int32_t>& tile_item,
                                      cudaStream_t stream) {
  const int64_t item_bytes = static_cast<int64_t>(items.size() * sizeof(Item<V>));
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

// f(a value-initialized scalar of the token dtype): its type picks the kernel.
template <typename F>
void with_dtype(const at::Tensor& t, F&& f) {
  switch (t.scalar_type()) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(F16{}); break;
    case at::kBFloat16: f(BF16{}); break;
    case at::kDouble: f(double{}); break;
    default: TORCH_CHECK(false, "d2nwg tokenize: tokens have dtype ", t.scalar_type(),
                         "; expected float32, float16, bfloat16 or float64");
  }
}

// The work of one launch: the items, and one block per kTile elements of each item's span (the
// block -> item map). Both go to the device in one buffer; `launch` runs the kernel for the
// dtype of `rows` (the token tensor).
template <typename V>
struct WorkList {
  std::vector<Item<V>> items;
  std::vector<int32_t> tile_item;

  // One item per list entry with elements to write, model-major as the list is (entry i is
  // model i / S, segment i % S), with its segment's map a, b. spans: what each segment's items
  // write (tokenize: values, then zeros); empty: each entry's numel (detokenize).
  WorkList(const at::Tensor& rows, at::TensorList list, const char* what, TokenizeShape shape,
           c10::ArrayRef<int64_t> offsets, c10::ArrayRef<int64_t> spans, c10::ArrayRef<double> a,
           c10::ArrayRef<double> b) {
    const auto [N, S, R] = shape;
    const char* row_base = static_cast<const char*>(rows.data_ptr());
    const int64_t row_size = rows.element_size();
    items.reserve(N * S);
    for (int64_t i = 0; i < N * S; ++i) {
      const at::Tensor& t = list[i];
      const int64_t n = i / S, s = i % S;
      Item<V> w;
      w.numel = t.numel();
      w.span = spans.empty() ? w.numel : spans[s];
      if (w.span == 0) continue;
      w.tensor = t.data_ptr();
      w.row_at = n * R + offsets[s];
      w.a = a[s];
      w.b = b[s];
      w.code = dtype_code(t, what, i);
      w.aligned = aligned16(w.tensor) && aligned16(row_base + w.row_at * row_size);
      add(w);
    }
  }

  void add(Item<V> w) {
    const int64_t tiles = (w.span + kTile - 1) / kTile;
    w.first_tile = static_cast<int64_t>(tile_item.size());
    tile_item.insert(tile_item.end(), tiles, static_cast<int32_t>(items.size()));
    items.push_back(w);
  }

  // kernel_for(tag): the kernel for the token dtype decltype(tag).
  template <typename Pick>
  void launch(const at::Tensor& rows, const char* op, Pick kernel_for) const {
    if (tile_item.empty()) return;
    TORCH_CHECK(tile_item.size() < (size_t{1} << 31), op, ": too many tiles");
    const c10::cuda::CUDAGuard guard(rows.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(rows.device().index()).stream();
    auto [table, map_at] = upload(rows, items, tile_item, stream);
    const auto* dev_items = reinterpret_cast<const Item<V>*>(table.data_ptr());
    const auto* dev_map =
        reinterpret_cast<const int32_t*>(static_cast<char*>(table.data_ptr()) + map_at);
    const dim3 grid(static_cast<unsigned>(tile_item.size()));
    with_dtype(rows, [&](auto tag) {
      const auto kernel = kernel_for(tag);
      kernel<<<grid, kThreads, 0, stream>>>(static_cast<decltype(tag)*>(rows.data_ptr()),
                                            dev_items, dev_map);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace

void tokenize_cuda(const at::Tensor& out, at::TensorList sources, c10::ArrayRef<int64_t> offsets,
                   c10::ArrayRef<int64_t> spans, c10::ArrayRef<double> shift,
                   c10::ArrayRef<double> rscale) {
  const TokenizeShape shape = check_tokenize_args(out, sources, offsets, spans, shift.size(),
                                                  rscale.size(), c10::DeviceType::CUDA);
  const WorkList<const void> work(out, sources, "sources", shape, offsets, spans, shift, rscale);
  work.launch(out, "d2nwg tokenize", [](auto tag) { return tokenize_kernel<decltype(tag)>; });
}

void detokenize_cuda(const at::Tensor& tokens, at::TensorList dests,
                     c10::ArrayRef<int64_t> offsets, c10::ArrayRef<double> unshift,
                     c10::ArrayRef<double> scale) {
  const TokenizeShape shape = check_detokenize_args(tokens, dests, offsets, unshift.size(),
                                                    scale.size(), c10::DeviceType::CUDA);
  const WorkList<void> work(tokens, dests, "dests", shape, offsets, {}, scale, unshift);
  work.launch(tokens, "d2nwg detokenize",
              [](auto tag) { return detokenize_kernel<decltype(tag)>; });
}

}  // namespace d2nwg
