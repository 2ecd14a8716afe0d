"""The fused inference op: a convolution with its BatchNorm, the residual and the ReLU in
one (``conv_bn``), on XLA:CPU by ``native.conv3x3`` with the BatchNorm folded into the
kernel and a bias."""

import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from sqjax.cpu import conv as _conv
from sqjax.cpu import native

# 3x3 kernels are padded by 1 on each side (PyTorch's padding=1, also at stride 2).
_PAD3 = ((1, 1), (1, 1))

# In inference (train=False, float32, native.available()), the blocks run each convolution
# with its BatchNorm, the residual and the ReLU as one op (conv_bn): on XLA:CPU the BatchNorm
# is folded into the kernel and a bias, and 3x3 stride-1 convolutions run sqjax.cpu.native's
# kernels with that epilogue fused (Winograd at WINOGRAD_CHANNELS or more, the direct kernel
# below), so each activation is written once. False: Flax's layers (benchmarks compare both).
# Embedding, fused against Flax's layers (bench/bench_torch.py --fused 1,0, AMD EPYC):
# 1.18-1.24x on the demo preset (batches 8, 32), 1.17x on ResNet34 at batch 8, equal at 32.
FUSED_INFERENCE = True

# In inference (conv_bn) Winograd from this many channels: 32 (conv.WINOGRAD_CHANNELS has
# the numbers).
# Training keeps WINOGRAD_CHANNELS = 64 (from 32 it ran 1.05-1.11x faster). Either choice
# changes the rounding, and with it a trained model's EER by up to 0.05 on one seed of
# tests/test_learning.py, whose bar allows for that (its docstring has the figures).
WINOGRAD_INFERENCE_CHANNELS = 32


def fused_inference(dtype) -> bool:
    """Whether inference forward passes of a model computing in ``dtype`` run by
    ``conv_bn``: ``FUSED_INFERENCE`` on, float32, the native kernels built."""
    return FUSED_INFERENCE and jnp.dtype(dtype) == jnp.float32 and native.available()


def conv_bn(
    x: jax.Array,
    kernel: jax.Array,
    bn: dict[str, jax.Array],
    stride: int = 1,
    residual: jax.Array | None = None,
    relu: bool = True,
    eps: float = 1e-5,
) -> jax.Array:
    """``act(BatchNorm(conv(x, kernel)) + residual)`` in inference: an NHWC/HWIO
    convolution (3x3 padded by 1, or 1x1) at ``stride``, BatchNorm with the running
    statistics (``bn``: the layer's ``scale``, ``bias``, ``mean``, ``var``), the residual
    where given, ReLU if ``relu``. Equal to Flax's ``Conv`` and ``BatchNorm(
    use_running_average=True)`` to float rounding. On XLA:CPU the BatchNorm is folded into
    the kernel and a bias, and 3x3 stride-1 convolutions run ``native.conv3x3`` with the
    bias, residual and ReLU applied as it writes its output; other backends compute the
    formula as Flax does. Differentiable (by the formula)."""
    return _conv_bn(kernel.shape[0], stride, relu, eps)(
        x, kernel, bn["scale"], bn["bias"], bn["mean"], bn["var"], residual
    )


@functools.cache
def _conv_bn(size: int, stride: int, relu: bool, eps: float) -> Callable:
    padding = _PAD3 if size == 3 else ((0, 0), (0, 0))
    channels = lambda v: v.reshape(1, 1, 1, -1)  # (K,) against (..., K): no rank promotion

    def finish(y, shift, residual):
        y = y + channels(shift) if residual is None else y + channels(shift) + residual
        return nn.relu(y) if relu else y

    def conv(x, kernel):
        dn = ("NHWC", "HWIO", "NHWC")
        return jax.lax.conv_general_dilated(
            x, kernel, (stride, stride), padding, dimension_numbers=dn
        )

    def formula(x, kernel, scale, bias, mean, var, residual):  # Flax's order of operations
        y = (conv(x, kernel) - channels(mean)) * channels(jax.lax.rsqrt(var + eps) * scale)
        return finish(y, bias, residual)

    def folded(x, kernel, scale, bias, mean, var, residual):
        mul = jax.lax.rsqrt(var + eps) * scale
        kernel, shift = kernel * channels(mul), bias - mean * mul
        if size == 3 and stride == 1:
            fast = min(kernel.shape[2:]) >= WINOGRAD_INFERENCE_CHANNELS
            method = "winograd" if fast else "direct"
            return native.conv3x3(
                x, kernel, padding, shift, residual, relu, method, _conv.WINOGRAD_TILE
            )
        return finish(conv(x, kernel), shift, residual)

    @jax.custom_vjp
    def f(*args):
        return jax.lax.platform_dependent(*args, cpu=folded, default=formula)

    f.defvjp(lambda *args: (f(*args), args), lambda args, g: jax.vjp(formula, *args)[1](g))
    return f
