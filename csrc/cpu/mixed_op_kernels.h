// mixed_op CPU kernels: the hot loops, included twice by csrc/cpu/mixed_op.cpp,
// once compiled for AVX2+FMA+F16C and once for the baseline ISA, and chosen at
// run time (the extension is built without -march flags, so one binary serves
// every x86-64 CPU). No include guard on purpose. Relies on the declarations
// that precede the include there (acc_type, kTile, kChunk, Geometry, ...).

// Element conversions. c10::Half's own are bit manipulations (the extension is
// built without -mf16c); where this file is compiled for F16C, go through
// _Float16, whose conversions GCC vectorizes to vcvtph2ps / vcvtps2ph.
template <typename acc_t, typename scalar_t>
inline acc_t to_acc(scalar_t x) {
#ifdef NASOPS_F16C_CONVERSIONS
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return static_cast<acc_t>(c10::bit_cast<_Float16>(x.x));
  }
#endif
  return static_cast<acc_t>(x);
}

template <typename scalar_t, typename acc_t>
inline scalar_t from_acc(acc_t v) {
#ifdef NASOPS_F16C_CONVERSIONS
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return c10::Half(c10::bit_cast<uint16_t>(static_cast<_Float16>(v)), c10::Half::from_bits());
  }
#endif
  return static_cast<scalar_t>(v);
}

// ---- runs: n consecutive elements, one weight per op ------------------------
// Ops are taken G <= 4 at a time: each pass over an L1 tile reads the
// accumulator (or g) once for G inputs, which halves the L1 traffic per op
// and lets the loads of G streams overlap.

// acc[i] = (kFirst ? 0 : acc[i]) + w0*x0[i] + ... + w{G-1}*x{G-1}[i], summed left
// to right (the order of the eager reference).
template <bool kFirst, int G, typename acc_t, typename scalar_t>
inline void axpy_group(acc_t* __restrict__ acc, const acc_t* w, const scalar_t* __restrict__ x0,
                       const scalar_t* __restrict__ x1, const scalar_t* __restrict__ x2,
                       const scalar_t* __restrict__ x3, int64_t n) {
  const acc_t w0 = w[0], w1 = G > 1 ? w[1] : 0, w2 = G > 2 ? w[2] : 0, w3 = G > 3 ? w[3] : 0;
  for (int64_t i = 0; i < n; ++i) {
    acc_t s = w0 * to_acc<acc_t>(x0[i]);
    if constexpr (!kFirst) s = acc[i] + s;
    if constexpr (G > 1) s += w1 * to_acc<acc_t>(x1[i]);
    if constexpr (G > 2) s += w2 * to_acc<acc_t>(x2[i]);
    if constexpr (G > 3) s += w3 * to_acc<acc_t>(x3[i]);
    acc[i] = s;
  }
}

template <bool kFirst, typename acc_t, typename scalar_t>
inline void axpy_ops(acc_t* acc, const acc_t* w, const scalar_t* const* x, int64_t t, int G,
                     int64_t n) {
  switch (G) {
    case 1:
      return axpy_group<kFirst, 1, acc_t, scalar_t>(acc, w, x[0] + t, nullptr, nullptr, nullptr, n);
    case 2:
      return axpy_group<kFirst, 2, acc_t, scalar_t>(acc, w, x[0] + t, x[1] + t, nullptr, nullptr, n);
    case 3:
      return axpy_group<kFirst, 3, acc_t, scalar_t>(acc, w, x[0] + t, x[1] + t, x[2] + t, nullptr, n);
    default:
      return axpy_group<kFirst, 4, acc_t, scalar_t>(acc, w, x[0] + t, x[1] + t, x[2] + t, x[3] + t, n);
  }
}

template <typename scalar_t, typename acc_t>
inline void store(scalar_t* __restrict__ out, const acc_t* __restrict__ in, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = from_acc<scalar_t>(in[i]);
}

