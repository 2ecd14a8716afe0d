"""sqjax's convolution kernels on XLA:CPU, per layer: sqjax.cpu.native's C++ kernel gradient
against XLA's lowering, over the whole batch and over slices (``sqjax.cpu.sliced_conv``);
strided convolutions' input gradients by ``sqjax.cpu.strided_input_grad`` against XLA's; 3x3
convolutions with a bias, a residual and a ReLU (a residual block's end in inference) by
``native.conv3x3``'s direct kernel and Winograd against XLA's (Eigen, then a fusion).

    python bench/bench_kernel_grad.py

Kernel gradients: 3x3, stride-1 NHWC convolutions of the ResNets' layer shapes (batch,
frequency, time, channels), the median of warm calls, the three in turn; the native
kernel's GFLOP/s and its speed-up over the slices. Input gradients: the ResNets' stride-2
convolutions (input shape, output channels, 3x3 or the 1x1 shortcut). 3x3 convolutions:
stride 1, embedding shapes (300 frames), compiled as inference programs, GFLOP/s counted
as a direct convolution's. Checks that the variants agree first.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from sqjax import cpu, models
from sqjax.cpu import native

SHAPES = "32x80x200x8,8x80x200x16,32x40x100x16,8x80x200x32,8x40x100x64,8x20x50x128,8x10x25x256"
DN = ("NHWC", "HWIO", "NHWC")
PAD = ((1, 1), (1, 1))
WINOGRAD = "8x80x300x16,8x40x150x32,8x80x300x32,8x40x150x64,8x20x75x128,8x10x38x256,32x40x150x32,32x40x150x64,32x20x75x128"
STRIDED = "8x80x200x32:64,32x80x200x32:64,32x40x100x64:128,32x20x50x128:256,32x80x200x8:16"


def _xla(x, dy, w):
    conv = lambda w: jax.lax.conv_general_dilated(x, w, (1, 1), PAD, dimension_numbers=DN)
    return jax.vjp(conv, w)[1](dy)[0]


def _sliced(x, dy, w):
    conv = lambda w: cpu.sliced_conv(cpu.AUTO_SLICE)(x, w, (1, 1), PAD, dimension_numbers=DN)
    return jax.vjp(conv, w)[1](dy)[0]


def _native(x, dy, w):
    return native.conv_kernel_grad(x, dy, w.shape, (1, 1), PAD)


def _timed(fns, args, steps: int) -> list[float]:
    """Median ms per call of each of ``fns``, called in turn."""
    times = [[] for _ in fns]
    for _ in range(steps):
        for f, ts in zip(fns, times, strict=True):
            tic = time.perf_counter()
            jax.block_until_ready(f(*args))
            ts.append(time.perf_counter() - tic)
    return [1e3 * float(np.median(ts)) for ts in times]


def _strided_pair(x_shape: tuple, pad) -> tuple:
    """(XLA's, strided_input_grad's) input gradient of a stride-2 conv, jitted: (dy, w) -> dx."""
    conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (2, 2), pad, dimension_numbers=DN)
    x = jnp.zeros(x_shape)
    xla = lambda dy, w: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0]
    phased = lambda dy, w: cpu.strided_input_grad(dy, w, x_shape[1:3], (2, 2), pad)
    # compiled as training steps are (models.training_compiler_options)
    options = models.training_compiler_options(models.build_encoder("resnet_tiny", conv_slice=-1))
    xla, phased = (jax.jit(f, compiler_options=options or None) for f in (xla, phased))
    return xla, phased, lambda w: jax.eval_shape(conv, x, w).shape


def strided_input_grads(shapes: str, steps: int) -> None:
    print(f"\n{'stride-2 conv':>22} {'kernel':>6} {'xla':>7} {'phased':>7} {'speed-up':>8}")
    for spec in filter(None, shapes.split(",")):
        shape, out = spec.split(":")
        n, h, w_, c = (int(d) for d in shape.split("x"))
        for k, pad in ((3, PAD), (1, ((0, 0), (0, 0)))):
            w = jax.random.normal(jax.random.key(1), (k, k, c, int(out)))
            xla, phased, dy_shape = _strided_pair((n, h, w_, c), pad)
            dy = jax.random.normal(jax.random.key(2), dy_shape(w))
            want, got = xla(dy, w), phased(dy, w)
            scale = float(jnp.abs(want).max())
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale)
            ms = _timed((xla, phased), (dy, w), steps)
            print(f"{spec:>22} {k}x{k:<4} {ms[0]:>7.1f} {ms[1]:>7.1f} {ms[0] / ms[1]:>7.2f}x")


def winograd(shapes: str, steps: int) -> None:
    variants = (("direct", 2), ("winograd", 2), ("winograd", 4))
    print(
        f"\n{'3x3 conv+bias+res+relu':>22} {'xla':>7} {'direct':>7} {'wino 2':>7} "
        f"{'wino 4':>7} {'GFLOP/s':>23} {'speed-up':>23}"
    )
    options = models.inference_compiler_options() or None
    for spec in filter(None, shapes.split(",")):
        n, h, w_, c = (int(d) for d in spec.split("x"))
        kx, kw, kb, kr = jax.random.split(jax.random.key(1), 4)
        x, r = jax.random.normal(kx, (n, h, w_, c)), jax.random.normal(kr, (n, h, w_, c))
        w = jax.random.normal(kw, (3, 3, c, c)) / (3 * c**0.5)
        b = jax.random.normal(kb, (c,))

        def xla(x, w, b, r):
            y = jax.lax.conv_general_dilated(x, w, (1, 1), PAD, dimension_numbers=DN)
            return jax.nn.relu(y + b.reshape(1, 1, 1, -1) + r)

        fns = [jax.jit(xla, compiler_options=options)] + [
            jax.jit(
                lambda x, w, b, r, m=method, t=tile: native.conv3x3(x, w, PAD, b, r, True, m, t),
                compiler_options=options,
            )
            for method, tile in variants
        ]
        want = fns[0](x, w, b, r)
        scale = float(jnp.abs(want).max())
        for f in fns[1:]:
            np.testing.assert_allclose(f(x, w, b, r), want, rtol=1e-4, atol=1e-5 * scale)
        ms = _timed(fns, (x, w, b, r), steps)
        gflops = [2 * 9 * c * c * n * h * w_ / t / 1e6 for t in ms[1:]]
        print(
            f"{spec:>22} "
            + " ".join(f"{t:>7.1f}" for t in ms)
            + " "
            + " ".join(f"{g:>7.0f}" for g in gflops)
            + " "
            + " ".join(f"{ms[0] / t:>6.2f}x" for t in ms[1:]),
            flush=True,
        )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=SHAPES, help="batch x height x width x channels, ...")
    p.add_argument(
        "--winograd",
        default=WINOGRAD,
        help="3x3 convolutions (+ bias, residual, ReLU): NxHxWxC, ...",
    )
    p.add_argument("--strided", default=STRIDED, help="stride-2 convolutions: NxHxWxC:out, ...")
    p.add_argument("--steps", type=int, default=7)
    a = p.parse_args()
    if not native.available():
        raise SystemExit(
            "sqjax.cpu.native is not built here (no C++ compiler?): nothing to compare"
        )
    print(f"# jax {jax.__version__} ({jax.default_backend()}); ms per call, median of {a.steps}")
    print(
        f"{'shape':>18} {'xla batch':>9} {'slices':>7} {'native':>7} {'GFLOP/s':>7} {'vs slices':>9}"
    )
    for spec in filter(None, a.shapes.split(",")):
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
        ms = _timed(fns, (x, dy, w), a.steps)
        gflops = 2 * 9 * c * c * n * h * w_ / ms[2] / 1e6
        print(
            f"{spec:>18} {ms[0]:>9.1f} {ms[1]:>7.1f} {ms[2]:>7.1f} {gflops:>7.0f} "
            f"{ms[1] / ms[2]:>8.2f}x",
            flush=True,
        )
    strided_input_grads(a.strided, a.steps)
    winograd(a.winograd, a.steps)


if __name__ == "__main__":
    main()
