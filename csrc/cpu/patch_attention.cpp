// CPU kernels of the patchwise softmax attention (SPEC 2.2); schemas in csrc/ops.cpp.
//
// Every map kernel walks the contiguous (H, W) planes of a (B, C, H, W) tensor
// one at a time, patch by patch: a 32x32 fp32 plane is 4 KiB, so the plane
// stays in L1 while its patches are visited, and each pixel is read or written
// once. A task is a block of planes (channel_block) of one sample.
//
// channels_last (NHWC) maps are read and written in place (the rule of
// csrc/layout.h): there a pixel row is W*C consecutive values, the C channels
// of pixel x at x*C, and a task is one patch row of one sample (and map): its
// rows are summed into (or spread from) one W*C row, whose pixel columns are
// then cut into patches C channels at a time. Every value is computed with the
// same operations in the same order as in NCHW, so both layouts give the same
// bits.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/exp.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "cpu/dot.h"
#include "layout.h"

namespace nasops {
namespace {

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// First pixel of each patch row (or column), plus the end: start(i) = ceil(i * size / parts).
std::vector<int64_t> patch_starts(int64_t size, int64_t parts) {
  std::vector<int64_t> starts(parts + 1);
  for (const auto i : c10::irange(parts + 1)) starts[i] = (i * size + parts - 1) / parts;
  return starts;
}

struct Mosaic {
  int64_t H, W, gh, gw;
  std::vector<int64_t> rows, cols;
  Mosaic(int64_t H, int64_t W, int64_t gh, int64_t gw)
      : H(H), W(W), gh(gh), gw(gw), rows(patch_starts(H, gh)), cols(patch_starts(W, gw)) {}
  int64_t patches() const { return gh * gw; }
  int64_t count(int64_t ph, int64_t pw) const {
    return (rows[ph + 1] - rows[ph]) * (cols[pw + 1] - cols[pw]);
  }
  // 1 / |p| for every patch: a division per patch per plane would cost more
  // than the pixels of small patches.
  template <typename acc_t>
  std::vector<acc_t> inverse_counts() const {
    std::vector<acc_t> inv(gh * gw);
    for (const auto ph : c10::irange(gh)) {
      for (const auto pw : c10::irange(gw)) inv[ph * gw + pw] = acc_t(1) / static_cast<acc_t>(count(ph, pw));
    }
    return inv;
  }
};

Mosaic check_mosaic(at::IntArrayRef grid, int64_t H, int64_t W) {
  TORCH_CHECK(grid.size() == 2, "nasops: grid must be [gh, gw], got ", grid);
  TORCH_CHECK(grid[0] >= 1 && grid[0] <= H && grid[1] >= 1 && grid[1] <= W,
              "nasops: grid ", grid, " must satisfy 1 <= gh <= H=", H, " and 1 <= gw <= W=", W);
  return Mosaic(H, W, grid[0], grid[1]);
}

// Patches a few pixels wide cost more in per-patch loop overhead than in
// pixels. When the grid divides W into patches of one of these widths, the
// width is a compile-time constant and the per-patch column loops below
// vectorize; any other mosaic takes the runtime-width path (kPatchWidth = 0),
// whose runs are long enough for the loop overhead not to matter.
template <typename Body>
void with_patch_width(const Mosaic& mosaic, Body&& body) {
  const int64_t width = mosaic.W % mosaic.gw == 0 ? mosaic.W / mosaic.gw : 0;
  switch (width) {
    case 1: return body(std::integral_constant<int64_t, 1>{});
    case 2: return body(std::integral_constant<int64_t, 2>{});
    case 4: return body(std::integral_constant<int64_t, 4>{});
    case 8: return body(std::integral_constant<int64_t, 8>{});
    default: return body(std::integral_constant<int64_t, 0>{});
  }
}

// per_patch[pw] = sum of row over the columns of patch column pw, left to right.
template <int64_t kPatchWidth, typename acc_t>
void sum_patch_columns(const acc_t* row, acc_t* per_patch, const Mosaic& mosaic) {
  if constexpr (kPatchWidth == 0) {
    for (const auto pw : c10::irange(mosaic.gw)) {
      acc_t sum = row[mosaic.cols[pw]];
      for (int64_t x = mosaic.cols[pw] + 1; x < mosaic.cols[pw + 1]; ++x) sum += row[x];
      per_patch[pw] = sum;
    }
  } else {
    for (const auto pw : c10::irange(mosaic.gw)) {
      acc_t sum = row[pw * kPatchWidth];
      for (int64_t t = 1; t < kPatchWidth; ++t) sum += row[pw * kPatchWidth + t];
      per_patch[pw] = sum;
    }
  }
}

// row[x] = per_patch[patch column of x]: the inverse of sum_patch_columns's cut.
template <int64_t kPatchWidth, typename acc_t>
void spread_patch_columns(const acc_t* per_patch, acc_t* row, const Mosaic& mosaic) {
  if constexpr (kPatchWidth == 0) {
    for (const auto pw : c10::irange(mosaic.gw)) {
      std::fill(row + mosaic.cols[pw], row + mosaic.cols[pw + 1], per_patch[pw]);
    }
  } else {
    for (const auto pw : c10::irange(mosaic.gw)) {
      for (int64_t t = 0; t < kPatchWidth; ++t) row[pw * kPatchWidth + t] = per_patch[pw];
    }
  }
}

// sums[x] = sum over rows r of rows[r * width + x], top to bottom. Two rows
// per pass over sums: on rows a few vectors long, the passes' loads and stores
// of sums cost as much as the rows themselves.
template <typename scalar_t, typename acc_t>
void sum_rows(const scalar_t* __restrict rows, int64_t count, int64_t width, acc_t* __restrict sums) {
  int64_t r = 1;
  if (count >= 2) {
    for (int64_t x = 0; x < width; ++x) {
      sums[x] = static_cast<acc_t>(rows[x]) + static_cast<acc_t>(rows[width + x]);
    }
    r = 2;
  } else {
    for (int64_t x = 0; x < width; ++x) sums[x] = static_cast<acc_t>(rows[x]);
  }
  for (; r + 1 < count; r += 2) {
    const scalar_t* a = rows + r * width;
    const scalar_t* b = a + width;
    for (int64_t x = 0; x < width; ++x) {
      sums[x] = (sums[x] + static_cast<acc_t>(a[x])) + static_cast<acc_t>(b[x]);
    }
  }
  if (r < count) {
    const scalar_t* a = rows + r * width;
    for (int64_t x = 0; x < width; ++x) sums[x] += static_cast<acc_t>(a[x]);
  }
}

// out = weight * grad + add over a row. The pointers never overlap; saying so
// spares the vectorized loop its runtime overlap check per row, which took
// ~8% of the outputs backward on 16-pixel rows.
template <typename scalar_t, typename acc_t>
void multiply_add_row(const acc_t* __restrict weight, const scalar_t* __restrict grad,
                      const acc_t* __restrict add, scalar_t* __restrict out, int64_t n) {
  for (int64_t x = 0; x < n; ++x) {
    out[x] = static_cast<scalar_t>(weight[x] * static_cast<acc_t>(grad[x]) + add[x]);
  }
}

// Rows of (B, P) per task for the attention kernels: about 2^20 multiply-adds,
// so the tiny (B*P, K, D) problems of a DARTS edge run on one thread instead
// of paying a thread-pool barrier (costly on a loaded machine) for microseconds of work.
int64_t attention_grain(int64_t K, int64_t D) {
  return std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, K * D));
}

