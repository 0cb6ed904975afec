// CPU kernels of the patchwise softmax attention (SPEC 2.2); schemas in csrc/ops.cpp.
//
// Every map kernel walks one contiguous (H, W) plane of a (B, C, H, W) tensor
// per task, patch by patch: a 32x32 fp32 plane is 4 KiB, so the plane stays
// in L1 while its patches are visited, and each pixel is read or written once.
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

// Rows of (B, P) per task for the attention kernels: about 2^20 multiply-adds,
// so the tiny (B*P, K, D) problems of a DARTS edge run on one thread instead
// of paying a thread-pool barrier (costly on a loaded machine) for microseconds of work.
int64_t attention_grain(int64_t K, int64_t D) {
  return std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, K * D));
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
  std::vector<at::Tensor> contiguous;
  for (const auto& m : maps) contiguous.push_back(m.contiguous());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, ref.scalar_type(), "patch_pool", [&] {
    using acc_t = acc_type<scalar_t>;
    std::vector<const scalar_t*> src(M);
    for (const auto m : c10::irange(M)) src[m] = contiguous[m].const_data_ptr<scalar_t>();
    acc_t* dst = out.mutable_data_ptr<acc_t>();
    const auto inv_counts = mosaic.inverse_counts<acc_t>();
    // One task = one (m, b, c) plane. Rows of a patch row are summed into a
    // column accumulator (a contiguous, vectorizable loop over W), which is
    // then cut into the patch row's gw patches.
    at::parallel_for(0, M * B * C, 16, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> column_sums(W);
      for (const auto task : c10::irange(begin, end)) {
        const int64_t m = task / (B * C), bc = task % (B * C), b = bc / C, c = bc % C;
        const scalar_t* plane = src[m] + bc * H * W;
        acc_t* row_out = dst + (b * P * M + m) * C + c;  // + p * M * C
        for (const auto ph : c10::irange(mosaic.gh)) {
          std::fill(column_sums.begin(), column_sums.end(), acc_t(0));
          for (int64_t h = mosaic.rows[ph]; h < mosaic.rows[ph + 1]; ++h) {
            const scalar_t* row = plane + h * W;
            for (const auto w : c10::irange(W)) column_sums[w] += static_cast<acc_t>(row[w]);
          }
          for (const auto pw : c10::irange(mosaic.gw)) {
            acc_t sum = 0;
            for (int64_t w = mosaic.cols[pw]; w < mosaic.cols[pw + 1]; ++w) sum += column_sums[w];
            row_out[(ph * mosaic.gw + pw) * M * C] = sum * inv_counts[ph * mosaic.gw + pw];
          }
        }
      }
    });
  });
  return out;
}

at::Tensor patch_pool_backward_cpu(const at::Tensor& grad, at::IntArrayRef grid, int64_t height,
                                   int64_t width, at::ScalarType dtype) {
  TORCH_CHECK(grad.dim() == 3, "patch_pool_backward: grad must be (B, P, C), got ", grad.sizes());
  TORCH_CHECK(grad.scalar_type() == acc_scalar(dtype),
              "patch_pool_backward: grad must be float32 (float64 for float64 maps)");
  const Mosaic mosaic = check_mosaic(grid, height, width);
  const int64_t B = grad.size(0), P = grad.size(1), C = grad.size(2);
  TORCH_CHECK(P == mosaic.patches(), "patch_pool_backward: grad has P=", P, ", grid has ",
              mosaic.patches());
  auto out = at::empty({B, C, height, width}, grad.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const auto g = grad.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "patch_pool_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const acc_t* gp = g.const_data_ptr<acc_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const auto inv_counts = mosaic.inverse_counts<acc_t>();
    at::parallel_for(0, B * C, 16, [&](int64_t begin, int64_t end) {
      for (const auto bc : c10::irange(begin, end)) {
        const int64_t b = bc / C, c = bc % C;
        scalar_t* plane = dst + bc * height * width;
        for (const auto ph : c10::irange(mosaic.gh)) {
          for (const auto pw : c10::irange(mosaic.gw)) {
            const int64_t p = ph * mosaic.gw + pw;
            const auto v = static_cast<scalar_t>(gp[(b * P + p) * C + c] * inv_counts[p]);
            for (int64_t h = mosaic.rows[ph]; h < mosaic.rows[ph + 1]; ++h) {
              scalar_t* row = plane + h * width;
              for (int64_t w = mosaic.cols[pw]; w < mosaic.cols[pw + 1]; ++w) row[w] = v;
            }
          }
        }
      }
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
  std::vector<at::Tensor> grads;
  for (const auto kk : c10::irange(K)) {
    (void)kk;
    grads.push_back(at::empty({B, C, H, W}, grad_in.options()));
  }
  if (grad_in.numel() == 0) return grads;
  const auto g = grad_in.contiguous(), w = weights_in.contiguous(), gpool = grad_pooled_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(),
                                  "patch_attention_outputs_backward", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const acc_t* wp = w.const_data_ptr<acc_t>();
    const acc_t* gpp = gpool.const_data_ptr<acc_t>();
    std::vector<scalar_t*> dst(K);
    for (const auto kk : c10::irange(K)) dst[kk] = grads[kk].mutable_data_ptr<scalar_t>();
    const auto inv_counts = mosaic.inverse_counts<acc_t>();
    // One task = one (b, c) plane. Per patch row, the weight and the pooled
    // gradient of every op are painted onto a row of W (K*W values each), so
    // the pixel loop is a contiguous fused multiply-add per op: grad is read
    // once and each op's gradient row written once.
    at::parallel_for(0, B * C, 4, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> row_weight(K * W), row_add(K * W);
      for (const auto bc : c10::irange(begin, end)) {
        const int64_t b = bc / C, c = bc % C;
        const int64_t plane = bc * H * W;
        for (const auto ph : c10::irange(mosaic.gh)) {
          for (const auto pw : c10::irange(mosaic.gw)) {
            const int64_t p = ph * mosaic.gw + pw;
            const acc_t inv_count = inv_counts[p];
            for (const auto kk : c10::irange(K)) {
              const acc_t wk = wp[(b * P + p) * K + kk];
              const acc_t add = gpp[((b * P + p) * K + kk) * C + c] * inv_count;
              for (int64_t x = mosaic.cols[pw]; x < mosaic.cols[pw + 1]; ++x) {
                row_weight[kk * W + x] = wk;
                row_add[kk * W + x] = add;
              }
            }
          }
          for (int64_t h = mosaic.rows[ph]; h < mosaic.rows[ph + 1]; ++h) {
            const scalar_t* grow = gp + plane + h * W;
            for (const auto kk : c10::irange(K)) {
              const acc_t* rw = row_weight.data() + kk * W;
              const acc_t* ra = row_add.data() + kk * W;
              scalar_t* orow = dst[kk] + plane + h * W;
              for (const auto x : c10::irange(W)) {
                orow[x] = static_cast<scalar_t>(rw[x] * static_cast<acc_t>(grow[x]) + ra[x]);
              }
            }
          }
        }
      }
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
