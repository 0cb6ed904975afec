// depthwise_conv2d on the CPU: y = conv2d(relu(x) if relu_input else x, weight, groups=C)
// on channels_last (NHWC) maps.
//
// Why a kernel of our own: on the DARTS search step (8 cells, C = 16, 32x32,
// batch 16; 2-core AVX-512 EPYC, torch 2.13, 2026-12-03) PyTorch's depthwise
// convolution took 38 % of the step (backward 31 %, forward 7 %), about
// 5 GFLOP/s, and the ReLU in front of every depthwise conv of SepConv and
// DilConv another ~5 %, plus one saved map per op. In NHWC the C channels of a
// pixel lie side by side, so every tap of the stencil is one vector
// multiply-add over channels with the weights of that tap (stored (KH*KW, C)
// here); the ReLU is applied as the input is read, and its mask in the
// backward as the input gradient is written: no ReLU map exists.
//
// - forward: one work item per output row (n, oh); four interior pixels at a
//   time accumulate their taps in vector registers, border pixels one by one
//   with bounds checks;
// - backward: one item per image. The input gradient of a stride-1 conv is
//   the forward's convolution of the output gradient with the flipped kernel
//   (transposed_geometry); a strided one is gathered pixel by pixel (each
//   input pixel sums the taps that read it: no write conflicts). The weight
//   gradient is accumulated into that image's own (KH*KW, C) slot, and the
//   slots are added in image order afterwards, so the result does not depend
//   on the number of threads. An image's x and grad stay in L2 for both.
// Accumulation is in the input's dtype (float or double), tap by tap in
// (kh, kw) order. The loops use GCC vector types over channels, compiled for
// AVX-512, AVX2+FMA and the baseline ISA and picked at run time (dot.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>

#include "cpu/dot.h"

