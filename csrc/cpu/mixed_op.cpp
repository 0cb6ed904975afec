// mixed_op (SPEC 2.1) on the CPU: y = sum_k w[b, p(h,w), k] * outputs[k].
//
// The op is memory bound (K+1 streams forward, 2K+1 backward), so the kernels
// are written around the traffic:
// - the K outputs are read in place through a pointer array (never stacked);
// - work is cut into runs of consecutive elements that share one weight per
//   op, and each run is processed in L1-sized tiles: the accumulator tile
//   stays in L1 while the K inputs stream through it once;
// - per-patch weights (P > 1) take one of two paths, by the length of a patch
//   row (W / gw elements; Geometry::use_map):
//   * bands (rows of 8 elements or more): an item is the band of one patch row
//     in one (b, c) plane; the band's weights are painted into a K x W column
//     vector reused for every row;
//   * maps (shorter rows, e.g. 16x16 maps on a 4x4 grid): the per-row loops
//     would be a few elements long, so the weights of a sample are painted into
//     a K x H*W per-pixel map once, and an item is a group of whole planes,
//     each a long loop y = sum_k map_k * o_k; backward accumulates g * o_k per
//     pixel over the item's planes and folds the sums into patches at the end;
// - the backward is fused: each tile of the incoming gradient g is read once
//   and reused for every op, for both grad o_k = w_k * g and the partial dot
//   products sum(g * o_k) that become grad w;
// - grad w is deterministic: every run writes its partial sums to its own slot
//   and the slots are added in a fixed order afterwards, so the result does not
//   depend on the number of threads.
// - channels_last (NHWC) outputs are read in place too: a sample is then one
//   plane of H rows of W*C elements, and a patch column covers the C channels
//   of each of its pixel columns (MixedOpShape::storage_order), so the same
//   runs, bands and maps serve both layouts; y and the gradients of the
//   outputs take the outputs' layout (channels_last_order in layout.h).
// Threads come from at::parallel_for (PyTorch's intra-op pool). Accumulation is
// in float (double for double inputs). The hot loops (mixed_op_kernels.h) are
// plain C++ that gcc -O3 vectorizes, compiled twice, for AVX2+FMA+F16C and for
// the baseline ISA, and picked at run time; ops are processed four at a time;
// the dot products use lane arrays so they vectorize without -ffast-math.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <c10/util/bit_cast.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "mixed_op.h"

namespace nasops {
namespace {

// Elements per L1 tile: K inputs stream through a 8 KiB (fp32) accumulator.
constexpr int64_t kTile = 2048;
// Elements per work item when one weight covers a whole sample (P == 1).
constexpr int64_t kChunk = 16384;
// Per-patch weights use the map kernels when a patch row is shorter than this
// (elements) and the maps take at most kMapMaxBytes.
constexpr int64_t kMapBelowRun = 8;
constexpr int64_t kMapMaxBytes = 512 * 1024;

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

template <typename scalar_t>
constexpr bool kAccumulatesInPlace = std::is_same_v<scalar_t, acc_type<scalar_t>>;

// ---- the work decomposition ----------------------------------------------------
// P == 1: item (b, chunk) = kChunk consecutive elements of sample b; partial
//         sums [B][chunks][K].
// P > 1, maps (short patch rows, see use_map): item (b, planes) = a group of
//         whole (b, c) planes; partial sums [B][plane groups][P][K].
// P > 1, bands: item (b, c, ph) = the band of patch row ph in plane (b, c);
//         partial sums [B][C][P][K] (each band fills its gw patches).
// Either way grad w[bw, p, k] = sum over b (all b when Bw == 1, else b = bw)
// and over the items' slots, in index order. The items depend on the shape
// only, never on the thread count, so grad w is the same for any thread count.

struct Geometry {
  MixedOpShape s;
  std::vector<int64_t> rows;  // gh + 1 row starts
  std::vector<int64_t> cols;  // gw + 1 column starts
  int64_t chunks = 0;         // P == 1: chunks per sample
  bool map = false;           // P > 1: per-pixel weight maps instead of bands
  int64_t planes = 0;         // maps: planes per item
  int64_t plane_groups = 0;   // maps: items per sample

