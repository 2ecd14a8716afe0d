// 3x3 stride-1 NHWC convolution (the forward pass) for XLA:CPU by Winograd's F(2x2, 3x3) or
// F(4x4, 3x3), as an XLA FFI custom call (built and registered by sqjax/native.py).
//
//   y[n, h, w, k] = sum over i, j, c of x[n, h + i - ph, w + j - pw, c] * kernel[i, j, c, k]
//
// (x outside its bounds is zero; the high pads are implied by y's shape).
//
// Each M x M block of outputs (a tile; M = 2 or 4) is computed from the (M + 2)^2 input
// patch around it as A^T [(G g G^T) . (B^T d B)] A: 16 products per channel pair for 4
// outputs instead of 36 (M = 2), 36 for 16 outputs instead of 144 (M = 4; Lavin & Gray's
// matrices, with rounding errors about 10x F(2x2)'s). The operand ``u`` is the kernel
// already transformed (G g G^T, E x C x K with E = (M + 2)^2 positions, computed by the
// caller; E gives M). Tiles are taken in blocks along a row, small enough to stay in L2:
// their transformed inputs (E x tiles x C), E matrix products with u (register-blocked),
// and the output transform, written straight to y. Blocks are split over XLA's intra-op threads. An
// epilogue (inference, with BatchNorm folded into the kernel) is applied as y is written:
// y = act(conv + bias[k] + residual) with act ReLU or none and the residual optional.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "vectors.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t n, h, w, c, ho, wo, k, ph, pw, th, tw, block;
  bool relu;
};

// B^T d (M = 2: 4 x 4 B^T; M = 4: 6 x 6) of one column d of an input patch, at stride 1.
// T: a vector of channels (or one float, for the tail).
template <int M, typename T>
inline void InputRows(const T* d, T* m) {
  if constexpr (M == 2) {
    m[0] = d[0] - d[2];
    m[1] = d[1] + d[2];
    m[2] = d[2] - d[1];
    m[3] = d[1] - d[3];
  } else {
    m[0] = 4.0f * d[0] - 5.0f * d[2] + d[4];
    m[1] = d[3] + d[4] - 4.0f * (d[1] + d[2]);
    m[2] = d[4] - d[3] + 4.0f * (d[1] - d[2]);
    m[3] = d[4] - d[2] + 2.0f * (d[3] - d[1]);
    m[4] = d[4] - d[2] + 2.0f * (d[1] - d[3]);
    m[5] = 4.0f * d[1] - 5.0f * d[3] + d[5];
  }
}

// A^T m (M x (M + 2)) of one column m of the products.
template <int M, typename T>
inline void OutputRows(const T* m, T* o) {
  if constexpr (M == 2) {
    o[0] = m[0] + m[1] + m[2];
    o[1] = m[1] - m[2] - m[3];
  } else {
    const T a = m[1] + m[2], b = m[1] - m[2], c = m[3] + m[4], d = m[3] - m[4];
    o[0] = m[0] + a + c;
    o[1] = b + 2.0f * d;
    o[2] = a + 4.0f * c;
    o[3] = b + 8.0f * d + m[5];
  }
}

// Floats between the 16 positions' rows of tiles x channels: 64 bytes more than the rows
// hold, so that 16 streams at a multiple of 4 KB apart (e.g. 16 tiles x 64 channels) do not
// fall into the same cache sets (that ran 64 channels 2-3x slower).
inline int64_t Lead(int64_t tiles, int64_t channels) { return tiles * channels + 16; }

// B^T d B of one patch (p: its (M + 2)^2 input pixels) for the channels [c, c + |T|),
// stored at out[e * stride + c] for each position e.
template <int M, typename T>
inline void InputPatch(const float* const (&p)[M + 2][M + 2], int64_t c, int64_t stride,
                       float* __restrict out) {
  constexpr int A = M + 2;
  T m[A][A], col[A], row[A];
  for (int s = 0; s < A; ++s) {  // B^T d, column by column
    for (int r = 0; r < A; ++r) std::memcpy(&col[r], p[r][s] + c, sizeof(T));
    InputRows<M>(col, row);
    for (int r = 0; r < A; ++r) m[r][s] = row[r];
  }
  for (int r = 0; r < A; ++r) {  // (B^T d) B, row by row
    InputRows<M>(m[r], row);
    for (int s = 0; s < A; ++s) std::memcpy(out + (A * r + s) * stride + c, &row[s], sizeof(T));
  }
}