template <typename acc_t, typename scalar_t>
inline void load(acc_t* __restrict__ out, const scalar_t* __restrict__ in, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = to_acc<acc_t>(in[i]);
}

// ---- fp32 runs of up to kOnePassOps ops: every op in one pass ---------------
// For float32 with few ops, one pass over the whole run with all 2K+1 streams
// open beats L1 tiles taken four ops at a time: the hardware prefetchers follow
// uninterrupted streams instead of restarting on every tile and group (measured
// at (64,16,32,32) K=8: backward 1.9 -> 1.7 ms, at torch.compile's single fused
// loop). 8-float GCC vectors: AVX registers where this file is compiled for
// AVX2, pairs of SSE registers otherwise.
constexpr int64_t kOnePassOps = 8;
using f32x8 = float __attribute__((vector_size(32)));
// The same at any float address, aliasing float data.
using f32x8_unaligned = float __attribute__((vector_size(32), aligned(4), may_alias));

// Vectors go by reference: by value they would change the ABI where AVX is
// not enabled.
inline void load8(f32x8& v, const float* p) { v = *reinterpret_cast<const f32x8_unaligned*>(p); }

inline void store8(float* p, const f32x8& v) { *reinterpret_cast<f32x8_unaligned*>(p) = v; }

inline float sum8(const f32x8& v) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

// y[0:n] = sum_k w[k] * in[k][0:n], k = 0..G-1 left to right.
template <int G>
void forward_run_one_pass(const float* const* in, const float* w, int64_t n, float* y) {
  f32x8 wv[G];
  for (int k = 0; k < G; ++k) wv[k] = f32x8{} + w[k];
  const int64_t blocked = n - n % 8;
  for (int64_t i = 0; i < blocked; i += 8) {
    f32x8 acc, x;
    load8(x, in[0] + i);
    acc = wv[0] * x;
#pragma GCC unroll 8
    for (int k = 1; k < G; ++k) {
      load8(x, in[k] + i);
      acc += wv[k] * x;
    }
    store8(y + i, acc);
  }
  for (int64_t i = blocked; i < n; ++i) {
    float acc = w[0] * in[0][i];
    for (int k = 1; k < G; ++k) acc += w[k] * in[k][i];
    y[i] = acc;
  }
}

// grad_in[k][0:n] = w[k] * g[0:n] (kOut) and dots[k] += sum(g * in[k]) (kDot), k < G.
template <int G, bool kOut, bool kDot>
void backward_run_one_pass(const float* g, const float* const* in, const float* w, int64_t n,
                           float* const* grad_in, float* dots) {
  f32x8 wv[G], partial[G];
  for (int k = 0; k < G; ++k) {
    wv[k] = f32x8{} + w[k];
    partial[k] = f32x8{};
  }
  const int64_t blocked = n - n % 8;
  for (int64_t i = 0; i < blocked; i += 8) {
    f32x8 gv, x;
    load8(gv, g + i);
    // All loads before all stores: the streams are often equally aligned
    // (tensors of one size from the allocator), and a load that follows a store
    // to the same address modulo 4 KiB may wait for it (4K aliasing).
    if constexpr (kDot) {
#pragma GCC unroll 8
      for (int k = 0; k < G; ++k) {
        load8(x, in[k] + i);
        partial[k] += gv * x;
      }
    }
    if constexpr (kOut) {
#pragma GCC unroll 8
      for (int k = 0; k < G; ++k) store8(grad_in[k] + i, wv[k] * gv);
    }
  }
  for (int k = 0; k < G; ++k) {
    float dot = kDot ? sum8(partial[k]) : 0.0f;
    for (int64_t i = blocked; i < n; ++i) {
      if constexpr (kOut) grad_in[k][i] = w[k] * g[i];
      if constexpr (kDot) dot += g[i] * in[k][i];
    }
    if constexpr (kDot) dots[k] += dot;
  }
}

