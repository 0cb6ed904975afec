// mixed_op (SPEC 2.1) on the CPU: y = sum_k w[b, p(h,w), k] * outputs[k].
//
// The op is memory bound (K+1 streams forward, 2K+1 backward), so the kernels
// are written around the traffic:
// - the K outputs are read in place through a pointer array (never stacked);
// - work is cut into runs of consecutive elements that share one weight per
//   op, and each run is processed in L1-sized tiles: the accumulator tile
//   stays in L1 while the K inputs stream through it once;
// - the backward is fused: each tile of the incoming gradient g is read once
//   and reused for every op, for both grad o_k = w_k * g and the partial dot
//   products sum(g * o_k) that become grad w;
// - grad w is deterministic: every run writes its partial sums to its own slot
//   and the slots are added in a fixed order afterwards, so the result does not
//   depend on the number of threads.
// Threads come from at::parallel_for (PyTorch's intra-op pool). Accumulation is
// in float (double for double inputs). Inner loops are plain C++ that gcc -O3
// vectorizes; the dot products use a lane array so they vectorize without
// -ffast-math.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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
// Independent partial sums in a dot product: enough for two AVX-512 registers.
constexpr int kLanes = 32;

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

template <typename scalar_t>
constexpr bool kAccumulatesInPlace = std::is_same_v<scalar_t, acc_type<scalar_t>>;

// Sum of x[i] * y[i] over n elements with kLanes independent accumulators.
template <typename acc_t, typename scalar_t>
inline acc_t dot(const acc_t* __restrict__ x, const scalar_t* __restrict__ y, int64_t n) {
  acc_t lanes[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += x[i + l] * static_cast<acc_t>(y[i + l]);
  }
  for (; i < n; ++i) lanes[i % kLanes] += x[i] * static_cast<acc_t>(y[i]);
  acc_t s = 0;
  for (int l = 0; l < kLanes; ++l) s += lanes[l];
  return s;
}

// acc[i] (=|+=) w * x[i]
template <bool kFirst, typename acc_t, typename scalar_t>
inline void axpy(acc_t* __restrict__ acc, acc_t w, const scalar_t* __restrict__ x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = w * static_cast<acc_t>(x[i]);
    acc[i] = kFirst ? v : acc[i] + v;
  }
}

template <typename scalar_t, typename acc_t>
inline void store(scalar_t* __restrict__ out, const acc_t* __restrict__ in, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(in[i]);
}

template <typename acc_t, typename scalar_t>
inline void load(acc_t* __restrict__ out, const scalar_t* __restrict__ in, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<acc_t>(in[i]);
}

// ---- runs: n consecutive elements, one weight per op ------------------------

// y[0:n] = sum_k w[k] * in[k][0:n]; in[k] and y already point at the run.
template <typename scalar_t>
void forward_run(const scalar_t* const* in, int64_t K, const acc_type<scalar_t>* w, int64_t n,
                 scalar_t* y) {
  using acc_t = acc_type<scalar_t>;
  acc_t tile[kAccumulatesInPlace<scalar_t> ? 1 : kTile];
  for (int64_t t = 0; t < n; t += kTile) {
    const int64_t m = std::min(kTile, n - t);
    acc_t* acc;
    if constexpr (kAccumulatesInPlace<scalar_t>) {
      acc = y + t;
    } else {
      acc = tile;
    }
    axpy<true>(acc, w[0], in[0] + t, m);
    for (int64_t k = 1; k < K; ++k) axpy<false>(acc, w[k], in[k] + t, m);
    if constexpr (!kAccumulatesInPlace<scalar_t>) store(y + t, acc, m);
  }
}

// grad_in[k][0:n] = w[k] * g[0:n] (when grad_in) and dots[k] += sum(g * in[k])
// (when dots), reading each tile of g once for all ops.
template <typename scalar_t>
void backward_run(const scalar_t* g, const scalar_t* const* in, int64_t K,
                  const acc_type<scalar_t>* w, int64_t n, scalar_t* const* grad_in,
                  acc_type<scalar_t>* dots) {
  using acc_t = acc_type<scalar_t>;
  acc_t tile[kAccumulatesInPlace<scalar_t> ? 1 : kTile];
  for (int64_t t = 0; t < n; t += kTile) {
    const int64_t m = std::min(kTile, n - t);
    const acc_t* gt;
    if constexpr (kAccumulatesInPlace<scalar_t>) {
      gt = g + t;
    } else {
      load(tile, g + t, m);
      gt = tile;
    }
    for (int64_t k = 0; k < K; ++k) {
      if (grad_in != nullptr) {
        scalar_t* __restrict__ out = grad_in[k] + t;
        const acc_t wk = w[k];
        for (int64_t i = 0; i < m; ++i) out[i] = static_cast<scalar_t>(wk * gt[i]);
      }
      if (dots != nullptr) dots[k] += dot(gt, in[k] + t, m);
    }
  }
}