namespace nasops {
namespace {

struct Geometry {
  int64_t N, C, H, W, KH, KW, OH, OW;
  int64_t sh, sw, ph, pw, dh, dw;
};

// The loops below work on blocks of VL channels (16, then 8, then 1 for the
// rest) held in GCC vector types: each clone (dot.h) lowers a block to its
// widest registers (one zmm on AVX-512, two ymm on AVX2), and the
// accumulators stay in registers across the taps. (Plain loops over lane
// arrays were SLP-vectorized into 2-4 lane pieces and ran slower.)
#define NASOPS_ALWAYS_INLINE inline __attribute__((always_inline))

template <typename T, int VL>
struct Lanes {
  typedef T type __attribute__((vector_size(VL * sizeof(T))));
};
template <typename T, int VL>
using lanes_t = typename Lanes<T, VL>::type;

template <int VL, typename T>
NASOPS_ALWAYS_INLINE lanes_t<T, VL> load(const T* p) {
  lanes_t<T, VL> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <int VL, typename T>
NASOPS_ALWAYS_INLINE void store(T* p, lanes_t<T, VL> v) {
  std::memcpy(p, &v, sizeof(v));
}

template <bool kRelu, typename V>
NASOPS_ALWAYS_INLINE V activation(V v) {
  // v < 0 ? 0 : v keeps NaN, as torch.relu does.
  if constexpr (kRelu) return v < V{} ? V{} : v;
  return v;
}

template <typename Kernel>
NASOPS_ALWAYS_INLINE void for_channel_blocks(int64_t C, const Kernel& kernel) {
  int64_t c0 = 0;
  for (; c0 + 16 <= C; c0 += 16) kernel.template block<16>(c0);
  for (; c0 + 8 <= C; c0 += 8) kernel.template block<8>(c0);
  for (; c0 < C; ++c0) kernel.template block<1>(c0);
}

// The taps of one output row: the kernel rows that fall inside the input, and
// the output columns [ow_lo, ow_hi) whose every kernel column does too (the
// interior, computed without bounds checks, kPixels columns at a time).
constexpr int64_t kMaxKernel = 16;
constexpr int kPixels = 4;

struct RowPlan {
  int64_t taps_h = 0;
  int64_t kh[kMaxKernel], ih[kMaxKernel];
  int64_t ow_lo, ow_hi;
};

inline RowPlan plan_row(const Geometry& g, int64_t oh) {
  RowPlan plan;
  for (int64_t kh = 0; kh < g.KH; ++kh) {
    const int64_t ih = oh * g.sh - g.ph + kh * g.dh;
    if (ih < 0 || ih >= g.H) continue;
    plan.kh[plan.taps_h] = kh;
    plan.ih[plan.taps_h++] = ih;
  }
  plan.ow_lo = std::min(g.OW, (g.pw + g.sw - 1) / g.sw);  // first ow with ow*sw - pw >= 0
  const int64_t last = g.W - 1 + g.pw - (g.KW - 1) * g.dw;  // ow*sw must not exceed it
  plan.ow_hi = last < 0 ? plan.ow_lo : std::clamp(last / g.sw + 1, plan.ow_lo, g.OW);
  return plan;
}

// Output pixels [ow, ow + NP) of row `plan`, channels [c0, c0 + VL):
// y = sum over taps of w[tap] * act(x[input of the tap]), zeroed where
// mask <= 0 (kMask: the ReLU's gradient mask when this computes an input
// gradient). Interior pixels (kChecked = false) skip the column bounds checks
// and share each loaded weight among NP pixels.
template <bool kRelu, bool kMask, bool kChecked, int NP, typename T>
struct ForwardPixels {
  const Geometry& g;
  const RowPlan& plan;
  const T* x_n;  // image n (H, W, C)
  const T* wt;   // (KH*KW, C)
  int64_t ow;
  T* y;           // (OW, C) row
  const T* mask;  // (OW, C) row, when kMask

  template <int VL>
  NASOPS_ALWAYS_INLINE void block(int64_t c0) const {
    using V = lanes_t<T, VL>;
    V acc[NP] = {};
    for (int64_t i = 0; i < plan.taps_h; ++i) {
      const T* x_row = x_n + plan.ih[i] * g.W * g.C + c0;
      const T* w_row = wt + plan.kh[i] * g.KW * g.C + c0;
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        const V w = load<VL>(w_row + kw * g.C);
        const int64_t iw = ow * g.sw - g.pw + kw * g.dw;
        for (int p = 0; p < NP; ++p) {
          if (kChecked && (iw + p * g.sw < 0 || iw + p * g.sw >= g.W)) continue;
          acc[p] += w * activation<kRelu>(load<VL>(x_row + (iw + p * g.sw) * g.C));
        }
      }
    }
    for (int p = 0; p < NP; ++p) {
      const int64_t at = (ow + p) * g.C + c0;
      if constexpr (kMask) acc[p] = load<VL>(mask + at) <= V{} ? V{} : acc[p];
      store<VL>(y + at, acc[p]);
    }
  }
};

// y[n, oh, :, :]: every pixel of one output row (OW, C). mask_row: see ForwardPixels.
template <bool kRelu, bool kMask, typename T>
NASOPS_CLONE_FOR_AVX512 void forward_row(const Geometry& g, const T* x_n, const T* wt, int64_t oh, T* y_row,
                                         const T* mask_row) {
  const RowPlan plan = plan_row(g, oh);
  using Border = ForwardPixels<kRelu, kMask, true, 1, T>;
  int64_t ow = 0;
  for (; ow < plan.ow_lo; ++ow) for_channel_blocks(g.C, Border{g, plan, x_n, wt, ow, y_row, mask_row});
  for (; ow + kPixels <= plan.ow_hi; ow += kPixels) {
    for_channel_blocks(g.C, ForwardPixels<kRelu, kMask, false, kPixels, T>{g, plan, x_n, wt, ow, y_row, mask_row});
  }
  for (; ow < plan.ow_hi; ++ow) {
    for_channel_blocks(g.C, ForwardPixels<kRelu, kMask, false, 1, T>{g, plan, x_n, wt, ow, y_row, mask_row});
  }
  for (; ow < g.OW; ++ow) for_channel_blocks(g.C, Border{g, plan, x_n, wt, ow, y_row, mask_row});
}

// A strided convolution's input gradient at pixel (ih, iw), gathered: the sum
// of w[tap] * grad[o] over the taps whose output o reads it, times the ReLU's
// mask (0 where x <= 0, as torch's threshold_backward). (Stride 1 runs as a
// forward convolution instead: see transposed_geometry.)
template <bool kRelu, typename T>
struct GradInputPixel {
  const Geometry& g;
  const T* gy_n;  // image n's output gradient (OH, OW, C)
  const T* wt;
  const T* x;  // the pixel's C inputs
  int64_t ih, iw;
  T* gx;  // the pixel's C gradients