// Calls body(std::integral_constant<int, K>) for 1 <= K <= kOnePassOps.
template <typename Body>
void with_op_count(int64_t K, Body&& body) {
  switch (K) {
    case 1: return body(std::integral_constant<int, 1>{});
    case 2: return body(std::integral_constant<int, 2>{});
    case 3: return body(std::integral_constant<int, 3>{});
    case 4: return body(std::integral_constant<int, 4>{});
    case 5: return body(std::integral_constant<int, 5>{});
    case 6: return body(std::integral_constant<int, 6>{});
    case 7: return body(std::integral_constant<int, 7>{});
    default: return body(std::integral_constant<int, 8>{});
  }
}

// y[0:n] = sum_k w[k] * in[k][0:n]; in[k] and y already point at the run.
template <typename scalar_t>
void forward_run(const scalar_t* const* in, int64_t K, const acc_type<scalar_t>* w, int64_t n,
                 scalar_t* y) {
  using acc_t = acc_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (K <= kOnePassOps) {
      return with_op_count(K, [&](auto G) { forward_run_one_pass<G()>(in, w, n, y); });
    }
  }
  acc_t tile[kAccumulatesInPlace<scalar_t> ? 1 : kTile];
  for (int64_t t = 0; t < n; t += kTile) {
    const int64_t m = std::min(kTile, n - t);
    acc_t* acc;
    if constexpr (kAccumulatesInPlace<scalar_t>) {
      acc = y + t;
    } else {
      acc = tile;
    }
    int64_t k = std::min<int64_t>(4, K);
    axpy_ops<true>(acc, w, in, t, static_cast<int>(k), m);
    for (; k < K; k += 4) {
      axpy_ops<false>(acc, w + k, in + k, t, static_cast<int>(std::min<int64_t>(4, K - k)), m);
    }
    if constexpr (!kAccumulatesInPlace<scalar_t>) store(y + t, acc, m);
  }
}

// Independent partial sums per dot product: two 256-bit registers.
template <typename acc_t>
constexpr int kLanes = 64 / sizeof(acc_t);

// For G ops at once, over one tile: out_j[i] = w_j * g[i] (kOut) and
// dots[j] += sum_i g[i] * x_j[i] (kDot), in one pass that reads g once. The
// pointers are restrict *parameters* (GCC ignores restrict on locals): without
// them the alias checks for 9 streams exceed what it versions, and the loop
// stays scalar.
template <bool kOut, bool kDot, int G, typename acc_t, typename scalar_t>
inline void backward_streams(const acc_t* __restrict__ g, const scalar_t* __restrict__ x0,
                             const scalar_t* __restrict__ x1, const scalar_t* __restrict__ x2,
                             const scalar_t* __restrict__ x3, scalar_t* __restrict__ o0,
                             scalar_t* __restrict__ o1, scalar_t* __restrict__ o2,
                             scalar_t* __restrict__ o3, const acc_t* w, int64_t n, acc_t* dots) {
  constexpr int L = kLanes<acc_t>;
  const acc_t w0 = w[0], w1 = G > 1 ? w[1] : 0, w2 = G > 2 ? w[2] : 0, w3 = G > 3 ? w[3] : 0;
  acc_t l0[L] = {}, l1[L] = {}, l2[L] = {}, l3[L] = {};
  const int64_t blocked = n - n % L;
  for (int64_t i = 0; i < blocked; i += L) {
    for (int l = 0; l < L; ++l) {
      const acc_t gi = g[i + l];
      if constexpr (kOut) {
        o0[i + l] = from_acc<scalar_t>(w0 * gi);
        if constexpr (G > 1) o1[i + l] = from_acc<scalar_t>(w1 * gi);
        if constexpr (G > 2) o2[i + l] = from_acc<scalar_t>(w2 * gi);
        if constexpr (G > 3) o3[i + l] = from_acc<scalar_t>(w3 * gi);
      }
      if constexpr (kDot) {
        l0[l] += gi * to_acc<acc_t>(x0[i + l]);
        if constexpr (G > 1) l1[l] += gi * to_acc<acc_t>(x1[i + l]);
        if constexpr (G > 2) l2[l] += gi * to_acc<acc_t>(x2[i + l]);
        if constexpr (G > 3) l3[l] += gi * to_acc<acc_t>(x3[i + l]);
      }
    }
  }
  acc_t s[4] = {};
  for (int l = 0; l < L; ++l) {
    s[0] += l0[l];
    s[1] += l1[l];
    s[2] += l2[l];
    s[3] += l3[l];
  }
  for (int64_t i = blocked; i < n; ++i) {
    const acc_t gi = g[i];
    if constexpr (kOut) {
      o0[i] = from_acc<scalar_t>(w0 * gi);
      if constexpr (G > 1) o1[i] = from_acc<scalar_t>(w1 * gi);
      if constexpr (G > 2) o2[i] = from_acc<scalar_t>(w2 * gi);
      if constexpr (G > 3) o3[i] = from_acc<scalar_t>(w3 * gi);
    }
    if constexpr (kDot) {
      s[0] += gi * to_acc<acc_t>(x0[i]);
      if constexpr (G > 1) s[1] += gi * to_acc<acc_t>(x1[i]);
      if constexpr (G > 2) s[2] += gi * to_acc<acc_t>(x2[i]);
      if constexpr (G > 3) s[3] += gi * to_acc<acc_t>(x3[i]);
    }
  }
  if constexpr (kDot) {
    for (int j = 0; j < G; ++j) dots[j] += s[j];
  }
}