// Planes per task of the kernels that read or write (B, P, ., C) data, whose
// channels are contiguous: a task moves runs of up to 64 channels (four cache
// lines of fp32) instead of single values at a stride of C, which would pile
// onto a few L1 sets (the strides are powers of two in practice) and defeat
// the prefetcher. Fewer channels where the task's buffer, values_per_channel
// values per channel, would outgrow a 256 KiB L2 (one-pixel patches of a big map).
int64_t channel_block(int64_t values_per_channel) {
  return std::clamp<int64_t>((int64_t{1} << 16) / std::max<int64_t>(1, values_per_channel), 1, 64);
}

at::ScalarType acc_scalar(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// ---- patch_pool -------------------------------------------------------------------

at::Tensor patch_pool_cpu(at::TensorList maps, at::IntArrayRef grid) {
  TORCH_CHECK(!maps.empty(), "patch_pool: maps must not be empty");
  const auto& ref = maps[0];
  TORCH_CHECK(ref.dim() == 4, "patch_pool: maps must be (B, C, H, W), got ", ref.sizes());
  for (const auto& m : maps) {
    TORCH_CHECK(m.sizes() == ref.sizes() && m.scalar_type() == ref.scalar_type() &&
                    m.device() == ref.device(),
                "patch_pool: maps must share shape, dtype and device");
  }
  const int64_t B = ref.size(0), C = ref.size(1), H = ref.size(2), W = ref.size(3);
  const int64_t M = maps.size();
  const Mosaic mosaic = check_mosaic(grid, H, W);
  const int64_t P = mosaic.patches();
  auto out = at::empty({B, P, M, C}, ref.options().dtype(acc_scalar(ref.scalar_type())));
  if (out.numel() == 0) return out;
  const bool channels_last = channels_last_order(maps);
  std::vector<at::Tensor> contiguous;
  for (const auto& m : maps) contiguous.push_back(channels_last ? m : m.contiguous());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ref.scalar_type(), "patch_pool", [&] {
    using acc_t = acc_type<scalar_t>;
    std::vector<const scalar_t*> src(M);
    for (const auto m : c10::irange(M)) src[m] = contiguous[m].const_data_ptr<scalar_t>();
    acc_t* dst = out.mutable_data_ptr<acc_t>();
    const auto inv_counts = mosaic.inverse_counts<acc_t>();
    if (channels_last) {
      // One task = patch row ph of sample b of map m.
      const int64_t row = W * C;
      at::parallel_for(0, M * B * mosaic.gh, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> column_sums(row), patch_sum(C);
        for (const auto task : c10::irange(begin, end)) {
          const int64_t m = task / (B * mosaic.gh), b = task / mosaic.gh % B, ph = task % mosaic.gh;
          sum_rows(src[m] + (b * H + mosaic.rows[ph]) * row, mosaic.rows[ph + 1] - mosaic.rows[ph], row,
                   column_sums.data());
          for (const auto pw : c10::irange(mosaic.gw)) {
            const int64_t p = ph * mosaic.gw + pw;
            std::copy_n(column_sums.data() + mosaic.cols[pw] * C, C, patch_sum.data());
            for (int64_t x = mosaic.cols[pw] + 1; x < mosaic.cols[pw + 1]; ++x) {
              const acc_t* pixel = column_sums.data() + x * C;
              for (const auto c : c10::irange(C)) patch_sum[c] += pixel[c];
            }
            acc_t* means = dst + ((b * P + p) * M + m) * C;
            for (const auto c : c10::irange(C)) means[c] = patch_sum[c] * inv_counts[p];
          }
        }
      });
      return;
    }
    const int64_t block = channel_block(P), blocks = (C + block - 1) / block;
    with_patch_width(mosaic, [&](auto patch_width) {
      // One task = `block` planes (m, b, c0 + i). The rows of a patch
      // row are summed into a column accumulator (a contiguous, vectorizable
      // loop over W), which is then cut into the patch row's gw patches.
      at::parallel_for(0, M * B * blocks, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> column_sums(W), patch_sums(mosaic.gw);
        // [p][i]: the means of the task's planes, so that each patch's means
        // leave as one contiguous run of out[b, p, m, c0:]. Stored plane by
        // plane, they would land `block` times on each cache line, at a stride
        // (M*C values) that maps them to a few L1 sets.
        std::vector<acc_t> means(P * block);
        for (const auto task : c10::irange(begin, end)) {
          const int64_t m = task / (B * blocks), b = task / blocks % B;
          const int64_t c0 = task % blocks * block, channels = std::min(block, C - c0);
          for (const auto i : c10::irange(channels)) {
            const scalar_t* plane = src[m] + (b * C + c0 + i) * H * W;
            for (const auto ph : c10::irange(mosaic.gh)) {
              sum_rows(plane + mosaic.rows[ph] * W, mosaic.rows[ph + 1] - mosaic.rows[ph], W,
                       column_sums.data());
              sum_patch_columns<patch_width()>(column_sums.data(), patch_sums.data(), mosaic);
              for (const auto pw : c10::irange(mosaic.gw)) {
                const int64_t p = ph * mosaic.gw + pw;
                means[p * block + i] = patch_sums[pw] * inv_counts[p];
              }
            }
          }
          for (const auto p : c10::irange(P)) {
            std::copy_n(means.data() + p * block, channels, dst + ((b * P + p) * M + m) * C + c0);
          }
        }
      });
    });
  });
  return out;
}