// ---- bands: the rows of one patch row of one (b, c) plane (gw > 1) -----------
// A band is `rows` x W contiguous elements; within a row the weight changes at
// the column starts cols[0..gw]. Per op, the band's weights are painted into a
// W-long column vector once and reused for every row.

template <typename scalar_t>
struct BandScratch {
  using acc_t = acc_type<scalar_t>;
  std::vector<acc_t> wcol;  // K x W: the weight of every column, per op
  std::vector<acc_t> tile;  // rows_per_tile x W: accumulator / converted g
  std::vector<acc_t> colsum;  // K x W: per-column sums of g * o_k (backward)
};

// wcol[k*W + j] = w[pw(j)*K + k]; w points at the band's first patch.
template <typename acc_t>
void paint_columns(acc_t* wcol, const acc_t* w, int64_t K, const std::vector<int64_t>& cols,
                   int64_t W) {
  const int64_t gw = static_cast<int64_t>(cols.size()) - 1;
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t pw = 0; pw < gw; ++pw) {
      std::fill(wcol + k * W + cols[pw], wcol + k * W + cols[pw + 1], w[pw * K + k]);
    }
  }
}

template <typename scalar_t>
void forward_band(const scalar_t* const* in, int64_t K, const acc_type<scalar_t>* w,
                  const std::vector<int64_t>& cols, int64_t rows, int64_t W, scalar_t* y,
                  BandScratch<scalar_t>& s) {
  using acc_t = acc_type<scalar_t>;
  paint_columns(s.wcol.data(), w, K, cols, W);
  const int64_t tile_rows = std::max<int64_t>(1, kTile / W);
  for (int64_t r0 = 0; r0 < rows; r0 += tile_rows) {
    const int64_t nr = std::min(tile_rows, rows - r0);
    const int64_t off = r0 * W;
    acc_t* acc;
    if constexpr (kAccumulatesInPlace<scalar_t>) {
      acc = y + off;
    } else {
      acc = s.tile.data();
    }
    for (int64_t k = 0; k < K; ++k) {
      const acc_t* __restrict__ wk = s.wcol.data() + k * W;
      for (int64_t r = 0; r < nr; ++r) {
        acc_t* __restrict__ a = acc + r * W;
        const scalar_t* __restrict__ x = in[k] + off + r * W;
        if (k == 0) {
          for (int64_t j = 0; j < W; ++j) a[j] = wk[j] * static_cast<acc_t>(x[j]);
        } else {
          for (int64_t j = 0; j < W; ++j) a[j] += wk[j] * static_cast<acc_t>(x[j]);
        }
      }
    }
    if constexpr (!kAccumulatesInPlace<scalar_t>) store(y + off, acc, nr * W);
  }
}

// Backward of a band; dots points at the band's first patch: dots[pw*K + k].
template <typename scalar_t>
void backward_band(const scalar_t* g, const scalar_t* const* in, int64_t K,
                   const acc_type<scalar_t>* w, const std::vector<int64_t>& cols, int64_t rows,
                   int64_t W, scalar_t* const* grad_in, acc_type<scalar_t>* dots,
                   BandScratch<scalar_t>& s) {
  using acc_t = acc_type<scalar_t>;
  paint_columns(s.wcol.data(), w, K, cols, W);
  if (dots != nullptr) std::fill(s.colsum.begin(), s.colsum.end(), acc_t(0));
  const int64_t tile_rows = std::max<int64_t>(1, kTile / W);
  for (int64_t r0 = 0; r0 < rows; r0 += tile_rows) {
    const int64_t nr = std::min(tile_rows, rows - r0);
    const int64_t off = r0 * W;
    const acc_t* gt;
    if constexpr (kAccumulatesInPlace<scalar_t>) {
      gt = g + off;
    } else {
      load(s.tile.data(), g + off, nr * W);
      gt = s.tile.data();
    }
    for (int64_t k = 0; k < K; ++k) {
      const acc_t* __restrict__ wk = s.wcol.data() + k * W;
      acc_t* __restrict__ cs = s.colsum.data() + k * W;
      for (int64_t r = 0; r < nr; ++r) {
        const acc_t* __restrict__ gr = gt + r * W;
        if (grad_in != nullptr) {
          scalar_t* __restrict__ out = grad_in[k] + off + r * W;
          for (int64_t j = 0; j < W; ++j) out[j] = static_cast<scalar_t>(wk[j] * gr[j]);
        }
        if (dots != nullptr) {
          const scalar_t* __restrict__ x = in[k] + off + r * W;
          for (int64_t j = 0; j < W; ++j) cs[j] += gr[j] * static_cast<acc_t>(x[j]);
        }
      }
    }
  }
  if (dots != nullptr) {
    const int64_t gw = static_cast<int64_t>(cols.size()) - 1;
    for (int64_t k = 0; k < K; ++k) {
      const acc_t* cs = s.colsum.data() + k * W;
      for (int64_t pw = 0; pw < gw; ++pw) {
        acc_t sum = 0;
        for (int64_t j = cols[pw]; j < cols[pw + 1]; ++j) sum += cs[j];
        dots[pw * K + k] = sum;
      }
    }
  }
}

