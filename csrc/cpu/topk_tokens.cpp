// topk_tokens (SPEC 2.3) on the CPU: DASViT token scores, exact top-k and the
// gated gather, forward and backward.
//
// One parallel region per call, over the samples (a sample's scores, selection
// and rows stay on one thread; each extra region costs a thread-pool wake-up,
// which on a loaded machine is more than the work). Parallelism is therefore
// min(B, threads): fine for training batches.
// Forward, per sample: k_mean, the N scores, the selection (nth_element on
// (score desc, index asc), then the kept indices sorted ascending), the inverse
// map pos, then each kept row copied (gates none / straight_through) or scaled
// (sigmoid).
// Backward, per sample: per kept row the gate factor and d(loss)/d(s_sel); per
// token row grad_x (the kept row's gradient or zeros, written once);
// grad_q = g_s k_mean / sqrt(D) and grad_k = (sum_i g_s,i q_i) / (N sqrt(D)).
// Where the time goes (B=64 N=197 C=768 D=64 float32): the dot products are
// in 8 partial sums (dot() below: a single running sum made the backward's
// grad_s dots over C latency-bound); when the allocator hands out fresh pages
// for the (B, N, C) grad_x, each thread maps its part in one system call
// (map_pages_for_writing below), which halves the cost of 4 KiB first-touch
// faults. What is left is memory traffic (backward ~130 MB at keep 0.5,
// read-for-ownership included) and the kernel's zeroing of fresh pages.
// Tried and not used: grad_x on 2 MiB transparent huge pages (fewer faults, but
// on the development VM a never-touched huge page cost ~2.5 ms to fault, ~50 ms
// per backward until pages were recycled); streaming stores for grad_x (no gain
// on reused memory, 3x slower on freshly faulted pages).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

#include "cpu/dot.h"