  template <int VL>
  NASOPS_ALWAYS_INLINE void block(int64_t c0) const {
    using V = lanes_t<T, VL>;
    V acc{};
    for (int64_t kh = 0; kh < g.KH; ++kh) {
      const int64_t th = ih + g.ph - kh * g.dh;  // = oh * sh
      if (th < 0 || th % g.sh) continue;
      const int64_t oh = th / g.sh;
      if (oh >= g.OH) continue;
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        const int64_t tw = iw + g.pw - kw * g.dw;
        if (tw < 0 || tw % g.sw) continue;
        const int64_t ow = tw / g.sw;
        if (ow >= g.OW) continue;
        acc += load<VL>(wt + (kh * g.KW + kw) * g.C + c0) * load<VL>(gy_n + (oh * g.OW + ow) * g.C + c0);
      }
    }
    if constexpr (kRelu) acc = load<VL>(x + c0) <= V{} ? V{} : acc;
    store<VL>(gx + c0, acc);
  }
};

template <bool kRelu, typename T>
NASOPS_CLONE_FOR_AVX512 void strided_grad_input_image(const Geometry& g, const T* gy_n, const T* wt,
                                                      const T* x_n, T* gx_n) {
  for (int64_t ih = 0; ih < g.H; ++ih) {
    for (int64_t iw = 0; iw < g.W; ++iw) {
      const int64_t at = (ih * g.W + iw) * g.C;
      for_channel_blocks(g.C, GradInputPixel<kRelu, T>{g, gy_n, wt, x_n + at, ih, iw, gx_n + at});
    }
  }
}

// Output pixels [ow, ow + NP)'s contributions to the weight gradient, added
// to the image's slot: slot[tap, c] += sum_p grad[o_p, c] * act(x[input of
// o_p under tap, c]) (one load and store of the slot per NP pixels).
template <bool kRelu, bool kChecked, int NP, typename T>
struct GradWeightPixels {
  const Geometry& g;
  const RowPlan& plan;
  const T* x_n;
  const T* gy_row;  // (OW, C)
  int64_t ow;
  T* slot;  // (KH*KW, C)