  explicit Geometry(const MixedOpShape& shape) : s(shape) {
    for (int64_t i = 0; i <= s.gh; ++i) rows.push_back(patch_start(i, s.gh, s.H));
    for (int64_t i = 0; i <= s.gw; ++i) cols.push_back(s.col_start(i));
    chunks = (s.sample() + kChunk - 1) / kChunk;
    map = use_map();
    planes = std::max<int64_t>(1, kChunk / std::max<int64_t>(1, s.plane()));
    plane_groups = (s.C + planes - 1) / planes;
  }
  bool single_patch() const { return s.P() == 1; }
  int64_t items() const {
    if (single_patch()) return s.B * chunks;
    return map ? s.B * plane_groups : s.B * s.C * s.gh;
  }
  // Elements per item, for the parallel_for grain.
  int64_t item_size() const {
    if (single_patch()) return std::min(kChunk, s.sample());
    return map ? planes * s.plane() : (s.H / s.gh + 1) * s.W;
  }
  int64_t grain() const { return std::max<int64_t>(1, kChunk / std::max<int64_t>(1, item_size())); }
  // Partial-sum slots (each K wide) per sample.
  int64_t slots_per_sample() const {
    if (single_patch()) return chunks;
    return (map ? plane_groups : s.C) * s.P();
  }

  // One item of the run and band paths (not maps): its elements
  // [offset, offset + n), the first of its weights (row weight_row of the
  // (Bw * P, K) weights) and the first of its partial-sum slots (each K wide).
  struct Span {
    int64_t offset, n, weight_row, slot;
  };
  Span span(int64_t item) const {
    if (single_patch()) {  // item (b, chunk), slot (b, chunk)
      const int64_t b = item / chunks, start = (item % chunks) * kChunk;
      return {b * s.sample() + start, std::min(kChunk, s.sample() - start), s.Bw == 1 ? 0 : b, item};
    }
    // item (b, c, ph): the band of patch row ph in plane b * C + c; slots (b, c, p)
    const int64_t ph = item % s.gh, plane = item / s.gh, b = plane / s.C;
    return {plane * s.plane() + rows[ph] * s.W, (rows[ph + 1] - rows[ph]) * s.W,
            (s.Bw == 1 ? 0 : b) * s.P() + ph * s.gw, plane * s.P() + ph * s.gw};
  }

