// 3x3 stride-1 NHWC convolution with a fused epilogue, for the narrow layers (few channels)
// of inference on XLA:CPU, as an XLA FFI custom call (built and registered by
// sqjax/native.py):
//
//   y[n, h, w, k] = act(sum over i, j, c of x[n, h + i - ph, w + j - pw, c] * kernel[i, j, c, k]
//                       + bias[k] + residual[n, h, w, k])
//
// (x outside its bounds is zero; the high pads are implied by y's shape; act: ReLU or none;
// the residual may be empty). Each output row is computed in blocks of kRows pixels x 2
// vectors of outputs, held in registers over all 9 x C products; the bias, the residual
// and the ReLU are applied before the block is stored, so y is written once (XLA reads
// and writes it again for each of them). Rows are split over XLA's intra-op threads.
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
  int64_t n, h, w, c, ho, wo, k, ph, pw;
  bool relu;
};

// y[row, w0 + r, k0 : k0 + L*V] for r < R: the products of the 9 taps, then the epilogue.
// T: a vector of L floats (float: a tail).
template <typename T, int R, int V>
void Block(const Geometry& g, const float* __restrict x, const float* __restrict kernel,
           const float* __restrict bias, const float* __restrict res, const float* zeros,
           int64_t row, int64_t w0, int64_t k0, float* __restrict y) {
  constexpr int L = sizeof(T) / sizeof(float);
  const int64_t n = row / g.ho, oh = row % g.ho;
  T a[R][V] = {};
  // Inside the row (no tap of the R pixels falls into the padding), pixel r's 3 taps of a
  // kernel row read 3 * C consecutive floats from x, and the kernel row's 3 * C x K weights
  // are consecutive too: one loop of 3 * C steps per kernel row (at 16 channels, 9 loops of
  // C steps, each with its own pointers, ran at 74 GFLOP/s against 102, AMD EPYC).
  const bool inside = w0 >= g.pw && w0 + R + 1 - g.pw < g.w;
  for (int64_t i = 0; i < 3; ++i) {
    const int64_t ih = oh + i - g.ph;
    if (ih < 0 || ih >= g.h) continue;
    const float* line = x + (n * g.h + ih) * g.w * g.c;
    for (int64_t j = 0; j < (inside ? 1 : 3); ++j) {
      const float* p[R];
      for (int r = 0; r < R; ++r) {
        const int64_t iw = w0 + r + j - g.pw;
        p[r] = iw >= 0 && iw < g.w ? line + iw * g.c : zeros;
      }
      const float* tap = kernel + (i * 3 + j) * g.c * g.k + k0;
      const int64_t steps = inside ? 3 * g.c : g.c;
      for (int64_t c = 0; c < steps; ++c) {
        T b[V];
        for (int q = 0; q < V; ++q) std::memcpy(&b[q], tap + c * g.k + L * q, sizeof(T));
        for (int r = 0; r < R; ++r) {
          const float s = p[r][c];
          for (int q = 0; q < V; ++q) a[r][q] += s * b[q];
        }
      }
    }
  }
  const int64_t at = (row * g.wo + w0) * g.k + k0;
  for (int r = 0; r < R; ++r)
    for (int q = 0; q < V; ++q) {
      T t;
      std::memcpy(&t, bias + k0 + L * q, sizeof(T));
      a[r][q] += t;
      if (res) {
        std::memcpy(&t, res + at + r * g.k + L * q, sizeof(T));
        a[r][q] += t;
      }
      if (g.relu) a[r][q] = a[r][q] > 0 ? a[r][q] : 0;  // elementwise on vectors
      std::memcpy(y + at + r * g.k + L * q, &a[r][q], sizeof(T));
    }
}

// All K outputs of R pixels, in blocks of 2 vectors, 1 vector, 8 and 4 floats (where
// narrower than a vector) and single floats.
template <int R>
void Outputs(const Geometry& g, const float* x, const float* kernel, const float* bias,
             const float* res, const float* zeros, int64_t row, int64_t w0, float* y) {
  constexpr int64_t L = sizeof(vec) / sizeof(float);
  int64_t k = 0;
  for (; k + 2 * L <= g.k; k += 2 * L)
    Block<vec, R, 2>(g, x, kernel, bias, res, zeros, row, w0, k, y);
  for (; k + L <= g.k; k += L) Block<vec, R, 1>(g, x, kernel, bias, res, zeros, row, w0, k, y);
  if (L > 8)
    for (; k + 8 <= g.k; k += 8) Block<v8, R, 1>(g, x, kernel, bias, res, zeros, row, w0, k, y);
  if (L > 4)
    for (; k + 4 <= g.k; k += 4) Block<v4, R, 1>(g, x, kernel, bias, res, zeros, row, w0, k, y);
  for (; k < g.k; ++k) Block<float, R, 1>(g, x, kernel, bias, res, zeros, row, w0, k, y);
}

// The last n < kRows pixels of a row.
template <int R = kRows - 1>
void Tail(int64_t n, const Geometry& g, const float* x, const float* kernel, const float* bias,
          const float* res, const float* zeros, int64_t row, int64_t w0, float* y) {
  if constexpr (R > 0) {
    if (n == R) return Outputs<R>(g, x, kernel, bias, res, zeros, row, w0, y);
    Tail<R - 1>(n, g, x, kernel, bias, res, zeros, row, w0, y);
  }
}

ffi::Error Direct(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> kernel,
                  ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> residual,
                  ffi::ResultBuffer<ffi::F32> y, int64_t ph, int64_t pw, bool relu) {
  const auto xd = x.dimensions(), kd = kernel.dimensions(), yd = y->dimensions();
  const bool has_res = residual.element_count() != 0;
  if (xd.size() != 4 || kd.size() != 4 || yd.size() != 4 || kd[0] != 3 || kd[1] != 3 ||
      kd[2] != xd[3] || yd[3] != kd[3] || yd[0] != xd[0] ||
      bias.element_count() != static_cast<size_t>(kd[3]) ||
      (has_res && residual.element_count() != y->element_count()) || ph < 0 || pw < 0)
    return ffi::Error::InvalidArgument(
        "sqjax_conv3x3_direct: expected NHWC x, HWIO 3x3 kernel, bias (K,), residual like y "
        "or empty, NHWC y, pads >= 0");
  const Geometry g{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], yd[3], ph, pw, relu};
  const int64_t rows = g.n * g.ho;
  if (rows == 0 || g.wo == 0) return ffi::Error::Success();
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  const int64_t chunk = std::max<int64_t>(1, rows / (8 * threads));  // rows per claim
  const int64_t units = (rows + chunk - 1) / chunk;
  const float* xs = x.typed_data();
  const float* ks = kernel.typed_data();
  const float* bs = bias.typed_data();
  const float* rs = has_res ? residual.typed_data() : nullptr;
  float* ys = y->typed_data();
  ParallelFor(pool, units, [g, xs, ks, bs, rs, ys, rows, chunk] {  // rows, a few per unit
    return [g, xs, ks, bs, rs, ys, rows, chunk, zeros = std::vector<float>(g.c)](int64_t u) {
      for (int64_t row = u * chunk; row < std::min(rows, (u + 1) * chunk); ++row) {
        int64_t w0 = 0;
        for (; w0 + kRows <= g.wo; w0 += kRows)
          Outputs<kRows>(g, xs, ks, bs, rs, zeros.data(), row, w0, ys);
        Tail(g.wo - w0, g, xs, ks, bs, rs, zeros.data(), row, w0, ys);
      }
    };
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SqjaxConv3x3Direct, Direct,
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