// ---- the work decomposition ----------------------------------------------------
// P == 1: item (b, chunk) = kChunk consecutive elements of sample b; partial
//         sums [B][chunks][K].
// P > 1:  item (b, c, ph) = the band of patch row ph in plane (b, c); partial
//         sums [B][C][P][K] (each band fills its gw patches).
// Either way grad w[bw, p, k] = sum over b (all b when Bw == 1, else b = bw)
// and over the items' slots, in index order.

struct Geometry {
  MixedOpShape s;
  std::vector<int64_t> rows;  // gh + 1 row starts
  std::vector<int64_t> cols;  // gw + 1 column starts
  int64_t chunks = 0;         // P == 1: chunks per sample

  explicit Geometry(const MixedOpShape& shape) : s(shape) {
    for (int64_t i = 0; i <= s.gh; ++i) rows.push_back(patch_start(i, s.gh, s.H));
    for (int64_t i = 0; i <= s.gw; ++i) cols.push_back(patch_start(i, s.gw, s.W));
    chunks = (s.sample() + kChunk - 1) / kChunk;
  }
  bool single_patch() const { return s.P() == 1; }
  int64_t items() const { return single_patch() ? s.B * chunks : s.B * s.C * s.gh; }
  // Elements per item, for the parallel_for grain.
  int64_t item_size() const {
    return single_patch() ? std::min(kChunk, s.sample()) : (s.H / s.gh + 1) * s.W;
  }
  int64_t grain() const { return std::max<int64_t>(1, kChunk / std::max<int64_t>(1, item_size())); }
  // Partial-sum slots (each K wide) per sample.
  int64_t slots_per_sample() const { return single_patch() ? chunks : s.C * s.P(); }
};

template <typename scalar_t>
std::vector<const scalar_t*> data_pointers(const std::vector<at::Tensor>& tensors) {
  std::vector<const scalar_t*> ptrs;
  for (const auto& t : tensors) ptrs.push_back(t.const_data_ptr<scalar_t>());
  return ptrs;
}

template <typename scalar_t>
void forward_kernel(const Geometry& geo, const std::vector<at::Tensor>& outputs,
                    const at::Tensor& weights, at::Tensor& y) {
  using acc_t = acc_type<scalar_t>;
  const auto& s = geo.s;
  const auto base = data_pointers<scalar_t>(outputs);
  const acc_t* w = weights.const_data_ptr<acc_t>();
  scalar_t* out = y.mutable_data_ptr<scalar_t>();
  const int64_t K = s.K;
  at::parallel_for(0, geo.items(), geo.grain(), [&](int64_t begin, int64_t end) {
    std::vector<const scalar_t*> in(K);
    BandScratch<scalar_t> scratch;
    if (!geo.single_patch() && s.gw > 1) {
      scratch.wcol.resize(K * s.W);
      scratch.tile.resize(std::max<int64_t>(1, kTile / s.W) * s.W);
    }
    for (int64_t item = begin; item < end; ++item) {
      int64_t offset, b, n;
      const acc_t* wp;
      if (geo.single_patch()) {
        b = item / geo.chunks;
        const int64_t start = (item % geo.chunks) * kChunk;
        n = std::min(kChunk, s.sample() - start);
        offset = b * s.sample() + start;
        wp = w + (s.Bw == 1 ? 0 : b) * K;
      } else {
        const int64_t ph = item % s.gh, plane = item / s.gh;  // plane = b * C + c
        b = plane / s.C;
        offset = plane * s.plane() + geo.rows[ph] * s.W;
        n = (geo.rows[ph + 1] - geo.rows[ph]) * s.W;
        wp = w + ((s.Bw == 1 ? 0 : b) * s.P() + ph * s.gw) * K;
      }
      for (int64_t k = 0; k < K; ++k) in[k] = base[k] + offset;
      if (geo.single_patch() || s.gw == 1) {
        forward_run(in.data(), K, wp, n, out + offset);
      } else {
        forward_band(in.data(), K, wp, geo.cols, n / s.W, s.W, out + offset, scratch);
      }
    }
  });
}