 private:
  // Maps pay K*H*W weights painted (and, backward, K*H*W sums folded) per item,
  // and the backward reads and updates two K x H*W arrays per plane; bands pay
  // loop overhead per patch-row segment. Measured (1 thread, K = 8, grid 4x4):
  // runs of 4 (64,64,16,16): maps fwd 1.5 ms vs bands 2.5, fwd+bwd 5.6 vs 8.8;
  // runs of 8 (64,16,32,32): bands backward 3.4 ms vs maps 5.4-6.6. So maps for
  // runs shorter than kMapBelowRun whose maps stay in L2.
  bool use_map() const {
    if (s.P() == 1 || s.gw == 1) return false;
    const int64_t map_bytes = 2 * s.K * s.plane() * 4;  // float accumulators
    return s.W < kMapBelowRun * s.gw && map_bytes <= kMapMaxBytes;
  }
};

// Per-thread buffers of the band kernels (P > 1 with gw > 1).
template <typename scalar_t>
struct BandScratch {
  using acc_t = acc_type<scalar_t>;
  std::vector<acc_t> wcol;  // K x W: the weight of every column, per op
  std::vector<acc_t> tile;  // rows_per_tile x W: accumulator / converted g
  std::vector<acc_t> colsum;  // K x W: per-column sums of g * o_k (backward)
};

// Per-thread buffers of the map kernels (P > 1, Geometry::map).
template <typename scalar_t>
struct MapScratch {
  using acc_t = acc_type<scalar_t>;
  std::vector<acc_t> map;     // K x H*W: the weight of every pixel, per op
  int64_t painted = -1;       // the sample whose weights `map` holds
  std::vector<acc_t> tile;    // kTile: accumulator / converted g
  std::vector<acc_t> pixsum;  // K x H*W: per-pixel sums of g * o_k (backward)
};

template <typename scalar_t>
std::vector<const scalar_t*> data_pointers(const std::vector<at::Tensor>& tensors) {
  std::vector<const scalar_t*> ptrs;
  for (const auto& t : tensors) ptrs.push_back(t.const_data_ptr<scalar_t>());
  return ptrs;
}

// The hot loops, once per instruction set (see mixed_op_kernels.h).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define NASOPS_MIXED_OP_AVX2 1
namespace avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define NASOPS_F16C_CONVERSIONS 1
#include "cpu/mixed_op_kernels.h"
#undef NASOPS_F16C_CONVERSIONS
#pragma GCC pop_options
}  // namespace avx2
#endif
namespace baseline {
#include "cpu/mixed_op_kernels.h"
}  // namespace baseline

bool use_avx2() {
#ifdef NASOPS_MIXED_OP_AVX2
  static const bool supported = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                                __builtin_cpu_supports("f16c");
  return supported;
#else
  return false;
#endif
}

template <typename scalar_t>
void forward_kernel(const Geometry& geo, const std::vector<at::Tensor>& outputs,
                    const at::Tensor& weights, at::Tensor& y) {
#ifdef NASOPS_MIXED_OP_AVX2
  if (use_avx2()) return avx2::forward_kernel<scalar_t>(geo, outputs, weights, y);
#endif
  baseline::forward_kernel<scalar_t>(geo, outputs, weights, y);
}

template <typename scalar_t>
void backward_kernel(const Geometry& geo, const at::Tensor& grad,
                     const std::vector<at::Tensor>& outputs, const at::Tensor& weights,
                     std::vector<at::Tensor>& grad_outputs, at::Tensor& partial) {
#ifdef NASOPS_MIXED_OP_AVX2
  if (use_avx2()) {
    return avx2::backward_kernel<scalar_t>(geo, grad, outputs, weights, grad_outputs, partial);
  }
#endif
  baseline::backward_kernel<scalar_t>(geo, grad, outputs, weights, grad_outputs, partial);
}

// grad w[bw, p, k] = sum over the samples of bw and their slots; partial is
// (B, slots, P', K) viewed flat, with P' = P for bands and 1 for chunks.
template <typename acc_t>
void reduce_partials(const Geometry& geo, const at::Tensor& partial, at::Tensor& grad_w) {
  const auto& s = geo.s;
  const int64_t K = s.K, P = s.P();
  const int64_t slots =  // per (sample, patch)
      geo.single_patch() ? geo.chunks : (geo.map ? geo.plane_groups : s.C);
  const acc_t* part = partial.const_data_ptr<acc_t>();
  acc_t* gw = grad_w.mutable_data_ptr<acc_t>();
  // A parallel region costs more than a few thousand additions (waking a
  // thread; much more on a loaded machine): stay serial unless there is work.
  const int64_t adds_per_output = (s.Bw == 1 ? s.B : 1) * slots * K;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, adds_per_output));
  at::parallel_for(0, s.Bw * P, grain, [&](int64_t begin, int64_t end) {
    for (int64_t bp = begin; bp < end; ++bp) {
      const int64_t bw = bp / P, p = bp % P;
      std::vector<acc_t> sum(K, acc_t(0));
      const int64_t b0 = s.Bw == 1 ? 0 : bw, b1 = s.Bw == 1 ? s.B : bw + 1;
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t slot = 0; slot < slots; ++slot) {
          const acc_t* src = part + ((b * slots + slot) * P + p) * K;
          for (int64_t k = 0; k < K; ++k) sum[k] += src[k];
        }
      }
      std::copy(sum.begin(), sum.end(), gw + bp * K);
    }
  });
}

