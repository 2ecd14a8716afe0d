// 3x3 stride-1 NHWC convolution (the forward pass) for XLA:CPU by Winograd's F(2x2, 3x3),
// as an XLA FFI custom call (built and registered by sqjax/native.py).
//
//   y[n, h, w, k] = sum over i, j, c of x[n, h + i - ph, w + j - pw, c] * kernel[i, j, c, k]
//
// (x outside its bounds is zero; the high pads are implied by y's shape).
//
// Each 2x2 block of outputs (a tile) is computed from the 4x4 input patch around it as
// A^T [(G g G^T) . (B^T d B)] A: 16 products per channel pair instead of 36. The operand
// ``u`` is the kernel already transformed (G g G^T, 16 x C x K, computed by the caller).
// Tiles are taken in blocks along a row, small enough to stay in L2: their transformed
// inputs (16 x tiles x C), 16 matrix products with u (register-blocked), and the output
// transform, written straight to y. Blocks are split over XLA's intra-op threads.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "vectors.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t n, h, w, c, ho, wo, k, ph, pw, th, tw, block;
};

// Floats between the 16 positions' rows of tiles x channels: 64 bytes more than the rows
// hold, so that 16 streams at a multiple of 4 KB apart (e.g. 16 tiles x 64 channels) do not
// fall into the same cache sets (that ran 64 channels 2-3x slower).
inline int64_t Lead(int64_t tiles, int64_t channels) { return tiles * channels + 16; }

// The 16 transformed inputs B^T d B of tiles [t0, t0 + tiles) (tile t: example
// t / (th * tw), tile row t / tw % th, column t % tw): v[e][t][c], t counted from t0.
void InputTransform(const Geometry& g, const float* __restrict x, const float* zeros,
                    int64_t t0, int64_t tiles, float* __restrict v) {
  const int64_t stride = Lead(tiles, g.c);
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t n = (t0 + t) / (g.th * g.tw), ti = (t0 + t) / g.tw % g.th, tj = (t0 + t) % g.tw;
    const float* p[4][4];
    for (int r = 0; r < 4; ++r) {
      const int64_t ih = 2 * ti + r - g.ph;
      for (int s = 0; s < 4; ++s) {
        const int64_t iw = 2 * tj + s - g.pw;
        const bool in = ih >= 0 && ih < g.h && iw >= 0 && iw < g.w;
        p[r][s] = in ? x + ((n * g.h + ih) * g.w + iw) * g.c : zeros;
      }
    }
    float* out = v + t * g.c;
    for (int64_t c = 0; c < g.c; ++c) {
      float d[4][4], m[4][4];
      for (int r = 0; r < 4; ++r)
        for (int s = 0; s < 4; ++s) d[r][s] = p[r][s][c];
      for (int s = 0; s < 4; ++s) {  // B^T d
        m[0][s] = d[0][s] - d[2][s];
        m[1][s] = d[1][s] + d[2][s];
        m[2][s] = d[2][s] - d[1][s];
        m[3][s] = d[1][s] - d[3][s];
      }
      for (int r = 0; r < 4; ++r) {  // (B^T d) B
        out[(4 * r + 0) * stride + c] = m[r][0] - m[r][2];
        out[(4 * r + 1) * stride + c] = m[r][1] + m[r][2];
        out[(4 * r + 2) * stride + c] = m[r][2] - m[r][1];
        out[(4 * r + 3) * stride + c] = m[r][1] - m[r][3];
      }
    }
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

// prod[e] = v[e] @ u[e] for the 16 transformed positions e, kRows tiles at a time.
void Products(const Geometry& g, int64_t tiles, const float* v, const float* u, float* prod) {
  for (int e = 0; e < 16; ++e) {
    const float* ve = v + e * Lead(tiles, g.c);
    const float* ue = u + e * g.c * g.k;
    float* pe = prod + e * Lead(tiles, g.k);
    int64_t t = 0;
    for (; t + kRows <= tiles; t += kRows)
      Outputs<kRows>(g.c, g.k, ve + t * g.c, ue, pe + t * g.k);
    Tail(tiles - t, g.c, g.k, ve + t * g.c, ue, pe + t * g.k);
  }
}

// y's 2x2 blocks A^T m A of the tiles, where they lie inside y.
void OutputTransform(const Geometry& g, const float* __restrict prod, int64_t t0,
                     int64_t tiles, float* __restrict y) {
  const int64_t stride = Lead(tiles, g.k);
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t n = (t0 + t) / (g.th * g.tw), oh = 2 * ((t0 + t) / g.tw % g.th);
    const int64_t ow = 2 * ((t0 + t) % g.tw);
    const bool down = oh + 1 < g.ho, right = ow + 1 < g.wo;
    float* y00 = y + ((n * g.ho + oh) * g.wo + ow) * g.k;
    float* y10 = y00 + g.wo * g.k;
    const float* m = prod + t * g.k;
    for (int64_t k = 0; k < g.k; ++k) {
      float s[2][4];
      for (int q = 0; q < 4; ++q) {  // A^T m
        const float m0 = m[(0 + q) * stride + k], m1 = m[(4 + q) * stride + k];
        const float m2 = m[(8 + q) * stride + k], m3 = m[(12 + q) * stride + k];
        s[0][q] = m0 + m1 + m2;
        s[1][q] = m1 - m2 - m3;
      }
      y00[k] = s[0][0] + s[0][1] + s[0][2];
      if (right) y00[g.k + k] = s[0][1] - s[0][2] - s[0][3];
      if (down) {
        y10[k] = s[1][0] + s[1][1] + s[1][2];
        if (right) y10[g.k + k] = s[1][1] - s[1][2] - s[1][3];
      }
    }
  }
}