at::Tensor patch_pool_backward_cpu(const at::Tensor& grad, at::IntArrayRef grid, int64_t height,
                                   int64_t width, at::ScalarType dtype, bool channels_last) {
  TORCH_CHECK(grad.dim() == 3, "patch_pool_backward: grad must be (B, P, C), got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == acc_scalar(dtype),
              "patch_pool_backward: grad must be float32 (float64 for float64 maps)");
  const Mosaic mosaic = check_mosaic(grid, height, width);
  const int64_t B = grad.size(0), P = grad.size(1), C = grad.size(2);
  TORCH_CHECK(P == mosaic.patches(), "patch_pool_backward: grad has P=", P, ", grid has ",
              mosaic.patches());
  auto out = at::empty({B, C, height, width},
                       grad.options().dtype(dtype).memory_format(memory_format_of(channels_last)));
  if (out.numel() == 0) return out;
  const auto g = grad.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "patch_pool_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t* gp = g.const_data_ptr<acc_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const auto inv_counts = mosaic.inverse_counts<acc_t>();
    if (channels_last) {
      // One task = patch row ph of sample b: its W*C row once, then copied to its pixel rows.
      const int64_t row_size = width * C;
      at::parallel_for(0, B * mosaic.gh, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> row(row_size);
        for (const auto task : c10::irange(begin, end)) {
          const int64_t b = task / mosaic.gh, ph = task % mosaic.gh;
          for (const auto pw : c10::irange(mosaic.gw)) {
            const int64_t p = ph * mosaic.gw + pw;
            const acc_t* src = gp + (b * P + p) * C;
            for (int64_t x = mosaic.cols[pw]; x < mosaic.cols[pw + 1]; ++x) {
              for (const auto c : c10::irange(C)) row[x * C + c] = src[c] * inv_counts[p];
            }
          }
          for (int64_t h = mosaic.rows[ph]; h < mosaic.rows[ph + 1]; ++h) {
            std::transform(row.begin(), row.end(), dst + (b * height + h) * row_size,
                           [](acc_t v) { return static_cast<scalar_t>(v); });
          }
        }
      });
      return;
    }
    const int64_t block = channel_block(P), blocks = (C + block - 1) / block;
    with_patch_width(mosaic, [&](auto patch_width) {
      // One task = `block` planes (b, c0 + i). Each patch row's values are
      // spread over one row once and copied to the patch row's pixel rows.
      at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> values(block * P), row(width);
        for (const auto task : c10::irange(begin, end)) {
          const int64_t b = task / blocks, c0 = task % blocks * block;
          const int64_t channels = std::min(block, C - c0);
          // values[i][p] = grad[b, p, c0 + i] / |p|, read as runs of channels.
          for (const auto p : c10::irange(P)) {
            const acc_t* src = gp + (b * P + p) * C + c0;
            for (const auto i : c10::irange(channels)) values[i * P + p] = src[i] * inv_counts[p];
          }
          for (const auto i : c10::irange(channels)) {
            scalar_t* plane = dst + (b * C + c0 + i) * height * width;
            for (const auto ph : c10::irange(mosaic.gh)) {
              spread_patch_columns<patch_width()>(values.data() + i * P + ph * mosaic.gw, row.data(),
                                                  mosaic);
              for (int64_t h = mosaic.rows[ph]; h < mosaic.rows[ph + 1]; ++h) {
                std::transform(row.begin(), row.end(), plane + h * width,
                               [](acc_t v) { return static_cast<scalar_t>(v); });
              }
            }
          }
        }
      });
    });
  });
  return out;
}