  template <int VL>
  NASOPS_ALWAYS_INLINE void block(int64_t c0) const {
    using V = lanes_t<T, VL>;
    V go[NP];
    for (int p = 0; p < NP; ++p) go[p] = load<VL>(gy_row + (ow + p) * g.C + c0);
    for (int64_t i = 0; i < plan.taps_h; ++i) {
      const T* x_row = x_n + plan.ih[i] * g.W * g.C + c0;
      T* s_row = slot + plan.kh[i] * g.KW * g.C + c0;
      for (int64_t kw = 0; kw < g.KW; ++kw) {
        const int64_t iw = ow * g.sw - g.pw + kw * g.dw;
        V sum = load<VL>(s_row + kw * g.C);
        for (int p = 0; p < NP; ++p) {
          if (kChecked && (iw + p * g.sw < 0 || iw + p * g.sw >= g.W)) continue;
          sum += go[p] * activation<kRelu>(load<VL>(x_row + (iw + p * g.sw) * g.C));
        }
        store<VL>(s_row + kw * g.C, sum);
      }
    }
  }
};

// Image n's share of the weight gradient, into its own slot (KH*KW, C).
template <bool kRelu, typename T>
NASOPS_CLONE_FOR_AVX512 void grad_weight_image(const Geometry& g, const T* gy_n, const T* x_n, T* slot) {
  std::fill(slot, slot + g.KH * g.KW * g.C, T(0));
  using Border = GradWeightPixels<kRelu, true, 1, T>;
  for (int64_t oh = 0; oh < g.OH; ++oh) {
    const RowPlan plan = plan_row(g, oh);
    const T* gy_row = gy_n + oh * g.OW * g.C;
    int64_t ow = 0;
    for (; ow < plan.ow_lo; ++ow) for_channel_blocks(g.C, Border{g, plan, x_n, gy_row, ow, slot});
    for (; ow + kPixels <= plan.ow_hi; ow += kPixels) {
      for_channel_blocks(g.C, GradWeightPixels<kRelu, false, kPixels, T>{g, plan, x_n, gy_row, ow, slot});
    }
    for (; ow < plan.ow_hi; ++ow) {
      for_channel_blocks(g.C, GradWeightPixels<kRelu, false, 1, T>{g, plan, x_n, gy_row, ow, slot});
    }
    for (; ow < g.OW; ++ow) for_channel_blocks(g.C, Border{g, plan, x_n, gy_row, ow, slot});
  }
}

// The input gradient of a stride-1 convolution is a stride-1 convolution of
// the output gradient with the kernel flipped and padding d*(K-1) - p (its
// output is H x W): it runs on the forward's fast rows. Needs p <= d*(K-1).
inline bool transposable(const Geometry& g) {
  return g.sh == 1 && g.sw == 1 && g.ph <= g.dh * (g.KH - 1) && g.pw <= g.dw * (g.KW - 1);
}

inline Geometry transposed_geometry(const Geometry& g) {
  return Geometry{g.N, g.C, g.OH, g.OW, g.KH, g.KW, g.H, g.W,
                  1, 1, g.dh * (g.KH - 1) - g.ph, g.dw * (g.KW - 1) - g.pw, g.dh, g.dw};
}

Geometry check_and_measure(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 4, "depthwise_conv2d: x must be (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == x.size(1) && weight.size(1) == 1,
              "depthwise_conv2d: weight must be (C, 1, KH, KW) with C = ", x.size(1), ", got ",
              weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "depthwise_conv2d: weight dtype ",
              weight.scalar_type(), " != x dtype ", x.scalar_type());
  TORCH_CHECK(weight.size(2) <= kMaxKernel && weight.size(3) <= kMaxKernel,
              "depthwise_conv2d: kernels up to ", kMaxKernel, "x", kMaxKernel, ", got ", weight.sizes());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "depthwise_conv2d: stride, padding and dilation take two values each");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 &&
                  padding[0] >= 0 && padding[1] >= 0,
              "depthwise_conv2d: need stride >= 1, dilation >= 1, padding >= 0");
  Geometry g{x.size(0), x.size(1), x.size(2), x.size(3), weight.size(2), weight.size(3), 0, 0,
             stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]};
  g.OH = (g.H + 2 * g.ph - g.dh * (g.KH - 1) - 1) / g.sh + 1;
  g.OW = (g.W + 2 * g.pw - g.dw * (g.KW - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.OH >= 1 && g.OW >= 1, "depthwise_conv2d: the kernel is larger than the padded input");
  return g;
}

// (C, 1, KH, KW) -> (KH*KW, C): a tap's C weights side by side, like the channels of a pixel.
at::Tensor taps_by_channel(const at::Tensor& weight) {
  return weight.reshape({weight.size(0), -1}).t().contiguous();
}