template <bool kOut, bool kDot, int G, typename acc_t, typename scalar_t>
inline void backward_group(const acc_t* g, const acc_t* w, const scalar_t* const* x,
                           scalar_t* const* out, int64_t t, int64_t n, acc_t* dots) {
  auto in = [&](int j) -> const scalar_t* { return kDot && j < G ? x[j] + t : nullptr; };
  auto to = [&](int j) -> scalar_t* { return kOut && j < G ? out[j] + t : nullptr; };
  backward_streams<kOut, kDot, G, acc_t, scalar_t>(g, in(0), in(1), in(2), in(3), to(0), to(1),
                                                   to(2), to(3), w, n, dots);
}

template <bool kOut, bool kDot, typename acc_t, typename scalar_t>
inline void backward_ops(const acc_t* g, const acc_t* w, const scalar_t* const* x,
                         scalar_t* const* out, int64_t t, int64_t n, int G, acc_t* dots) {
  switch (G) {
    case 1:
      return backward_group<kOut, kDot, 1>(g, w, x, out, t, n, dots);
    case 2:
      return backward_group<kOut, kDot, 2>(g, w, x, out, t, n, dots);
    case 3:
      return backward_group<kOut, kDot, 3>(g, w, x, out, t, n, dots);
    default:
      return backward_group<kOut, kDot, 4>(g, w, x, out, t, n, dots);
  }
}

// grad_in[k][0:n] = w[k] * g[0:n] (when grad_in) and dots[k] += sum(g * in[k])
// (when dots), reading each tile of g once for all ops.
template <typename scalar_t>
void backward_run(const scalar_t* g, const scalar_t* const* in, int64_t K,
                  const acc_type<scalar_t>* w, int64_t n, scalar_t* const* grad_in,
                  acc_type<scalar_t>* dots) {
  using acc_t = acc_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (K <= kOnePassOps) {
      return with_op_count(K, [&](auto G) {
        if (grad_in != nullptr && dots != nullptr) {
          backward_run_one_pass<G(), true, true>(g, in, w, n, grad_in, dots);
        } else if (grad_in != nullptr) {
          backward_run_one_pass<G(), true, false>(g, in, w, n, grad_in, dots);
        } else {
          backward_run_one_pass<G(), false, true>(g, in, w, n, grad_in, dots);
        }
      });
    }
  }
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
    for (int64_t k = 0; k < K; k += 4) {
      const int G = static_cast<int>(std::min<int64_t>(4, K - k));
      // backward_group offsets x and out by t itself; gt is already the tile.
      if (grad_in != nullptr && dots != nullptr) {
        backward_ops<true, true>(gt, w + k, in + k, grad_in + k, t, m, G, dots + k);
      } else if (grad_in != nullptr) {
        backward_ops<true, false>(gt, w + k, in + k, grad_in + k, t, m, G, dots);
      } else {
        backward_ops<false, true>(gt, w + k, in + k, grad_in, t, m, G, dots + k);
      }
    }
  }
}