// ---- patch_softmax_attention -----------------------------------------------------

void check_attention(const at::Tensor& q, const at::Tensor& k, const char* op) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && k.size(0) == q.size(0) && k.size(1) == q.size(1) &&
                  k.size(3) == q.size(2),
              op, ": q must be (B, P, D) and k (B, P, K, D), got ", q.sizes(), " and ", k.sizes());
  TORCH_CHECK(k.size(2) >= 1, op, ": K must be >= 1");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble),
              op, ": q and k must both be float32 or both float64");
}

at::Tensor patch_softmax_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                       const std::optional<at::Tensor>& prior_in, double tau) {
  check_attention(q_in, k_in, "patch_softmax_attention");
  TORCH_CHECK(tau > 0, "patch_softmax_attention: tau must be > 0, got ", tau);
  const int64_t B = q_in.size(0), P = q_in.size(1), D = q_in.size(2), K = k_in.size(2);
  const bool has_prior = prior_in.has_value() && prior_in->defined();
  if (has_prior) {
    TORCH_CHECK(prior_in->dim() == 1 && prior_in->size(0) == K &&
                    prior_in->scalar_type() == q_in.scalar_type(),
                "patch_softmax_attention: prior must be (K,) = (", K, ",) of q's dtype");
  }
  auto w = at::empty({B, P, K}, q_in.options());
  if (w.numel() == 0) return w;
  const auto q = q_in.contiguous(), k = k_in.contiguous();
  const auto prior = has_prior ? prior_in->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "patch_softmax_attention", [&] {
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    const scalar_t* pp = has_prior ? prior.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* wp = w.mutable_data_ptr<scalar_t>();
    const scalar_t scale = 1 / std::sqrt(static_cast<scalar_t>(D));
    const scalar_t inv_tau = static_cast<scalar_t>(1 / tau);
    at::parallel_for(0, B * P, attention_grain(K, D), [&](int64_t begin, int64_t end) {
      rowwise_dots(qp + begin * D, kp + begin * K * D, end - begin, K, D, wp + begin * K);
      for (const auto row : c10::irange(begin, end)) {
        scalar_t* lr = wp + row * K;
        scalar_t top = -std::numeric_limits<scalar_t>::infinity();
        for (const auto kk : c10::irange(K)) {
          lr[kk] = (lr[kk] * scale + (pp ? pp[kk] : scalar_t(0))) * inv_tau;
          top = std::max(top, lr[kk]);
        }
        for (const auto kk : c10::irange(K)) lr[kk] -= top;
      }
    });
    // One vectorized exp over all rows: a scalar std::exp per logit cost more
    // than the dot products (and ATen's softmax is slower still for rows of K = 8).
    w.exp_();
    at::parallel_for(0, B * P, attention_grain(K, D), [&](int64_t begin, int64_t end) {
      for (const auto row : c10::irange(begin, end)) {
        scalar_t* wr = wp + row * K;
        scalar_t total = 0;
        for (const auto kk : c10::irange(K)) total += wr[kk];
        for (const auto kk : c10::irange(K)) wr[kk] /= total;
      }
    });
  });
  return w;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_softmax_attention_backward_cpu(
    const at::Tensor& grad_w_in, const at::Tensor& w_in, const at::Tensor& q_in,
    const at::Tensor& k_in, double tau, bool prior_requires_grad) {
  check_attention(q_in, k_in, "patch_softmax_attention_backward");
  const int64_t B = q_in.size(0), P = q_in.size(1), D = q_in.size(2), K = k_in.size(2);
  TORCH_CHECK(w_in.sizes() == at::IntArrayRef({B, P, K}) && grad_w_in.sizes() == w_in.sizes() &&
                  w_in.scalar_type() == q_in.scalar_type() &&
                  grad_w_in.scalar_type() == q_in.scalar_type(),
              "patch_softmax_attention_backward: w and grad_w must be (B, P, K) of q's dtype");
  auto grad_q = at::empty_like(q_in, at::MemoryFormat::Contiguous);
  auto grad_k = at::empty_like(k_in, at::MemoryFormat::Contiguous);
  // d loss / d logits per row; summed over rows for the prior's gradient.
  auto grad_logits = at::empty({B * P, K}, q_in.options());
  if (B * P > 0) {
    const auto gw = grad_w_in.contiguous(), w = w_in.contiguous(), q = q_in.contiguous(),
               k = k_in.contiguous();
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "patch_softmax_attention_backward", [&] {
      const scalar_t* gwp = gw.const_data_ptr<scalar_t>();
      const scalar_t* wp = w.const_data_ptr<scalar_t>();
      const scalar_t* qp = q.const_data_ptr<scalar_t>();
      const scalar_t* kp = k.const_data_ptr<scalar_t>();
      scalar_t* gqp = grad_q.mutable_data_ptr<scalar_t>();
      scalar_t* gkp = grad_k.mutable_data_ptr<scalar_t>();
      scalar_t* glp = grad_logits.mutable_data_ptr<scalar_t>();
      const scalar_t scale = 1 / std::sqrt(static_cast<scalar_t>(D));
      const scalar_t inv_tau = static_cast<scalar_t>(1 / tau);
      at::parallel_for(0, B * P, attention_grain(K, D), [&](int64_t begin, int64_t end) {
        for (const auto row : c10::irange(begin, end)) {
          const scalar_t* wr = wp + row * K;
          const scalar_t* gwr = gwp + row * K;
          scalar_t* glr = glp + row * K;
          scalar_t w_dot_gw = 0;
          for (const auto kk : c10::irange(K)) w_dot_gw += wr[kk] * gwr[kk];
          for (const auto kk : c10::irange(K)) glr[kk] = wr[kk] * (gwr[kk] - w_dot_gw) * inv_tau;
          const scalar_t* qr = qp + row * D;
          scalar_t* gqr = gqp + row * D;
          for (const auto d : c10::irange(D)) gqr[d] = 0;
          for (const auto kk : c10::irange(K)) {
            const scalar_t* kr = kp + (row * K + kk) * D;
            scalar_t* gkr = gkp + (row * K + kk) * D;
            const scalar_t g = glr[kk] * scale;
            for (const auto d : c10::irange(D)) {
              gqr[d] += g * kr[d];
              gkr[d] = g * qr[d];
            }
          }
        }
      });
    });
  }
  auto grad_prior = q_in.new_empty({prior_requires_grad ? K : 0});
  if (prior_requires_grad) {
    // B*P*K additions: serial, in row order (deterministic).
    AT_DISPATCH_FLOATING_TYPES(q_in.scalar_type(), "patch_softmax_attention_backward_prior", [&] {
      const scalar_t* glp = grad_logits.const_data_ptr<scalar_t>();
      scalar_t* gpp = grad_prior.mutable_data_ptr<scalar_t>();
      std::fill(gpp, gpp + K, scalar_t(0));
      for (const auto row : c10::irange(B * P)) {
        for (const auto kk : c10::irange(K)) gpp[kk] += glp[row * K + kk];
      }
    });
  }
  return {grad_q, grad_k, grad_prior};
}