at::Tensor depthwise_conv2d_cpu(const at::Tensor& x_in, const at::Tensor& weight, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, bool relu_input) {
  const Geometry g = check_and_measure(x_in, weight, stride, padding, dilation);
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor wt = taps_by_channel(weight);
  at::Tensor y = at::empty({g.N, g.C, g.OH, g.OW}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_conv2d_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* wp = wt.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, g.OW * g.C * g.KH * g.KW));
    at::parallel_for(0, g.N * g.OH, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / g.OH, oh = row % g.OH;
        const scalar_t* x_n = xp + n * g.H * g.W * g.C;
        scalar_t* y_row = yp + row * g.OW * g.C;
        if (relu_input) forward_row<true, false>(g, x_n, wp, oh, y_row, static_cast<const scalar_t*>(nullptr));
        else forward_row<false, false>(g, x_n, wp, oh, y_row, static_cast<const scalar_t*>(nullptr));
      }
    });
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> depthwise_conv2d_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& weight, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, bool relu_input, bool x_requires_grad,
    bool weight_requires_grad) {
  const Geometry g = check_and_measure(x_in, weight, stride, padding, dilation);
  TORCH_CHECK(grad_in.dim() == 4 && grad_in.size(0) == g.N && grad_in.size(1) == g.C &&
                  grad_in.size(2) == g.OH && grad_in.size(3) == g.OW,
              "depthwise_conv2d_backward: grad must be (", g.N, ", ", g.C, ", ", g.OH, ", ", g.OW,
              "), got ", grad_in.sizes());
  const auto cl = at::MemoryFormat::ChannelsLast;
  const at::Tensor x = x_in.contiguous(cl);
  const at::Tensor grad = grad_in.to(x.scalar_type()).contiguous(cl);
  at::Tensor grad_x = x_requires_grad ? at::empty_like(x, x.options().memory_format(cl)) : x.new_empty({0});
  at::Tensor slots = weight_requires_grad ? at::empty({g.N, g.KH * g.KW, g.C}, x.options()) : x.new_empty({0});
  at::Tensor grad_w = x.new_empty({0});
  if (weight_requires_grad && g.N == 0) grad_w = at::zeros_like(weight);
  if (g.N == 0 || (!x_requires_grad && !weight_requires_grad)) return {grad_x, grad_w};
  const bool transposed = transposable(g);
  const Geometry gt = transposed ? transposed_geometry(g) : g;
  // The taps the input gradient reads (the weight gradient reads none).
  const at::Tensor wt_input = taps_by_channel(transposed ? weight.flip({2, 3}) : weight);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "depthwise_conv2d_backward_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad.const_data_ptr<scalar_t>();
    const scalar_t* wip = wt_input.const_data_ptr<scalar_t>();
    scalar_t* gxp = x_requires_grad ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* sp = weight_requires_grad ? slots.mutable_data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, g.N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* x_n = xp + n * g.H * g.W * g.C;
        const scalar_t* gy_n = gp + n * g.OH * g.OW * g.C;
        if (gxp) {
          scalar_t* gx_n = gxp + n * g.H * g.W * g.C;
          if (transposed) {
            for (int64_t ih = 0; ih < g.H; ++ih) {
              const int64_t row = ih * g.W * g.C;
              if (relu_input) forward_row<false, true>(gt, gy_n, wip, ih, gx_n + row, x_n + row);
              else forward_row<false, false>(gt, gy_n, wip, ih, gx_n + row, static_cast<const scalar_t*>(nullptr));
            }
          } else if (relu_input) {
            strided_grad_input_image<true>(g, gy_n, wip, x_n, gx_n);
          } else {
            strided_grad_input_image<false>(g, gy_n, wip, x_n, gx_n);
          }
        }
        if (sp) {
          scalar_t* slot = sp + n * g.KH * g.KW * g.C;
          if (relu_input) grad_weight_image<true>(g, gy_n, x_n, slot);
          else grad_weight_image<false>(g, gy_n, x_n, slot);
        }
      }
    });
  });
  if (weight_requires_grad) {
    // Sum of the images' slots in image order (at::sum's order is fixed for a
    // given shape), then back to (C, 1, KH, KW).
    grad_w = slots.sum(0).t().reshape({g.C, 1, g.KH, g.KW}).contiguous();
  }
  return {grad_x, grad_w};
}

}  // namespace

TORCH_LIBRARY_IMPL(nasops, CPU, m) {
  m.impl("depthwise_conv2d", &depthwise_conv2d_cpu);
  m.impl("depthwise_conv2d_backward", &depthwise_conv2d_backward_cpu);
}

}  // namespace nasops
