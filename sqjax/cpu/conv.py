"""Convolutions on XLA:CPU with faster gradients: ``sliced_conv(examples)`` stands in for
``lax.conv_general_dilated`` in Flax's ``nn.Conv`` (the same forward pass and gradients,
to float rounding), computing kernel gradients by ``native.conv_kernel_grad`` (or over
slices of the batch), strided input gradients from stride-1 convolutions
(``strided_input_grad``) and 3x3 stride-1 convolutions by Winograd (``native.conv3x3``).
Other backends keep XLA's.

The module-level switches and thresholds below are read when a program is traced
(benchmarks set them to compare variants).
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from sqjax.cpu import native

# sliced_conv computes strided convolutions' input gradients on XLA:CPU from stride-1
# convolutions (strided_input_grad); False: XLA's own (benchmarks compare both).
PHASED_INPUT_GRADS = True
MAX_SLICES = 16  # more unrolled slices compile slower for little gain
AUTO_SLICE = -1  # conv_slice: examples per slice chosen per layer (slice_examples)


def slice_examples(in_channels: int, batch: int) -> int:
    """Examples per kernel-gradient slice of a convolution with ``in_channels`` inputs,
    chosen per layer on XLA:CPU (``conv_slice = AUTO_SLICE``): one example for 32-128
    input channels, eight otherwise. On single layers of a 2-core CPU, one-example slices
    ran 32-128-channel kernel gradients up to 2x faster than slices of 4, while 8-16 and
    256 channels were fastest with 4-8 examples. Whole training steps against slices of 4
    everywhere (``bench/bench_torch.py --conv-slice 4,-1``): 1.26-1.35x on ResNet34
    (width 32, batches 8 and 32), 1.3x on the demo preset at batch 32, 0.97x at batch 8."""
    return min(batch, 1 if 32 <= in_channels <= 128 else 8)


@functools.cache
def sliced_conv(examples: int) -> Callable:
    """``lax.conv_general_dilated`` (batch on axis 0, as Flax calls it) with a faster
    kernel gradient on XLA:CPU: the same forward pass and gradients (to float rounding).

    Float32 NHWC convolutions, where ``native.available()``: on the CPU backend
    ``native.conv_kernel_grad`` computes it (training steps 1.28-1.36x faster than with the
    slices below, ``bench/bench_torch.py``); other backends keep XLA's. Otherwise (bfloat16, no
    C++ compiler) it is computed over slices of about ``examples`` examples of the batch
    and summed: XLA:CPU computes kernel gradients of small batches several times faster
    per example. ``examples = AUTO_SLICE`` picks the size per layer (``slice_examples``).
    Slice c holds examples c, c + k, c + 2k, ... of k slices (at most ``MAX_SLICES``, a
    divisor of the batch), so on a batch sharded over devices each keeps an equal share
    of every slice. ``examples = 0``: XLA's gradients.

    On XLA:CPU, 3x3 stride-1 float32 convolutions of at least ``WINOGRAD_CHANNELS`` input
    and output channels run by ``native.conv3x3`` (Winograd): in the forward pass (in
    inference too, unless ``WINOGRAD_INFERENCE`` is off) and for the input gradient (unless
    ``examples = 0``)."""

    def conv(lhs, rhs, window_strides, padding, **kw):
        plain = functools.partial(
            jax.lax.conv_general_dilated, window_strides=window_strides, padding=padding, **kw
        )

        def forward(x, w):
            geometry = _plain_geometry(x, w, window_strides, padding, kw)
            if not _winograd(x, w, geometry):
                return plain(x, w)
            fast = lambda x, w: native.conv3x3(x, w, geometry[1], tile=WINOGRAD_TILE)
            return jax.lax.platform_dependent(x, w, cpu=fast, default=plain)

        @jax.custom_vjp
        def f(x, w):  # not differentiated (embedding, BatchNorm re-estimation)
            return forward(x, w) if WINOGRAD_INFERENCE else plain(x, w)

        def fwd(x, w):
            return forward(x, w), (x, w)

        def bwd(res, dy):
            x, w = res
            if examples == 0:
                return jax.vjp(plain, x, w)[1](dy)
            input_grad = lambda dy, w: jax.vjp(lambda x: plain(x, w), x)[1](dy)[0]
            geometry = _plain_geometry(x, w, window_strides, padding, kw)
            if geometry is not None and max(geometry[0]) > 1 and PHASED_INPUT_GRADS:
                phased = lambda dy, w: strided_input_grad(dy, w, x.shape[1:3], *geometry)
                dx = jax.lax.platform_dependent(dy, w, cpu=phased, default=input_grad)
            elif _winograd(x, w, geometry):  # dx: dy convolved with the kernel turned around
                flipped = lambda w: w[::-1, ::-1].swapaxes(2, 3)
                pads = tuple((2 - lo, 2 - hi) for lo, hi in geometry[1])
                fast = lambda dy, w: native.conv3x3(dy, flipped(w), pads, tile=WINOGRAD_TILE)
                dx = jax.lax.platform_dependent(dy, w, cpu=fast, default=input_grad)
            else:
                dx = input_grad(dy, w)
            if geometry is not None and _native_kernel_grad(x, w, geometry):
                # XLA:CPU runs sqjax's kernel, other backends XLA's
                native_grad = lambda x, dy, w: native.conv_kernel_grad(x, dy, w.shape, *geometry)
                dw = jax.lax.platform_dependent(x, dy, w, cpu=native_grad, default=sliced_grad)
                return dx, dw
            return dx, sliced_grad(x, dy, w)

        def sliced_grad(x, dy, w):
            n = x.shape[0]
            size = slice_examples(w.shape[-2], n) if examples == AUTO_SLICE else examples
            k = max(d for d in range(1, min(MAX_SLICES, max(n // size, 1)) + 1) if n % d == 0)
            # Unrolled: in a lax.scan, XLA:CPU ran these 30x slower than the whole batch.
            kernel_grad = lambda x, dy: jax.vjp(lambda w: plain(x, w), w)[1](dy)[0]
            # Summed in float32 (a no-op for float32 kernels): k bf16 roundings of the
            # partial sums doubled the kernel gradient's error against the plain conv's.
            parts = [kernel_grad(x[c::k], dy[c::k]).astype(jnp.float32) for c in range(k)]
            return functools.reduce(jnp.add, parts).astype(w.dtype)

        f.defvjp(fwd, bwd)
        return f(lhs, rhs)

    return conv


_NHWC = jax.lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def _plain_geometry(x, w, strides, padding, kw) -> tuple | None:
    """``(strides, padding pairs)`` of a plain NHWC/HWIO convolution (no dilation, groups
    or preferred element type); else None."""
    dn = kw.get("dimension_numbers")
    plain = (
        x.ndim == 4
        and dn is not None
        and jax.lax.conv_dimension_numbers(x.shape, w.shape, dn) == _NHWC
        and all(tuple(kw.get(k) or (1, 1)) == (1, 1) for k in ("lhs_dilation", "rhs_dilation"))
        and kw.get("feature_group_count", 1) == 1
        and kw.get("batch_group_count", 1) == 1
        and kw.get("preferred_element_type") is None
    )
    if not plain:
        return None
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(x.shape[1:3], w.shape[:2], strides, padding)
    padding = tuple(tuple(int(p) for p in pair) for pair in padding)
    return tuple(int(s) for s in strides), padding


def _native_kernel_grad(x, w, geometry) -> bool:
    """Whether ``native.conv_kernel_grad`` computes the kernel gradient of this plain
    convolution: float32, no negative padding, the native kernel built."""
    padding = geometry[1]
    float32 = x.dtype == w.dtype == jnp.float32
    return float32 and min(map(min, padding)) >= 0 and native.available()


# Both channel counts at least this: Winograd (native.conv3x3) on XLA:CPU. Single 3x3 layers
# with the inference epilogue (bench/bench_kernel_grad.py, AMD EPYC), F(4x4) with its
# transforms vectorized over channels: 1.6-1.7x XLA's convolution and fusion at 32
# channels, 2.0-2.3x at 64-128, 1.6x at 256; at 16 about equal to the direct kernel, which
# runs there. Whole models from 32 channels against from 64 (bench/bench_torch.py
# --winograd 1,32, ratios to PyTorch compared): embedding 0.96-1.32x (ResNet34 at batch 8:
# 1.32x), training 1.05-1.11x. (With scalar transforms, F(2x2) ran 0.98-1.18x Eigen at 32.)
WINOGRAD_CHANNELS = 64
# (In the fused inference, fused.WINOGRAD_INFERENCE_CHANNELS: from 32.)
# Winograd's output tiles: 2, F(2x2, 3x3); 4, F(4x4, 3x3) (36 products per 16 outputs, not
# 16 per 4; rounding about 1e-5 of the outputs' scale, not 1e-6). Single layers with the
# inference epilogue (bench/bench_kernel_grad.py, AMD EPYC): 4 ran 1.15-1.33x faster than 2
# at 64-128 channels, equal at 256 (10 x 38 outputs, where 4x4 tiles overhang). Whole
# models (bench/bench_torch.py --tile 4,2, ratios to PyTorch compared): embedding 1.03-1.04x
# on ResNet34, 0.89-1.03x on the demo preset; training 0.96-1.04x (noise). (All measured
# before the transforms were vectorized, which sped F(4x4) up most: 2.0-2.3x XLA at 64-128.)
WINOGRAD_TILE = 4
# Winograd in inference (embedding) too; False: XLA's convolutions there (benchmarks compare
# both). Embedding with it against without (bench/bench_torch.py --winograd 0,64, AMD
# EPYC): 1.05-1.31x on the demo preset and ResNet34 at batches 8 and 32.
WINOGRAD_INFERENCE = True


def _winograd(x, w, geometry) -> bool:
    """Whether ``native.conv3x3`` computes this plain convolution on the CPU: 3x3, stride
    1, float32, pads of 0-2, ``WINOGRAD_CHANNELS`` or more in and out, the kernel built."""
    return (
        geometry is not None
        and w.shape[:2] == (3, 3)
        and geometry[0] == (1, 1)
        and x.dtype == w.dtype == jnp.float32
        and all(0 <= p <= 2 for pair in geometry[1] for p in pair)
        and min(w.shape[2:]) >= WINOGRAD_CHANNELS
        and native.available()
    )


def strided_input_grad(dy, w, x_hw: tuple[int, int], strides, padding) -> jax.Array:
    """The input gradient of a strided NHWC/HWIO convolution (``x`` of spatial shape
    ``x_hw``, output gradient ``dy``) from stride-1 convolutions, one per phase of the input
    grid: input row ``s*q + r`` only meets the kernel taps ``k = (r + pad) mod s, k + s,
    ...``, so each phase ``r`` is a stride-1 convolution of ``dy`` with those taps, and
    the phases are interleaved. XLA:CPU lowers the plain input gradient to a convolution of
    ``dy`` dilated with zeros (4x the work at stride 2): at the ResNets' stride-2 shapes this
    was 1.35-2.7x faster per layer (``bench/bench_kernel_grad.py``), whole training steps
    1.0-1.08x (``bench/bench_torch.py --phased 1,0``). Negative pads crop ``dy``."""
    phases = []  # per axis: (first tap, (low pad, high pad), length) of each phase
    for s, (p, _), k, n_out, n_in in zip(strides, padding, w.shape[:2], dy.shape[1:3], x_hw):
        axis = []
        for r in range(s):
            k0 = (r + p) % s  # taps k0, k0 + s, ... reach input rows s*q + r
            taps = len(range(k0, k, s))
            shift = (r + p - k0) // s  # row s*q + r meets dy[q + shift - t] through tap k0 + s*t
            length = -(-(n_in - r) // s)
            axis.append((k0, taps, (taps - 1 - shift, length - 1 + shift - (n_out - 1)), length))
        phases.append(axis)
    full = [-(-n // s) for n, s in zip(x_hw, strides)]
    grid = []
    for k0h, th, pad_h, len_h in phases[0]:
        row = []
        for k0w, tw, pad_w, len_w in phases[1]:
            if th == 0 or tw == 0:  # no tap reaches this phase (a 1x1 kernel's odd rows)
                part = jnp.zeros((dy.shape[0], len_h, len_w, w.shape[2]), dy.dtype)
            else:  # the taps flipped, inputs and outputs swapped
                taps = w[k0h :: strides[0], k0w :: strides[1]][::-1, ::-1].swapaxes(2, 3)
                part = jax.lax.conv_general_dilated(
                    dy, taps, (1, 1), (pad_h, pad_w), dimension_numbers=("NHWC", "HWIO", "NHWC")
                )
            fill = ((0, 0), (0, full[0] - len_h), (0, full[1] - len_w), (0, 0))
            row.append(jnp.pad(part, fill))
        grid.append(jnp.stack(row, axis=3))  # (batch, rows, cols, phase w, channels)
    dx = jnp.stack(grid, axis=2)  # (batch, rows, phase h, cols, phase w, channels)
    dx = dx.reshape(dy.shape[0], full[0] * strides[0], full[1] * strides[1], w.shape[2])
    return dx[:, : x_hw[0], : x_hw[1]]