// ---- bands: the rows of one patch row of one (b, c) plane (gw > 1) -----------
// A band is `rows` x W contiguous elements; within a row the weight changes at
// the column starts cols[0..gw]. Per op, the band's weights are painted into a
// W-long column vector once and reused for every row.

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
          for (int64_t j = 0; j < W; ++j) a[j] = wk[j] * to_acc<acc_t>(x[j]);
        } else {
          for (int64_t j = 0; j < W; ++j) a[j] += wk[j] * to_acc<acc_t>(x[j]);
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
          for (int64_t j = 0; j < W; ++j) out[j] = from_acc<scalar_t>(wk[j] * gr[j]);
        }
        if (dots != nullptr) {
          const scalar_t* __restrict__ x = in[k] + off + r * W;
          for (int64_t j = 0; j < W; ++j) cs[j] += gr[j] * to_acc<acc_t>(x[j]);
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


// ---- maps: whole planes under a per-pixel weight map (short runs) ------------
// When a patch row is only a few elements wide, per-run and per-row loop
// overhead dominates the band kernels. Instead, the weights of one sample are
// painted into a K x H*W map once, and every plane of that sample becomes a
// long, branch-free loop y[i] = sum_k map[k][i] * o_k[i] over L1 tiles.

// map[k*HW + h*W + x] = w[p(h, x)*K + k]; w points at the sample's first patch.
template <typename acc_t>
void paint_map(acc_t* map, const acc_t* w, int64_t K, const std::vector<int64_t>& rows,
               const std::vector<int64_t>& cols, int64_t W) {
  const int64_t gh = static_cast<int64_t>(rows.size()) - 1;
  const int64_t gw = static_cast<int64_t>(cols.size()) - 1;
  const int64_t HW = rows[gh] * W;
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t ph = 0; ph < gh; ++ph) {
      for (int64_t h = rows[ph]; h < rows[ph + 1]; ++h) {
        for (int64_t pw = 0; pw < gw; ++pw) {
          std::fill(map + k * HW + h * W + cols[pw], map + k * HW + h * W + cols[pw + 1],
                    w[(ph * gw + pw) * K + k]);
        }
      }
    }
  }
}

// y[0:HW] = sum_k map[k][0:HW] * in[k][0:HW], for one plane.
template <typename scalar_t>
void forward_plane(const scalar_t* const* in, int64_t K, const acc_type<scalar_t>* map,
                   int64_t HW, scalar_t* y, acc_type<scalar_t>* tile) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t t = 0; t < HW; t += kTile) {
    const int64_t m = std::min(kTile, HW - t);
    acc_t* __restrict__ acc;
    if constexpr (kAccumulatesInPlace<scalar_t>) {
      acc = y + t;
    } else {
      acc = tile;
    }
    for (int64_t k = 0; k < K; ++k) {
      const acc_t* __restrict__ wk = map + k * HW + t;
      const scalar_t* __restrict__ x = in[k] + t;
      if (k == 0) {
        for (int64_t j = 0; j < m; ++j) acc[j] = wk[j] * to_acc<acc_t>(x[j]);
      } else {
        for (int64_t j = 0; j < m; ++j) acc[j] += wk[j] * to_acc<acc_t>(x[j]);
      }
    }
    if constexpr (!kAccumulatesInPlace<scalar_t>) store(y + t, acc, m);
  }
}