std::vector<at::Tensor> contiguous_all(at::TensorList tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) out.push_back(t.contiguous());
  return out;
}

at::Tensor mixed_op_cpu(at::TensorList outputs_in, const at::Tensor& weights_in,
                        at::IntArrayRef grid) {
  const MixedOpShape s = check_mixed_op("nasops::mixed_op", outputs_in, weights_in, grid);
  TORCH_CHECK(outputs_in[0].device().is_cpu(), "nasops::mixed_op (CPU): outputs on ",
              outputs_in[0].device());
  const bool channels_last = channels_last_order(outputs_in);
  at::Tensor y = at::empty(outputs_in[0].sizes(), outputs_in[0].options().memory_format(
                                                      memory_format_of(channels_last)));
  if (y.numel() == 0) return y;
  const auto outputs = channels_last ? outputs_in.vec() : contiguous_all(outputs_in);
  const at::Tensor weights = weights_in.contiguous();
  const Geometry geo(s.storage_order(channels_last));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "mixed_op_cpu", [&] {
    forward_kernel<scalar_t>(geo, outputs, weights, y);
  });
  return y;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> mixed_op_backward_cpu(
    const at::Tensor& grad_in, at::TensorList outputs_in, const at::Tensor& weights_in,
    at::IntArrayRef grid, bool outputs_requires_grad, bool weights_requires_grad) {
  const MixedOpShape s = check_mixed_op("nasops::mixed_op_backward", outputs_in, weights_in, grid);
  TORCH_CHECK(grad_in.sizes() == outputs_in[0].sizes() &&
                  grad_in.scalar_type() == outputs_in[0].scalar_type() &&
                  grad_in.device() == outputs_in[0].device(),
              "nasops::mixed_op_backward: grad must match outputs[0] (", outputs_in[0].sizes(),
              ", ", outputs_in[0].scalar_type(), "), got ", grad_in.sizes(), ", ",
              grad_in.scalar_type());
  const bool channels_last = channels_last_order(outputs_in);
  const auto memory_format = memory_format_of(channels_last);
  std::vector<at::Tensor> grad_outputs;
  if (outputs_requires_grad) {
    for (int64_t k = 0; k < s.K; ++k) {
      grad_outputs.push_back(at::empty(grad_in.sizes(), grad_in.options().memory_format(memory_format)));
    }
  }
  at::Tensor grad_w = weights_requires_grad ? at::zeros_like(weights_in, at::MemoryFormat::Contiguous)
                                            : weights_in.new_empty({0});
  if (grad_in.numel() == 0 || (!outputs_requires_grad && !weights_requires_grad)) {
    return {grad_outputs, grad_w};
  }
  // Without grad w the outputs are never read: no copies of non-contiguous ones.
  const auto outputs = weights_requires_grad && !channels_last ? contiguous_all(outputs_in)
                                                               : outputs_in.vec();
  // A gradient in the other layout is copied once (autograd decides its layout).
  const at::Tensor grad = grad_in.contiguous(memory_format);
  const at::Tensor weights = weights_in.contiguous();
  const Geometry geo(s.storage_order(channels_last));
  at::Tensor partial;
  if (weights_requires_grad) {
    partial = at::empty({s.B * geo.slots_per_sample(), s.K}, weights.options());
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "mixed_op_backward_cpu", [&] {
    // Without grad w the outputs are never read: don't dereference them.
    backward_kernel<scalar_t>(geo, grad, outputs, weights, grad_outputs, partial);
    if (weights_requires_grad) reduce_partials<acc_type<scalar_t>>(geo, partial, grad_w);
  });
  return {grad_outputs, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(nasops, CPU, m) {
  m.impl("mixed_op", &mixed_op_cpu);
  m.impl("mixed_op_backward", &mixed_op_backward_cpu);
}

}  // namespace nasops
