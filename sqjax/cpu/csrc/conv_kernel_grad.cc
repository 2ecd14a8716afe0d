// Kernel gradient of an NHWC convolution for XLA:CPU, as an XLA FFI custom call
// (built and registered by sqjax/native.py).
//
//   dw[kh, kw, c, o] = sum over n, h, w of x[n, h*sh + kh - ph, w*sw + kw - pw, c] * dy[n, h, w, o]
//
// (x outside its bounds is zero). XLA:CPU lowers this gradient to a convolution whose
// operands it first transposes to channel-major layouts; here it is a sum of outer
// products read straight from the NHWC arrays, register-blocked over channels, with the
// output rows split over XLA's intra-op threads (one partial sum per part).
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
  int64_t n, hi, wi, c, ho, wo, o, kh, kw, sh, sw, ph, pw;
};

// acc[r, :L*V] += x[., c0 + r] * dy[., o0 : o0 + L*V] summed over the output pixels of rows
// [row0, row1) (row = n * ho + h) whose input pixel at kernel offset (i, j) is in bounds;
// R channels and L*V outputs held in registers across all those rows. T: a vector of L
// floats (float: a scalar tail).
template <typename T, int R, int V>
void Tile(const Geometry& g, const float* x, const float* dy, int64_t row0, int64_t row1,
          int64_t i, int64_t j, int64_t c0, int64_t o0, float* acc) {
  constexpr int L = sizeof(T) / sizeof(float);
  // Output columns w whose input column w*sw + j - pw lies in [0, wi).
  const int64_t lo = g.pw - j, hi = g.wi - 1 + g.pw - j;
  if (hi < 0) return;
  const int64_t w0 = lo > 0 ? (lo + g.sw - 1) / g.sw : 0, w1 = std::min(g.wo, hi / g.sw + 1);
  if (w1 <= w0) return;
  const int64_t xs = g.sw * g.c;
  T a[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) std::memcpy(&a[r][v], acc + r * g.o + L * v, sizeof(T));
  for (int64_t row = row0; row < row1; ++row) {
    const int64_t n = row / g.ho, ih = (row % g.ho) * g.sh + i - g.ph;
    if (ih < 0 || ih >= g.hi) continue;
    const float* xp = x + ((n * g.hi + ih) * g.wi + w0 * g.sw + j - g.pw) * g.c + c0;
    const float* dp = dy + (row * g.wo + w0) * g.o + o0;
    for (int64_t p = 0; p < w1 - w0; ++p) {
      T d[V];
      for (int v = 0; v < V; ++v) std::memcpy(&d[v], dp + p * g.o + L * v, sizeof(T));
      for (int r = 0; r < R; ++r) {
        const float s = xp[p * xs + r];
        for (int v = 0; v < V; ++v) a[r][v] += s * d[v];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) std::memcpy(acc + r * g.o + L * v, &a[r][v], sizeof(T));
}

// All O outputs for R channels from c0, in blocks of 2 vectors, 1 vector, 8 and 4 floats
// (where narrower than a vector) and single floats.
template <int R>
void Outputs(const Geometry& g, const float* x, const float* dy, int64_t row0, int64_t row1,
             int64_t i, int64_t j, int64_t c0, float* acc) {
  constexpr int64_t L = sizeof(vec) / sizeof(float);
  int64_t o = 0;
  for (; o + 2 * L <= g.o; o += 2 * L)
    Tile<vec, R, 2>(g, x, dy, row0, row1, i, j, c0, o, acc + o);
  for (; o + L <= g.o; o += L) Tile<vec, R, 1>(g, x, dy, row0, row1, i, j, c0, o, acc + o);
  if (L > 8)
    for (; o + 8 <= g.o; o += 8) Tile<v8, R, 1>(g, x, dy, row0, row1, i, j, c0, o, acc + o);
  for (; o + 4 <= g.o; o += 4) Tile<v4, R, 1>(g, x, dy, row0, row1, i, j, c0, o, acc + o);
  for (; o < g.o; ++o) Tile<float, R, 1>(g, x, dy, row0, row1, i, j, c0, o, acc + o);
}

// The last n < kRows channels, from c0.
template <int R = kRows - 1>
void Tail(const Geometry& g, const float* x, const float* dy, int64_t row0, int64_t row1,
          int64_t i, int64_t j, int64_t c0, int64_t n, float* acc) {
  if constexpr (R > 0) {
    if (n == R) return Outputs<R>(g, x, dy, row0, row1, i, j, c0, acc);
    Tail<R - 1>(g, x, dy, row0, row1, i, j, c0, n, acc);
  }
}

// Adds the contributions of output rows [row0, row1) to acc, in groups of rows (about
// 512 KB of inputs and output gradients, so they stay in L2) that every kernel offset,
// channel block and output block reads in turn: each group sweeps all of acc once (2.4 MB
// at 256 x 256 channels), not each row. Measured on single layers (bench_kernel_grad.py):
// 256 channels 1.2x faster than one row per group, the others within noise.
void Rows(const Geometry& g, const float* x, const float* dy, int64_t row0, int64_t row1,
          float* acc) {
  const int64_t row_bytes = 4 * (g.kh * g.wi * g.c / g.sh + g.wo * g.o);
  const int64_t group = std::max<int64_t>(1, (512 << 10) / std::max<int64_t>(row_bytes, 1));
  for (int64_t r0 = row0; r0 < row1; r0 += group) {
    const int64_t r1 = std::min(row1, r0 + group);
    for (int64_t i = 0; i < g.kh; ++i)
      for (int64_t j = 0; j < g.kw; ++j) {
        float* a = acc + (i * g.kw + j) * g.c * g.o;
        int64_t c = 0;
        for (; c + kRows <= g.c; c += kRows)
          Outputs<kRows>(g, x, dy, r0, r1, i, j, c, a + c * g.o);
        if (c < g.c) Tail(g, x, dy, r0, r1, i, j, c, g.c - c, a + c * g.o);
      }
  }
}

ffi::Error KernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dw, int64_t sh, int64_t sw, int64_t ph,
                      int64_t pw) {
  const auto xd = x.dimensions(), dd = dy.dimensions(), wd = dw->dimensions();
  if (xd.size() != 4 || dd.size() != 4 || wd.size() != 4 || xd[0] != dd[0] || wd[2] != xd[3] ||
      wd[3] != dd[3] || sh < 1 || sw < 1)
    return ffi::Error::InvalidArgument("sqjax_conv_kernel_grad: expected NHWC x, dy, HWIO dw");
  const Geometry g{xd[0], xd[1], xd[2], xd[3], dd[1], dd[2], dd[3], wd[0], wd[1], sh, sw, ph, pw};
  const int64_t size = g.kh * g.kw * g.c * g.o, rows = g.n * g.ho;
  float* out = dw->typed_data();
  std::memset(out, 0, sizeof(float) * size);
  // About 2 MFLOP per part at least: smaller kernels are not worth a second thread.
  const int64_t work = 2 * size * g.wo;  // per output row
  const int parts = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>({std::max<int64_t>(pool.num_threads(), 1), rows,
                            rows * work / (2 << 20)})));
  // Part 0 sums into dw, parts 1.. into their own buffers, added to dw in order at the end.
  std::vector<std::vector<float>> partial(parts - 1, std::vector<float>(size));
  const float* xs = x.typed_data();
  const float* ds = dy.typed_data();
  ParallelFor(pool, parts, [&partial, g, xs, ds, rows, parts, out] {
    return [&partial, g, xs, ds, rows, parts, out](int64_t p) {
      float* acc = p == 0 ? out : partial[p - 1].data();
      Rows(g, xs, ds, rows * p / parts, rows * (p + 1) / parts, acc);
    };
  });
  for (const auto& part : partial)
    for (int64_t k = 0; k < size; ++k) out[k] += part[k];
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SqjaxConvKernelGrad, KernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride_h")
                                  .Attr<int64_t>("stride_w")
                                  .Attr<int64_t>("pad_h")
                                  .Attr<int64_t>("pad_w"));