// ---- patch_attention_outputs_backward ------------------------------------------------

std::vector<at::Tensor> patch_attention_outputs_backward_cpu(const at::Tensor& grad_in,
                                                             const at::Tensor& weights_in,
                                                             const at::Tensor& grad_pooled_in,
                                                             at::IntArrayRef grid) {
  TORCH_CHECK(grad_in.dim() == 4, "patch_attention_outputs_backward: grad must be (B, C, H, W)");
  const int64_t B = grad_in.size(0), C = grad_in.size(1), H = grad_in.size(2), W = grad_in.size(3);
  const Mosaic mosaic = check_mosaic(grid, H, W);
  const int64_t P = mosaic.patches();
  TORCH_CHECK(weights_in.dim() == 3 && weights_in.size(0) == B && weights_in.size(1) == P &&
                  weights_in.scalar_type() == acc_scalar(grad_in.scalar_type()),
              "patch_attention_outputs_backward: weights must be (B, P, K) in float32 "
              "(float64 for float64 grad), got ", weights_in.sizes(), " ", weights_in.scalar_type());
  const int64_t K = weights_in.size(2);
  TORCH_CHECK(grad_pooled_in.sizes() == at::IntArrayRef({B, P, K, C}) &&
                  grad_pooled_in.scalar_type() == weights_in.scalar_type(),
              "patch_attention_outputs_backward: grad_pooled must be (B, P, K, C) of weights' dtype");
  // The gradients take grad's layout (the caller brings grad to the outputs' layout).
  const bool channels_last = channels_last_order({grad_in});
  std::vector<at::Tensor> grads;
  for (const auto kk : c10::irange(K)) {
    (void)kk;
    grads.push_back(at::empty({B, C, H, W}, grad_in.options().memory_format(memory_format_of(channels_last))));
  }
  if (grad_in.numel() == 0) return grads;
  const auto g = channels_last ? grad_in : grad_in.contiguous();
  const auto w = weights_in.contiguous(), gpool = grad_pooled_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(),
                                  "patch_attention_outputs_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const acc_t* gpp = gpool.const_data_ptr<acc_t>();
    std::vector<scalar_t*> dst(K);
    for (const auto kk : c10::irange(K)) dst[kk] = grads[kk].mutable_data_ptr<scalar_t>();
    const auto inv_counts = mosaic.inverse_counts<acc_t>();
    if (channels_last) {
      // One task = patch row ph of sample b. The weight and the pooled gradient
      // of every op are spread over one W*C row each (per pixel, per channel),
      // then every pixel row of the patch row is one multiply-add per op.
      const int64_t row = W * C;
      at::parallel_for(0, B * mosaic.gh, 1, [&](int64_t begin, int64_t end) {
        std::vector<acc_t> weight_rows(K * row), add_rows(K * row);
        for (const auto task : c10::irange(begin, end)) {
          const int64_t b = task / mosaic.gh, ph = task % mosaic.gh;
          for (const auto kk : c10::irange(K)) {
            for (const auto pw : c10::irange(mosaic.gw)) {
              const int64_t p = ph * mosaic.gw + pw;
              const acc_t weight = wp[(b * P + p) * K + kk];
              const acc_t* pooled = gpp + ((b * P + p) * K + kk) * C;
              for (int64_t x = mosaic.cols[pw]; x < mosaic.cols[pw + 1]; ++x) {
                acc_t* wr = weight_rows.data() + kk * row + x * C;
                acc_t* ar = add_rows.data() + kk * row + x * C;
                for (const auto c : c10::irange(C)) {
                  wr[c] = weight;
                  ar[c] = pooled[c] * inv_counts[p];
                }
              }
            }
          }
          for (int64_t h = mosaic.rows[ph]; h < mosaic.rows[ph + 1]; ++h) {
            const int64_t offset = (b * H + h) * row;
            for (const auto kk : c10::irange(K)) {
              multiply_add_row(weight_rows.data() + kk * row, gp + offset, add_rows.data() + kk * row,
                               dst[kk] + offset, row);
            }
          }
        }
      });
      return;
    }
    const int64_t block = channel_block(K * P), blocks = (C + block - 1) / block;
    // Row stride of the per-channel additive terms below, one cache line over
    // K*P so that a power-of-two K*P does not put the channel rows of a
    // transposed column on the same few L1 sets.
    const int64_t adds_stride = K * P + 64 / static_cast<int64_t>(sizeof(acc_t));
    with_patch_width(mosaic, [&](auto patch_width) {
      // A patch row of one-pixel-wide patches is already a row of W values:
      // nothing to spread.
      constexpr bool spread = patch_width() != 1;
      // One task = `block` planes (b, c0 + i). The weight and the pooled
      // gradient of every op are spread over rows of W (one per op and patch
      // row), so the pixel loop is a contiguous multiply-add per op: grad is
      // read once and each op's gradient row written once. The weights do not
      // depend on c: their rows are spread once per sample, not per plane.
      at::parallel_for(0, B * blocks, 1, [&](int64_t begin, int64_t end) {
        // [kk][p]: the weights of sample b.
        std::vector<acc_t> patch_weights(K * P);
        // [kk][ph][x]: their rows, spread.
        std::vector<acc_t> weight_rows(spread ? K * mosaic.gh * W : 0);
        // [i][kk][p]: grad_pooled[b, p, kk, c0 + i] / |p|, read as contiguous runs over c.
        std::vector<acc_t> patch_adds(block * adds_stride);
        // [kk][x]: the additive terms of one plane and patch row, spread.
        std::vector<acc_t> add_rows(spread ? K * W : 0);
        int64_t spread_sample = -1;
        for (const auto task : c10::irange(begin, end)) {
          const int64_t b = task / blocks, c0 = task % blocks * block;
          const int64_t channels = std::min(block, C - c0);
          if (b != spread_sample) {
            for (const auto p : c10::irange(P)) {
              for (const auto kk : c10::irange(K)) patch_weights[kk * P + p] = wp[(b * P + p) * K + kk];
            }
            if constexpr (spread) {
              for (const auto row : c10::irange(K * mosaic.gh)) {
                spread_patch_columns<patch_width()>(patch_weights.data() + row * mosaic.gw,
                                                    weight_rows.data() + row * W, mosaic);
              }
            }
            spread_sample = b;
          }
          for (const auto p : c10::irange(P)) {
            for (const auto kk : c10::irange(K)) {
              const acc_t* pooled = gpp + ((b * P + p) * K + kk) * C + c0;
              for (const auto i : c10::irange(channels)) {
                patch_adds[i * adds_stride + kk * P + p] = pooled[i] * inv_counts[p];
              }
            }
          }
          for (const auto i : c10::irange(channels)) {
            const int64_t plane = (b * C + c0 + i) * H * W;
            const acc_t* plane_adds = patch_adds.data() + i * adds_stride;
            for (const auto ph : c10::irange(mosaic.gh)) {
              if constexpr (spread) {
                for (const auto kk : c10::irange(K)) {
                  spread_patch_columns<patch_width()>(plane_adds + kk * P + ph * mosaic.gw,
                                                      add_rows.data() + kk * W, mosaic);
                }
              }
              for (int64_t h = mosaic.rows[ph]; h < mosaic.rows[ph + 1]; ++h) {
                const scalar_t* grow = gp + plane + h * W;
                for (const auto kk : c10::irange(K)) {
                  const acc_t* rw = spread ? weight_rows.data() + (kk * mosaic.gh + ph) * W
                                           : patch_weights.data() + kk * P + ph * W;
                  const acc_t* ra = spread ? add_rows.data() + kk * W : plane_adds + kk * P + ph * W;
                  scalar_t* orow = dst[kk] + plane + h * W;
                  multiply_add_row(rw, grow, ra, orow, W);
                }
              }
            }
          }
        }
      });
    });
  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(nasops, CPU, m) {
  m.impl("patch_pool", &patch_pool_cpu);
  m.impl("patch_pool_backward", &patch_pool_backward_cpu);
  m.impl("patch_softmax_attention", &patch_softmax_attention_cpu);
  m.impl("patch_softmax_attention_backward", &patch_softmax_attention_backward_cpu);
  m.impl("patch_attention_outputs_backward", &patch_attention_outputs_backward_cpu);
}

}  // namespace nasops