// out[i] = w[i] * g[i] (kOut) and ps[i] += g[i] * x[i] (kSum) in one pass
// (restrict parameters: see backward_streams).
template <bool kOut, bool kSum, typename acc_t, typename scalar_t>
inline void backward_pixels(const acc_t* __restrict__ g, const acc_t* __restrict__ w,
                            const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                            acc_t* __restrict__ ps, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (kOut) out[i] = from_acc<scalar_t>(w[i] * g[i]);
    if constexpr (kSum) ps[i] += g[i] * to_acc<acc_t>(x[i]);
  }
}

// Backward of one plane: grad_in[k] = map[k] * g (when grad_in) and
// pixsum[k][i] += g[i] * in[k][i] (when pixsum), summed over the item's planes
// and folded into per-patch sums by fold_map.
template <typename scalar_t>
void backward_plane(const scalar_t* g, const scalar_t* const* in, int64_t K,
                    const acc_type<scalar_t>* map, int64_t HW, scalar_t* const* grad_in,
                    acc_type<scalar_t>* pixsum, acc_type<scalar_t>* tile) {
  using acc_t = acc_type<scalar_t>;
  for (int64_t t = 0; t < HW; t += kTile) {
    const int64_t m = std::min(kTile, HW - t);
    const acc_t* __restrict__ gt;
    if constexpr (kAccumulatesInPlace<scalar_t>) {
      gt = g + t;
    } else {
      load(tile, g + t, m);
      gt = tile;
    }
    for (int64_t k = 0; k < K; ++k) {
      const acc_t* wk = map + k * HW + t;
      if (grad_in != nullptr && pixsum != nullptr) {
        backward_pixels<true, true>(gt, wk, in[k] + t, grad_in[k] + t, pixsum + k * HW + t, m);
      } else if (grad_in != nullptr) {
        backward_pixels<true, false>(gt, wk, in[k] + t, grad_in[k] + t, pixsum, m);
      } else {
        backward_pixels<false, true>(gt, wk, in[k] + t, static_cast<scalar_t*>(nullptr), pixsum + k * HW + t, m);
      }
    }
  }
}

// dots[p*K + k] = sum of pixsum[k] over the pixels of patch p, row-major.
template <typename acc_t>
void fold_map(const acc_t* pixsum, int64_t K, const std::vector<int64_t>& rows,
              const std::vector<int64_t>& cols, int64_t W, acc_t* dots) {
  const int64_t gh = static_cast<int64_t>(rows.size()) - 1;
  const int64_t gw = static_cast<int64_t>(cols.size()) - 1;
  const int64_t HW = rows[gh] * W;
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t ph = 0; ph < gh; ++ph) {
      for (int64_t pw = 0; pw < gw; ++pw) {
        acc_t sum = 0;
        for (int64_t h = rows[ph]; h < rows[ph + 1]; ++h) {
          for (int64_t x = cols[pw]; x < cols[pw + 1]; ++x) sum += pixsum[k * HW + h * W + x];
        }
        dots[(ph * gw + pw) * K + k] = sum;
      }
    }
  }
}


// The per-pixel weights of sample b, painted into the thread's scratch once per
// run of items that share one weight row (all items when Bw == 1).
template <typename scalar_t>
const acc_type<scalar_t>* weight_map(MapScratch<scalar_t>& scratch, const Geometry& geo,
                                     const acc_type<scalar_t>* w, int64_t b) {
  const auto& s = geo.s;
  const int64_t bw = s.Bw == 1 ? 0 : b;
  if (scratch.painted != bw) {
    paint_map(scratch.map.data(), w + bw * s.P() * s.K, s.K, geo.rows, geo.cols, s.W);
    scratch.painted = bw;
  }
  return scratch.map.data();
}