namespace nasops {
namespace {

using at::Tensor;

enum class Gate { None, StraightThrough, Sigmoid };

Gate parse_gate(c10::string_view name) {
  if (name == "none") return Gate::None;
  if (name == "straight_through") return Gate::StraightThrough;
  if (name == "sigmoid") return Gate::Sigmoid;
  TORCH_CHECK(false, "topk_tokens: gate must be 'none', 'straight_through' or 'sigmoid', got '",
              std::string(name), "'");
}

// An integer whose unsigned order is the numeric order of v, with -0 == +0 and
// NaN above every number (torch.sort's descending order). float -> double keeps
// the order, so one key type serves every dtype.
inline uint64_t order_key(double v) {
  if (std::isnan(v)) return UINT64_MAX;
  if (v == 0.0) v = 0.0;
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return (bits >> 63) ? ~bits : (bits | (uint64_t{1} << 63));
}

// Maps the pages of [begin, begin + bytes) for writing in one system call
// (madvise MADV_POPULATE_WRITE, Linux >= 5.14) instead of one page fault per
// 4 KiB page on first touch: PyTorch's CPU allocator does not cache, so the
// (B, N, C) grad_x is often fresh pages from the OS (glibc maps a block of 32
// MiB or more anew each time). Only when a page in the middle of the range is
// not mapped yet (mincore): on reused memory the page-table walk alone cost
// ~0.7 ms per backward. If refused (older kernels), first touch maps them.
inline void map_pages_for_writing(void* begin, size_t bytes) {
#if defined(__linux__)
  constexpr int kPopulateWrite = 23;  // MADV_POPULATE_WRITE, absent from older headers
  static const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t first = (reinterpret_cast<uintptr_t>(begin) + page - 1) / page * page;
  const uintptr_t last = (reinterpret_cast<uintptr_t>(begin) + bytes) / page * page;
  if (last <= first + 16 * page) return;
  const uintptr_t middle = first + (last - first) / 2 / page * page;
  unsigned char mapped = 0;
  if (mincore(reinterpret_cast<void*>(middle), page, &mapped) == 0 && !(mapped & 1))
    madvise(reinterpret_cast<void*>(first), last - first, kPopulateWrite);
#else
  (void)begin;
  (void)bytes;
#endif
}

// Indices of the kept tokens of one row, ascending, into `out` (keep entries).
void select_row(const uint64_t* key, int64_t N, int64_t keep, bool keep_cls,
                std::vector<int64_t>& candidates, int64_t* out) {
  const int64_t first = keep_cls ? 1 : 0;
  const int64_t want = keep - first;
  candidates.resize(N - first);
  for (int64_t i = first; i < N; ++i) candidates[i - first] = i;
  auto better = [key](int64_t a, int64_t b) {
    return key[a] != key[b] ? key[a] > key[b] : a < b;
  };
  if (want > 0 && want < static_cast<int64_t>(candidates.size()))
    std::nth_element(candidates.begin(), candidates.begin() + (want - 1), candidates.end(), better);
  std::sort(candidates.begin(), candidates.begin() + want);
  int64_t j = 0;
  if (keep_cls) out[j++] = 0;
  for (int64_t t = 0; t < want; ++t) out[j++] = candidates[t];
}

void check_inputs(const Tensor& x, const Tensor& q, const Tensor& k) {
  TORCH_CHECK(x.dim() == 3 && q.dim() == 3 && k.dim() == 3,
              "topk_tokens: x, q, k must be (B, N, C), (B, N, D), (B, N, D)");
  TORCH_CHECK(q.sizes() == k.sizes() && q.size(0) == x.size(0) && q.size(1) == x.size(1),
              "topk_tokens: q and k must be (B, N, D) with x's B and N; got x ", x.sizes(),
              ", q ", q.sizes(), ", k ", k.sizes());
  TORCH_CHECK(q.scalar_type() == x.scalar_type() && k.scalar_type() == x.scalar_type(),
              "topk_tokens: x, q and k must share one dtype");
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> topk_tokens_cpu(
    const Tensor& x_in, const Tensor& q_in, const Tensor& k_in, int64_t keep, bool keep_cls,
    c10::string_view gate_name) {
  check_inputs(x_in, q_in, k_in);
  const Gate gate = parse_gate(gate_name);
  const int64_t B = x_in.size(0), N = x_in.size(1), C = x_in.size(2), D = q_in.size(2);
  TORCH_CHECK(keep >= 1 && keep <= N, "topk_tokens: keep must be in [1, N=", N, "], got ", keep);
  const Tensor x = x_in.contiguous(), q = q_in.contiguous(), k = k_in.contiguous();
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;

  Tensor x_sel = at::empty({B, keep, C}, x.options());
  Tensor idx = at::empty({B, keep}, x.options().dtype(at::kLong));
  Tensor s = at::empty({B, N}, x.options());
  Tensor k_mean = at::empty({B, D}, x.options().dtype(acc_type));
  Tensor pos = at::empty({B, N}, x.options().dtype(at::kLong));
  if (B == 0) return {x_sel, idx, s, k_mean, pos};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "topk_tokens_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* kp = k.const_data_ptr<scalar_t>();
    scalar_t* sp = s.mutable_data_ptr<scalar_t>();
    acc_t* kmp = k_mean.mutable_data_ptr<acc_t>();
    int64_t* ip = idx.mutable_data_ptr<int64_t>();
    int64_t* pp = pos.mutable_data_ptr<int64_t>();
    scalar_t* op = x_sel.mutable_data_ptr<scalar_t>();
    const acc_t sqrt_d = std::sqrt(static_cast<acc_t>(D));

    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      std::vector<acc_t> score(N);
      std::vector<uint64_t> key(N);
      std::vector<int64_t> candidates;
      for (int64_t b = b0; b < b1; ++b) {
        acc_t* km = kmp + b * D;
        std::fill(km, km + D, acc_t(0));
        for (int64_t i = 0; i < N; ++i) {
          const scalar_t* kr = kp + (b * N + i) * D;
          for (int64_t d = 0; d < D; ++d) km[d] += static_cast<acc_t>(kr[d]);
        }
        for (int64_t d = 0; d < D; ++d) km[d] /= static_cast<acc_t>(N);
        for (int64_t i = 0; i < N; ++i) {
          score[i] = dot<acc_t>(qp + (b * N + i) * D, km, D) / sqrt_d;
          sp[b * N + i] = static_cast<scalar_t>(score[i]);
          key[i] = order_key(static_cast<double>(score[i]));
        }
        int64_t* row = ip + b * keep;
        select_row(key.data(), N, keep, keep_cls, candidates, row);
        std::fill(pp + b * N, pp + (b + 1) * N, int64_t(-1));
        for (int64_t j = 0; j < keep; ++j) {
          pp[b * N + row[j]] = j;
          const scalar_t* src = xp + (b * N + row[j]) * C;
          scalar_t* dst = op + (b * keep + j) * C;
          if (gate == Gate::Sigmoid) {
            const acc_t g = acc_t(1) / (acc_t(1) + std::exp(-score[row[j]]));
            for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(static_cast<acc_t>(src[c]) * g);
          } else if (C) {  // straight-through is the plain gather forward
            std::memcpy(dst, src, C * sizeof(scalar_t));
          }
        }
      }
    });
  });
  return {x_sel, idx, s, k_mean, pos};
}