// The E transformed inputs B^T d B of tiles [t0, t0 + tiles) (tile t: example
// t / (th * tw), tile row t / tw % th, column t % tw): v[e][t][c], t counted from t0.
template <int M>
void InputTransform(const Geometry& g, const float* __restrict x, const float* zeros,
                    int64_t t0, int64_t tiles, float* __restrict v) {
  constexpr int A = M + 2;
  const int64_t stride = Lead(tiles, g.c);
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t n = (t0 + t) / (g.th * g.tw), ti = (t0 + t) / g.tw % g.th, tj = (t0 + t) % g.tw;
    const float* p[A][A];
    for (int r = 0; r < A; ++r) {
      const int64_t ih = M * ti + r - g.ph;
      for (int s = 0; s < A; ++s) {
        const int64_t iw = M * tj + s - g.pw;
        const bool in = ih >= 0 && ih < g.h && iw >= 0 && iw < g.w;
        p[r][s] = in ? x + ((n * g.h + ih) * g.w + iw) * g.c : zeros;
      }
    }
    float* out = v + t * g.c;
    constexpr int64_t L = sizeof(vec) / sizeof(float);
    int64_t c = 0;
    for (; c + L <= g.c; c += L) InputPatch<M, vec>(p, c, stride, out);
    for (; c < g.c; ++c) InputPatch<M, float>(p, c, stride, out);
  }
}

// prod[t0 + r, k0 : k0 + L*V] = v[t0 + r, :] @ u[:, k0 : k0 + L*V] for R tiles, the
// outputs held in registers over all C channels. T: a vector of L floats (float: a tail).
template <typename T, int R, int V>
void Product(int64_t c_n, int64_t k_n, const float* __restrict v, const float* __restrict u,
             int64_t k0, float* __restrict prod) {
  constexpr int L = sizeof(T) / sizeof(float);
  T a[R][V] = {};
  for (int64_t c = 0; c < c_n; ++c) {
    T b[V];
    for (int q = 0; q < V; ++q) std::memcpy(&b[q], u + c * k_n + k0 + L * q, sizeof(T));
    for (int r = 0; r < R; ++r) {
      const float s = v[r * c_n + c];
      for (int q = 0; q < V; ++q) a[r][q] += s * b[q];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < V; ++q) std::memcpy(prod + r * k_n + k0 + L * q, &a[r][q], sizeof(T));
}

// All K outputs of R tiles, in blocks of 2 vectors, 1 vector, 8 and 4 floats (where
// narrower than a vector) and single floats.
template <int R>
void Outputs(int64_t c_n, int64_t k_n, const float* v, const float* u, float* prod) {
  constexpr int64_t L = sizeof(vec) / sizeof(float);
  int64_t k = 0;
  for (; k + 2 * L <= k_n; k += 2 * L) Product<vec, R, 2>(c_n, k_n, v, u, k, prod);
  for (; k + L <= k_n; k += L) Product<vec, R, 1>(c_n, k_n, v, u, k, prod);
  if (L > 8)
    for (; k + 8 <= k_n; k += 8) Product<v8, R, 1>(c_n, k_n, v, u, k, prod);
  if (L > 4)
    for (; k + 4 <= k_n; k += 4) Product<v4, R, 1>(c_n, k_n, v, u, k, prod);
  for (; k < k_n; ++k) Product<float, R, 1>(c_n, k_n, v, u, k, prod);
}

// The last n < kRows tiles.
template <int R = kRows - 1>
void Tail(int64_t n, int64_t c_n, int64_t k_n, const float* v, const float* u, float* prod) {
  if constexpr (R > 0) {
    if (n == R) return Outputs<R>(c_n, k_n, v, u, prod);
    Tail<R - 1>(n, c_n, k_n, v, u, prod);
  }
}

// prod[e] = v[e] @ u[e] for the E transformed positions e, kRows tiles at a time.
void Products(const Geometry& g, int E, int64_t tiles, const float* v, const float* u,
              float* prod) {
  for (int e = 0; e < E; ++e) {
    const float* ve = v + e * Lead(tiles, g.c);
    const float* ue = u + e * g.c * g.k;
    float* pe = prod + e * Lead(tiles, g.k);
    int64_t t = 0;
    for (; t + kRows <= tiles; t += kRows)
      Outputs<kRows>(g.c, g.k, ve + t * g.c, ue, pe + t * g.k);
    Tail(tiles - t, g.c, g.k, ve + t * g.c, ue, pe + t * g.k);
  }
}

// A^T m A of one tile for the outputs [k, k + |T|) (m: its products, position e at
// m[e * stride]), plus the bias and the residual (if any), through the ReLU (if relu),
// stored where it lies inside y (rows x cols of the M x M block at y + at).
template <int M, typename T>
inline void OutputPatch(const Geometry& g, const float* m, int64_t stride, const float* bias,
                        const float* res, int64_t at, int rows, int cols, int64_t k,
                        float* __restrict y) {
  constexpr int A = M + 2;
  T s[M][A], col[A], out[M], o[M][M], b;
  for (int q = 0; q < A; ++q) {  // A^T m, column by column
    for (int r = 0; r < A; ++r) std::memcpy(&col[r], m + (A * r + q) * stride + k, sizeof(T));
    OutputRows<M>(col, out);
    for (int r = 0; r < M; ++r) s[r][q] = out[r];
  }
  for (int r = 0; r < M; ++r) OutputRows<M>(s[r], o[r]);  // (A^T m) A
  std::memcpy(&b, bias + k, sizeof(T));
  for (int r = 0; r < rows; ++r)
    for (int q = 0; q < cols; ++q) {
      const int64_t i = at + (r * g.wo + q) * g.k + k;
      T v = o[r][q] + b;
      if (res) {
        T add;
        std::memcpy(&add, res + i, sizeof(T));
        v += add;
      }
      if (g.relu) v = v > 0 ? v : 0;  // elementwise on vectors
      std::memcpy(y + i, &v, sizeof(T));
    }
}

// y's M x M blocks A^T m A of the tiles, where they lie inside y, plus the bias and the
// residual (if any), through the ReLU (if relu).
template <int M>
void OutputTransform(const Geometry& g, const float* __restrict prod, const float* __restrict bias,
                     const float* __restrict res, int64_t t0, int64_t tiles,
                     float* __restrict y) {
  const int64_t stride = Lead(tiles, g.k);
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t n = (t0 + t) / (g.th * g.tw), oh = M * ((t0 + t) / g.tw % g.th);
    const int64_t ow = M * ((t0 + t) % g.tw);
    const int rows = static_cast<int>(std::min<int64_t>(M, g.ho - oh));
    const int cols = static_cast<int>(std::min<int64_t>(M, g.wo - ow));
    const int64_t at = ((n * g.ho + oh) * g.wo + ow) * g.k;
    const float* m = prod + t * g.k;
    constexpr int64_t L = sizeof(vec) / sizeof(float);
    int64_t k = 0;
    for (; k + L <= g.k; k += L)
      OutputPatch<M, vec>(g, m, stride, bias, res, at, rows, cols, k, y);
    for (; k < g.k; ++k) OutputPatch<M, float>(g, m, stride, bias, res, at, rows, cols, k, y);
  }
}