// The map path of forward_kernel: item (b, group of planes).
template <typename scalar_t>
void forward_maps(const Geometry& geo, const std::vector<const scalar_t*>& base,
                  const acc_type<scalar_t>* w, scalar_t* out) {
  const auto& s = geo.s;
  const int64_t K = s.K, HW = s.plane();
  at::parallel_for(0, geo.items(), geo.grain(), [&](int64_t begin, int64_t end) {
    std::vector<const scalar_t*> in(K);
    MapScratch<scalar_t> scratch;
    scratch.map.resize(K * HW);
    if (!kAccumulatesInPlace<scalar_t>) scratch.tile.resize(kTile);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / geo.plane_groups, c0 = (item % geo.plane_groups) * geo.planes;
      const acc_type<scalar_t>* map = weight_map(scratch, geo, w, b);
      for (int64_t c = c0; c < std::min(s.C, c0 + geo.planes); ++c) {
        const int64_t offset = (b * s.C + c) * HW;
        for (int64_t k = 0; k < K; ++k) in[k] = base[k] + offset;
        forward_plane(in.data(), K, map, HW, out + offset, scratch.tile.data());
      }
    }
  });
}

// The map path of backward_kernel; item (b, j) fills partial slot (b, j):
// dots[((b * plane_groups + j) * P + p) * K + k].
template <typename scalar_t>
void backward_maps(const Geometry& geo, const scalar_t* g, const std::vector<const scalar_t*>& base,
                   const acc_type<scalar_t>* w, const std::vector<scalar_t*>& grad_base,
                   acc_type<scalar_t>* partial_base) {
  using acc_t = acc_type<scalar_t>;
  const auto& s = geo.s;
  const int64_t K = s.K, HW = s.plane();
  const bool need_outputs = !grad_base.empty();
  const bool need_weights = partial_base != nullptr;
  at::parallel_for(0, geo.items(), geo.grain(), [&](int64_t begin, int64_t end) {
    std::vector<const scalar_t*> in(K);
    std::vector<scalar_t*> grad_in(K);
    MapScratch<scalar_t> scratch;
    scratch.map.resize(K * HW);
    if (!kAccumulatesInPlace<scalar_t>) scratch.tile.resize(kTile);
    if (need_weights) scratch.pixsum.resize(K * HW);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / geo.plane_groups, c0 = (item % geo.plane_groups) * geo.planes;
      const acc_type<scalar_t>* map = weight_map(scratch, geo, w, b);
      if (need_weights) std::fill(scratch.pixsum.begin(), scratch.pixsum.end(), acc_t(0));
      for (int64_t c = c0; c < std::min(s.C, c0 + geo.planes); ++c) {
        const int64_t offset = (b * s.C + c) * HW;
        for (int64_t k = 0; k < K; ++k) {
          in[k] = base[k] + offset;
          if (need_outputs) grad_in[k] = grad_base[k] + offset;
        }
        backward_plane(g + offset, in.data(), K, map, HW,
                       need_outputs ? grad_in.data() : nullptr,
                       need_weights ? scratch.pixsum.data() : nullptr, scratch.tile.data());
      }
      if (need_weights) {
        fold_map(scratch.pixsum.data(), K, geo.rows, geo.cols, s.W,
                 partial_base + item * s.P() * K);
      }
    }
  });
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
  if (geo.map) return forward_maps<scalar_t>(geo, base, w, out);
  at::parallel_for(0, geo.items(), geo.grain(), [&](int64_t begin, int64_t end) {
    std::vector<const scalar_t*> in(K);
    BandScratch<scalar_t> scratch;
    if (!geo.single_patch() && s.gw > 1) {
      scratch.wcol.resize(K * s.W);
      scratch.tile.resize(std::max<int64_t>(1, kTile / s.W) * s.W);
    }
    for (int64_t item = begin; item < end; ++item) {
      const auto [offset, n, weight_row, slot] = geo.span(item);
      const acc_t* wp = w + weight_row * K;
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
  if (geo.map) return backward_maps<scalar_t>(geo, g, base, w, grad_base, partial_base);
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
      const auto [offset, n, weight_row, slot] = geo.span(item);
      const acc_t* wp = w + weight_row * K;
      acc_t* dots = need_weights ? partial_base + slot * K : nullptr;
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
