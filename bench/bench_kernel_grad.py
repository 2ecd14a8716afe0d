"""Convolution kernel gradients on XLA:CPU, per layer: sqjax.native's C++ kernel against
XLA's lowering, over the whole batch and over slices (``models.sliced_conv``).

    python bench/bench_kernel_grad.py

For 3x3, stride-1 NHWC convolutions of the ResNets' layer shapes (batch, frequency, time,
channels), the median of warm calls, the three in turn; the native kernel's GFLOP/s and
its speed-up over the slices. Checks that all three agree first.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from sqjax import models, native

SHAPES = "32x80x200x8,8x80x200x16,32x40x100x16,8x80x200x32,8x40x100x64,8x20x50x128,8x10x25x256"
DN = ("NHWC", "HWIO", "NHWC")
PAD = ((1, 1), (1, 1))


def _xla(x, dy, w):
    conv = lambda w: jax.lax.conv_general_dilated(x, w, (1, 1), PAD, dimension_numbers=DN)
    return jax.vjp(conv, w)[1](dy)[0]


def _sliced(x, dy, w):
    conv = lambda w: models.sliced_conv(models.AUTO_SLICE)(x, w, (1, 1), PAD, dimension_numbers=DN)
    return jax.vjp(conv, w)[1](dy)[0]


def _native(x, dy, w):
    return native.conv_kernel_grad(x, dy, w.shape, (1, 1), PAD)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=SHAPES, help="batch x height x width x channels, ...")
    p.add_argument("--steps", type=int, default=7)
    a = p.parse_args()
    if not native.available():
        raise SystemExit("sqjax.native is not built here (no C++ compiler?): nothing to compare")
    print(f"# jax {jax.__version__} ({jax.default_backend()}); ms per call, median of {a.steps}")
    print(
        f"{'shape':>18} {'xla batch':>9} {'slices':>7} {'native':>7} {'GFLOP/s':>7} {'vs slices':>9}"
    )
    for spec in a.shapes.split(","):
        n, h, w_, c = (int(d) for d in spec.split("x"))
        kx, kd = jax.random.split(jax.random.key(0))
        x, dy = jax.random.normal(kx, (n, h, w_, c)), jax.random.normal(kd, (n, h, w_, c))
        w = jnp.zeros((3, 3, c, c))
        fns = [jax.jit(f) for f in (_xla, _sliced, _native)]
        os.environ["SQJAX_NATIVE"] = "0"  # read when traced: the slices, not the kernel
        results = [fns[0](x, dy, w), fns[1](x, dy, w)]
        os.environ["SQJAX_NATIVE"] = "1"
        results.append(fns[2](x, dy, w))
        scale = float(jnp.abs(results[0]).max())
        for r in results[1:]:
            np.testing.assert_allclose(r, results[0], rtol=1e-4, atol=1e-5 * scale)
        times = [[] for _ in fns]
        for _ in range(a.steps):
            for f, ts in zip(fns, times, strict=True):
                tic = time.perf_counter()
                jax.block_until_ready(f(x, dy, w))
                ts.append(time.perf_counter() - tic)
        ms = [1e3 * float(np.median(ts)) for ts in times]
        gflops = 2 * 9 * c * c * n * h * w_ / ms[2] / 1e6
        print(
            f"{spec:>18} {ms[0]:>9.1f} {ms[1]:>7.1f} {ms[2]:>7.1f} {gflops:>7.0f} "
            f"{ms[1] / ms[2]:>8.2f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