std::tuple<Tensor, Tensor, Tensor> topk_tokens_backward_cpu(
    const Tensor& grad_x_sel_in, const Tensor& grad_s_in, const Tensor& x_in, const Tensor& q_in,
    const Tensor& k_in, const Tensor& idx_in, const Tensor& k_mean_in, const Tensor& pos_in,
    c10::string_view gate_name, bool x_requires_grad, bool qk_requires_grad) {
  check_inputs(x_in, q_in, k_in);
  const Gate gate = parse_gate(gate_name);
  const int64_t B = x_in.size(0), N = x_in.size(1), C = x_in.size(2), D = q_in.size(2);
  const int64_t keep = idx_in.size(1);
  TORCH_CHECK(grad_x_sel_in.sizes() == at::IntArrayRef({B, keep, C}) &&
                  grad_s_in.sizes() == at::IntArrayRef({B, N}) &&
                  k_mean_in.sizes() == at::IntArrayRef({B, D}) &&
                  pos_in.sizes() == at::IntArrayRef({B, N}),
              "topk_tokens_backward: inconsistent shapes");
  const Tensor x = x_in.contiguous(), q = q_in.contiguous();
  const Tensor gy = grad_x_sel_in.to(x.scalar_type()).contiguous();
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor gs = grad_s_in.to(acc_type).contiguous();
  const Tensor idx = idx_in.contiguous(), pos = pos_in.contiguous();
  const Tensor k_mean = k_mean_in.to(acc_type).contiguous();

  Tensor grad_x = x_requires_grad ? at::empty({B, N, C}, x.options()) : at::empty({0}, x.options());
  Tensor grad_q = qk_requires_grad ? at::empty({B, N, D}, x.options()) : at::empty({0}, x.options());
  Tensor grad_k = qk_requires_grad ? at::empty({B, N, D}, x.options()) : at::empty({0}, x.options());
  if (B == 0 || !(x_requires_grad || qk_requires_grad)) return {grad_x, grad_q, grad_k};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "topk_tokens_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* gyp = gy.const_data_ptr<scalar_t>();
    const acc_t* gsp = gs.const_data_ptr<acc_t>();
    const acc_t* kmp = k_mean.const_data_ptr<acc_t>();
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    const int64_t* pp = pos.const_data_ptr<int64_t>();
    const acc_t sqrt_d = std::sqrt(static_cast<acc_t>(D));
    scalar_t* gxp = x_requires_grad ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gqp = qk_requires_grad ? grad_q.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* gkp = qk_requires_grad ? grad_k.mutable_data_ptr<scalar_t>() : nullptr;

    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      // Per kept row: the forward gate factor and d(loss)/d(s) through the gate.
      std::vector<acc_t> gate_of_row(keep), grad_s_sel(keep), grad_k_mean(D);
      if (x_requires_grad) map_pages_for_writing(gxp + b0 * N * C, (b1 - b0) * N * C * sizeof(scalar_t));
      for (int64_t b = b0; b < b1; ++b) {
        const acc_t* km = kmp + b * D;
        for (int64_t j = 0; j < keep; ++j) {
          const int64_t i = ip[b * keep + j];
          acc_t gate_value = 1, slope = 1;  // d gate / d s: 1 for straight-through
          if (gate == Gate::Sigmoid) {
            const acc_t score = dot<acc_t>(qp + (b * N + i) * D, km, D) / sqrt_d;
            gate_value = acc_t(1) / (acc_t(1) + std::exp(-score));
            slope = gate_value * (acc_t(1) - gate_value);
          }
          gate_of_row[j] = gate_value;
          grad_s_sel[j] = 0;
          if (qk_requires_grad && gate != Gate::None) {
            grad_s_sel[j] = dot<acc_t>(gyp + (b * keep + j) * C, xp + (b * N + i) * C, C) * slope;
          }
        }

        if (x_requires_grad) {
          for (int64_t i = 0; i < N; ++i) {
            const int64_t j = pp[b * N + i];
            scalar_t* dst = gxp + (b * N + i) * C;
            if (j < 0) {
              std::fill(dst, dst + C, scalar_t(0));
              continue;
            }
            const scalar_t* src = gyp + (b * keep + j) * C;
            if (gate == Gate::Sigmoid) {
              const acc_t g = gate_of_row[j];
              for (int64_t c = 0; c < C; ++c) dst[c] = static_cast<scalar_t>(static_cast<acc_t>(src[c]) * g);
            } else if (C) {
              std::memcpy(dst, src, C * sizeof(scalar_t));
            }
          }
        }

        if (qk_requires_grad) {
          std::fill(grad_k_mean.begin(), grad_k_mean.end(), acc_t(0));
          for (int64_t i = 0; i < N; ++i) {
            const int64_t j = pp[b * N + i];
            const acc_t g = (gsp[b * N + i] + (j >= 0 ? grad_s_sel[j] : acc_t(0))) / sqrt_d;
            const scalar_t* qr = qp + (b * N + i) * D;
            scalar_t* gq = gqp + (b * N + i) * D;
            for (int64_t d = 0; d < D; ++d) {
              gq[d] = static_cast<scalar_t>(g * km[d]);
              grad_k_mean[d] += g * static_cast<acc_t>(qr[d]);
            }
          }
          for (int64_t d = 0; d < D; ++d) grad_k_mean[d] /= static_cast<acc_t>(N);
          for (int64_t i = 0; i < N; ++i) {
            scalar_t* gk = gkp + (b * N + i) * D;
            for (int64_t d = 0; d < D; ++d) gk[d] = static_cast<scalar_t>(grad_k_mean[d]);
          }
        }
      }
    });
  });
  return {grad_x, grad_q, grad_k};
}

}  // namespace

TORCH_LIBRARY_IMPL(nasops, CPU, m) {
  m.impl("topk_tokens", &topk_tokens_cpu);
  m.impl("topk_tokens_backward", &topk_tokens_backward_cpu);
}

}  // namespace nasops
