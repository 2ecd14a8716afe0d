// Vector types and register blocks shared by sqjax's kernels (csrc/*.cc).
//
// vec is one vector register of floats; the kernels' register blocks are kRows x 2 vecs,
// accumulated in 2 * kRows registers (16 of AVX-512's 32, 12 of AVX2's or SSE's 16).
// Vectors wider than the registers make GCC spill: 64-byte vectors on an AVX2 CPU ran
// 10-20x slower (bench/bench_kernel_grad.py).
#pragma once

#if defined(__AVX512F__)
typedef float vec __attribute__((vector_size(64)));
constexpr int kRows = 8;
#elif defined(__AVX__)
typedef float vec __attribute__((vector_size(32)));
constexpr int kRows = 6;
#else
typedef float vec __attribute__((vector_size(16)));
constexpr int kRows = 6;
#endif
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