ffi::Error Winograd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> u,
                    ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> residual,
                    ffi::ResultBuffer<ffi::F32> y, int64_t ph, int64_t pw, bool relu) {
  const auto xd = x.dimensions(), ud = u.dimensions(), yd = y->dimensions();
  const bool has_res = residual.element_count() != 0;
  if (xd.size() != 4 || ud.size() != 3 || yd.size() != 4 || (ud[0] != 16 && ud[0] != 36) ||
      ud[1] != xd[3] || yd[3] != ud[2] || yd[0] != xd[0] ||
      bias.element_count() != static_cast<size_t>(ud[2]) ||
      (has_res && residual.element_count() != y->element_count()) || ph < 0 || pw < 0)
    return ffi::Error::InvalidArgument(
        "sqjax_conv3x3_winograd: expected NHWC x, u (16 or 36, C, K), bias (K,), residual like y "
        "or empty, NHWC y, pads >= 0");
  const int e = static_cast<int>(ud[0]), m = e == 16 ? 2 : 4;
  Geometry g{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], yd[3], ph, pw, 0, 0, 0, relu};
  g.th = (g.ho + m - 1) / m;
  g.tw = (g.wo + m - 1) / m;
  const int64_t total = g.n * g.th * g.tw;
  if (total == 0) return ffi::Error::Success();
  // Tiles per block: their transformed inputs and products (E positions each) in about
  // 1.5 MB, so they stay in L2 between the transforms and the products; at least two
  // blocks per thread.
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  const int64_t fit = (3 << 19) / (4 * e * (g.c + g.k));
  g.block = std::max<int64_t>(8, std::min(fit, (total + 2 * threads - 1) / (2 * threads)));
  const int64_t units = (total + g.block - 1) / g.block;
  const float* xs = x.typed_data();
  const float* us = u.typed_data();
  const float* bs = bias.typed_data();
  const float* rs = has_res ? residual.typed_data() : nullptr;
  float* ys = y->typed_data();
  ParallelFor(pool, units, [g, e, m, xs, us, bs, rs, ys, total] {  // blocks of tiles
    std::vector<float> zeros(g.c), v(e * Lead(g.block, g.c)), prod(e * Lead(g.block, g.k));
    return [=, zeros = std::move(zeros), v = std::move(v), prod = std::move(prod)](
               int64_t b) mutable {
      const int64_t t0 = b * g.block, tiles = std::min(g.block, total - t0);
      if (m == 2)
        InputTransform<2>(g, xs, zeros.data(), t0, tiles, v.data());
      else
        InputTransform<4>(g, xs, zeros.data(), t0, tiles, v.data());
      Products(g, e, tiles, v.data(), us, prod.data());
      if (m == 2)
        OutputTransform<2>(g, prod.data(), bs, rs, t0, tiles, ys);
      else
        OutputTransform<4>(g, prod.data(), bs, rs, t0, tiles, ys);
    };
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SqjaxConv3x3Winograd, Winograd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("pad_h")
                                  .Attr<int64_t>("pad_w")
                                  .Attr<bool>("relu"));