template <typename scalar_t>
void backward_kernel(const Geometry& geo, const at::Tensor& grad, const std::vector<at::Tensor>& outputs,
                     const at::Tensor& weights, std::vector<at::Tensor>& grad_outputs,
                     at::Tensor& partial) {
  using acc_t = acc_type<scalar_t>;
  const auto& s = geo.s;
  const auto base = data_pointers<scalar_t>(outputs);
  std::vector<scalar_t*> grad_base;
  for (auto& t : grad_outputs) grad_base.push_back(t.mutable_data_ptr<scalar_t>());
  const bool need_outputs = !grad_outputs.empty();
  const bool need_weights = partial.defined();
  const acc_t* w = weights.const_data_ptr<acc_t>();
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  acc_t* partial_base = need_weights ? partial.mutable_data_ptr<acc_t>() : nullptr;
  const int64_t K = s.K;
  at::parallel_for(0, geo.items(), geo.grain(), [&](int64_t begin, int64_t end) {
    std::vector<const scalar_t*> in(K);
    std::vector<scalar_t*> grad_in(K);
    BandScratch<scalar_t> scratch;
    if (!geo.single_patch() && s.gw > 1) {
      scratch.wcol.resize(K * s.W);
      scratch.tile.resize(std::max<int64_t>(1, kTile / s.W) * s.W);
      if (need_weights) scratch.colsum.resize(K * s.W);
    }
    for (int64_t item = begin; item < end; ++item) {
      int64_t offset, b, n;
      const acc_t* wp;
      acc_t* dots = nullptr;
      if (geo.single_patch()) {
        b = item / geo.chunks;
        const int64_t start = (item % geo.chunks) * kChunk;
        n = std::min(kChunk, s.sample() - start);
        offset = b * s.sample() + start;
        wp = w + (s.Bw == 1 ? 0 : b) * K;
        if (need_weights) dots = partial_base + item * K;  // slot (b, chunk)
      } else {
        const int64_t ph = item % s.gh, plane = item / s.gh;
        b = plane / s.C;
        offset = plane * s.plane() + geo.rows[ph] * s.W;
        n = (geo.rows[ph + 1] - geo.rows[ph]) * s.W;
        wp = w + ((s.Bw == 1 ? 0 : b) * s.P() + ph * s.gw) * K;
        if (need_weights) dots = partial_base + (plane * s.P() + ph * s.gw) * K;  // slot (b, c, p)
      }
      for (int64_t k = 0; k < K; ++k) {
        in[k] = base[k] + offset;
        if (need_outputs) grad_in[k] = grad_base[k] + offset;
      }
      scalar_t* const* grad_ptrs = need_outputs ? grad_in.data() : nullptr;
      if (geo.single_patch() || s.gw == 1) {
        if (dots != nullptr) std::fill(dots, dots + K, acc_t(0));
        backward_run(g + offset, in.data(), K, wp, n, grad_ptrs, dots);
      } else {
        backward_band(g + offset, in.data(), K, wp, geo.cols, n / s.W, s.W, grad_ptrs, dots,
                      scratch);
      }
    }
  });
}

// grad w[bw, p, k] = sum over the samples of bw and their slots; partial is
// (B, slots, P', K) viewed flat, with P' = P for bands and 1 for chunks.
template <typename acc_t>
void reduce_partials(const Geometry& geo, const at::Tensor& partial, at::Tensor& grad_w) {
  const auto& s = geo.s;
  const int64_t K = s.K, P = s.P();
  const int64_t slots = geo.single_patch() ? geo.chunks : s.C;  // per (sample, patch)
  const acc_t* part = partial.const_data_ptr<acc_t>();
  acc_t* gw = grad_w.mutable_data_ptr<acc_t>();
  at::parallel_for(0, s.Bw * P, 1, [&](int64_t begin, int64_t end) {
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
  at::Tensor y = at::empty(outputs_in[0].sizes(), outputs_in[0].options().memory_format(
                                                      at::MemoryFormat::Contiguous));
  if (y.numel() == 0) return y;
  const auto outputs = contiguous_all(outputs_in);
  const at::Tensor weights = weights_in.contiguous();
  const Geometry geo(s);
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
  std::vector<at::Tensor> grad_outputs;
  if (outputs_requires_grad) {
    for (int64_t k = 0; k < s.K; ++k) {
      grad_outputs.push_back(at::empty(grad_in.sizes(), grad_in.options().memory_format(
                                                            at::MemoryFormat::Contiguous)));
    }
  }
  at::Tensor grad_w = weights_requires_grad ? at::zeros_like(weights_in, at::MemoryFormat::Contiguous)
                                            : weights_in.new_empty({0});
  if (grad_in.numel() == 0 || (!outputs_requires_grad && !weights_requires_grad)) {
    return {grad_outputs, grad_w};
  }
  const auto outputs = weights_requires_grad ? contiguous_all(outputs_in)
                                             : std::vector<at::Tensor>(outputs_in.begin(), outputs_in.end());
  const at::Tensor grad = grad_in.contiguous();
  const at::Tensor weights = weights_in.contiguous();
  const Geometry geo(s);
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