// Blocks are claimed one at a time by the calling thread and the pool's threads; the
// caller works too and waits only for blocks already started.
struct Job {
  std::atomic<int64_t> next{0}, done{0};
};

ffi::Error Winograd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> u,
                    ffi::ResultBuffer<ffi::F32> y, int64_t ph, int64_t pw) {
  const auto xd = x.dimensions(), ud = u.dimensions(), yd = y->dimensions();
  if (xd.size() != 4 || ud.size() != 3 || yd.size() != 4 || ud[0] != 16 || ud[1] != xd[3] ||
      yd[3] != ud[2] || yd[0] != xd[0] || ph < 0 || pw < 0)
    return ffi::Error::InvalidArgument(
        "sqjax_conv3x3_winograd: expected NHWC x, u (16, C, K), NHWC y, pads >= 0");
  Geometry g{xd[0], xd[1], xd[2], xd[3], yd[1], yd[2], yd[3], ph, pw, 0, 0, 0};
  g.th = (g.ho + 1) / 2;
  g.tw = (g.wo + 1) / 2;
  const int64_t total = g.n * g.th * g.tw;
  if (total == 0) return ffi::Error::Success();
  // Tiles per block: their transformed inputs and products (16 positions each) in about
  // 1.5 MB, so they stay in L2 between the transforms and the products; at least two
  // blocks per thread.
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 1);
  const int64_t fit = (3 << 19) / (64 * (g.c + g.k));
  g.block = std::max<int64_t>(8, std::min(fit, (total + 2 * threads - 1) / (2 * threads)));
  const int64_t units = (total + g.block - 1) / g.block;
  const float* xs = x.typed_data();
  const float* us = u.typed_data();
  float* ys = y->typed_data();
  auto job = std::make_shared<Job>();
  auto work = [job, g, xs, us, ys, total, units] {
    std::vector<float> zeros(g.c), v(16 * Lead(g.block, g.c)), prod(16 * Lead(g.block, g.k));
    for (int64_t b; (b = job->next.fetch_add(1)) < units;) {
      const int64_t t0 = b * g.block, tiles = std::min(g.block, total - t0);
      InputTransform(g, xs, zeros.data(), t0, tiles, v.data());
      Products(g, tiles, v.data(), us, prod.data());
      OutputTransform(g, prod.data(), t0, tiles, ys);
      job->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int helpers = static_cast<int>(std::min<int64_t>(threads - 1, units - 1));
  for (int i = 0; i < helpers; ++i) pool.Schedule([work] { work(); });
  work();
  while (job->done.load(std::memory_order_acquire) < units) std::this_thread::yield();
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SqjaxConv3x3Winograd, Winograd,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("pad_h")
                                  .Attr<int64_t>("pad_w"));
