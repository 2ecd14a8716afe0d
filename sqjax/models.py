"""ResNet speaker encoders (WeSpeaker/BUT geometry) and the AAM-softmax training head.

Layout: features (batch, frames, n_mels) become an NHWC image (batch, n_mels, frames, 1),
i.e. H = frequency and W = time, the same orientation as WeSpeaker's (B, 1, F, T), so a
PyTorch checkpoint maps onto these parameters by transposing kernels only.

Every layer has an explicit name, so parameter paths are stable and can be matched by regex:
``stem_conv/kernel``, ``stem_bn/scale``, ``layer2_0/conv1/kernel``,
``layer2_0/shortcut_conv/kernel``, ``embedding/kernel``, ``embedding/bias``.
"""

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sqjax import native

# Explicit symmetric padding reproduces PyTorch's padding=1 also for stride 2 ('SAME' would
# pad (0, 1) there and shift the sampling grid by one pixel).
_PAD3 = ((1, 1), (1, 1))
# Added to the variance before the square root in statistics pooling: keeps the std and its
# gradient finite when a channel is constant over time (e.g. one frame after striding).
# Ours: the biased variance + 1e-5. WeSpeaker's TSTP: the unbiased variance (ddof 1) + 1e-7
# (``pool_ddof=1, pool_eps=1e-7``, set by ``sqjax.wespeaker`` for imported models).
POOL_EPS = 1e-5


BN_MOMENTUM = 0.9  # running average: new = BN_MOMENTUM * old + (1 - BN_MOMENTUM) * batch


def _bn(train: bool, name: str, dtype: Any) -> nn.BatchNorm:
    # PyTorch BatchNorm defaults (its momentum 0.1 is 0.9 here), as in WeSpeaker.
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def _conv(
    features: int, kernel: int, stride: int, name: str, dtype: Any, slice_: int = 0
) -> nn.Conv:
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=_PAD3 if kernel == 3 else "VALID",
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        conv_general_dilated=sliced_conv(slice_),
        name=name,
    )


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
# In inference (models.conv_bn) Winograd from this many channels: 32 (the numbers above).
# Training keeps WINOGRAD_CHANNELS = 64: from 32 it ran 1.05-1.11x faster, but changed the
# rounding enough that tests/test_learning.py's trained model missed its EER bound.
WINOGRAD_INFERENCE_CHANNELS = 32
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


# XLA:CPU compiles convolutions (with the elementwise ops around them) into YNNPACK
# fusions by default in recent jaxlibs. For the inference forward pass they ran slower here
# than XLA's Eigen convolutions: with them off, embedding was 1.15-1.3x faster on the demo
# models and ResNet34 (bench/bench_torch.py, 2-core CPU). Training steps whose kernel
# gradients sqjax.native computes were fastest with only YNNPACK's reduce fusions on
# (bench/bench_train.py --xla-options sqjax,default: 1.06-1.18x the defaults on ResNet34
# and the demo preset, 0.96-1.02x on the demo config's width-8 model, batches 8 and 32);
# with XLA's kernel gradients (the slices) and in train-mode forward passes (BatchNorm
# statistics, as in train.reestimate_batch_stats: 0.65-0.84x with them off) the defaults
# were faster, so those keep them.
_YNN_FUSIONS = "xla_cpu_experimental_ynn_fusion_type"
_CPU_INFERENCE_OPTIONS = {_YNN_FUSIONS: ""}
_CPU_TRAINING_OPTIONS = {_YNN_FUSIONS: "LIBRARY_FUSION_TYPE_REDUCE"}


@functools.cache
def _cpu_accepts(option: str, value: str) -> bool:
    """Whether this XLA:CPU compiles a program with ``option=value``."""
    try:
        jax.jit(jnp.negative, compiler_options={option: value}).lower(1.0).compile()
    except RuntimeError:  # an XLA without the option (JaxRuntimeError, XlaRuntimeError)
        return False
    return True


def inference_compiler_options(backend: str | None = None) -> dict[str, str]:
    """XLA options for inference programs on ``backend`` (default: JAX's): on CPU, the
    YNNPACK fusions off; elsewhere, and where the installed XLA lacks the option, none."""
    if (backend or jax.default_backend()) != "cpu" or not _cpu_accepts(_YNN_FUSIONS, ""):
        return {}
    return dict(_CPU_INFERENCE_OPTIONS)


def training_compiler_options(encoder: "ResNet", backend: str | None = None) -> dict[str, str]:
    """XLA options for the training step of ``encoder`` on ``backend`` (default: JAX's): on
    CPU, where ``sliced_conv`` hands the kernel gradients to ``sqjax.native`` (float32,
    ``conv_slice`` set, the kernel built), only YNNPACK's reduce fusions; else none."""
    value = _CPU_TRAINING_OPTIONS[_YNN_FUSIONS]
    native_grads = encoder.conv_slice != 0 and jnp.dtype(encoder.dtype) == jnp.float32
    if (backend or jax.default_backend()) != "cpu" or not native_grads:
        return {}
    if not native.available() or not _cpu_accepts(_YNN_FUSIONS, value):
        return {}
    return dict(_CPU_TRAINING_OPTIONS)


def jit_inference(fun: Callable, **jit_kwargs: Any) -> Callable:
    """``jax.jit(fun)`` compiled with ``inference_compiler_options()``: for programs that
    run the encoder forward only, in inference mode (embedding, layer analysis)."""
    return jax.jit(fun, compiler_options=inference_compiler_options() or None, **jit_kwargs)


# In inference (train=False, float32, native.available()), the blocks run each convolution
# with its BatchNorm, the residual and the ReLU as one op (conv_bn): on XLA:CPU the BatchNorm
# is folded into the kernel and a bias, and 3x3 stride-1 convolutions run sqjax.native's
# kernels with that epilogue fused (Winograd at WINOGRAD_CHANNELS or more, the direct kernel
# below), so each activation is written once. False: Flax's layers (benchmarks compare both).
# Embedding, fused against Flax's layers (bench/bench_torch.py --fused 1,0, AMD EPYC):
# 1.18-1.24x on the demo preset (batches 8, 32), 1.17x on ResNet34 at batch 8, equal at 32.
FUSED_INFERENCE = True


def _fused(module: nn.Module, train: bool) -> bool:
    """Whether ``module`` runs its inference forward pass by ``conv_bn``: not while
    initializing, nor while intermediates are captured (``capture_intermediates``: the
    layers' own outputs are asked for)."""
    return (
        FUSED_INFERENCE
        and not train
        and not module.is_initializing()
        and not module.is_mutable_collection("intermediates")
        and jnp.dtype(module.dtype) == jnp.float32
        and native.available()
    )


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
            return native.conv3x3(x, kernel, padding, shift, residual, relu, method, WINOGRAD_TILE)
        return finish(conv(x, kernel), shift, residual)

    @jax.custom_vjp
    def f(*args):
        return jax.lax.platform_dependent(*args, cpu=folded, default=formula)

    f.defvjp(lambda *args: (f(*args), args), lambda args, g: jax.vjp(formula, *args)[1](g))
    return f


def _conv_bn_of(module: nn.Module, conv: str, bn: str) -> tuple[jax.Array, dict]:
    """The kernel of ``module``'s layer ``conv`` and the BatchNorm variables of ``bn``."""
    params, stats = module.variables["params"], module.variables["batch_stats"]
    return params[conv]["kernel"], {**params[bn], **stats[bn]}


class BasicBlock(nn.Module):
    """3x3-BN-ReLU-3x3-BN + shortcut, ReLU. Output channels: ``planes``."""

    planes: int
    stride: int = 1
    dtype: Any = jnp.float32
    conv_slice: int = 0
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if _fused(self, train):
            short = _fused_shortcut(self, x, self.planes)
            y = conv_bn(x, *_conv_bn_of(self, "conv1", "bn1"), self.stride)
            return conv_bn(y, *_conv_bn_of(self, "conv2", "bn2"), residual=short)
        d, c = self.dtype, self.conv_slice
        y = nn.relu(_bn(train, "bn1", d)(_conv(self.planes, 3, self.stride, "conv1", d, c)(x)))
        y = _bn(train, "bn2", d)(_conv(self.planes, 3, 1, "conv2", d, c)(y))
        return nn.relu(y + _shortcut(x, self.planes, self.stride, train, d, c))


class Bottleneck(nn.Module):
    """1x1-BN-ReLU-3x3(stride)-BN-ReLU-1x1(4x)-BN + shortcut, ReLU. Output: 4 * ``planes``."""

    planes: int
    stride: int = 1
    dtype: Any = jnp.float32
    conv_slice: int = 0
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        d, c, out = self.dtype, self.conv_slice, self.expansion * self.planes
        if _fused(self, train):
            short = _fused_shortcut(self, x, out)
            y = conv_bn(x, *_conv_bn_of(self, "conv1", "bn1"))
            y = conv_bn(y, *_conv_bn_of(self, "conv2", "bn2"), self.stride)
            return conv_bn(y, *_conv_bn_of(self, "conv3", "bn3"), residual=short)
        y = nn.relu(_bn(train, "bn1", d)(_conv(self.planes, 1, 1, "conv1", d, c)(x)))
        y = nn.relu(_bn(train, "bn2", d)(_conv(self.planes, 3, self.stride, "conv2", d, c)(y)))
        y = _bn(train, "bn3", d)(_conv(out, 1, 1, "conv3", d, c)(y))
        return nn.relu(y + _shortcut(x, out, self.stride, train, d, c))


def _shortcut(
    x: jax.Array, out: int, stride: int, train: bool, dtype: Any, slice_: int = 0
) -> jax.Array:
    """Identity, or 1x1 conv (stride s, no bias) + BN when the shape changes.

    Called inside a block's compact __call__, so the layers belong to that block.
    """
    if stride == 1 and x.shape[-1] == out:
        return x
    conv = _conv(out, 1, stride, "shortcut_conv", dtype, slice_)
    return _bn(train, "shortcut_bn", dtype)(conv(x))


def _fused_shortcut(block: nn.Module, x: jax.Array, out: int) -> jax.Array:
    """``_shortcut`` by ``conv_bn``: x, or its 1x1 strided convolution and BatchNorm."""
    if block.stride == 1 and x.shape[-1] == out:
        return x
    return conv_bn(x, *_conv_bn_of(block, "shortcut_conv", "shortcut_bn"), block.stride, relu=False)


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """ResNet speaker encoder: (batch, frames, n_mels) -> (batch, embed_dim) float32.

    Stem 3x3 conv (``width`` channels) + BN + ReLU; four stages of widths w, 2w, 4w, 8w
    (x4 for bottleneck blocks) with strides 1/2/2/2 on frequency and time; temporal
    statistics pooling (mean and std over time of the frequency x channel map); one Dense.
    ``dtype`` is the computation dtype of the convolutional trunk (params stay float32);
    pooling and the embedding layer always run in float32. The pooled std is
    ``sqrt(var + pool_eps)`` with the variance's ``pool_ddof`` (0: biased, 1: unbiased).
    """

    stage_sizes: Sequence[int]
    block: str = "basic"
    width: int = 32
    embed_dim: int = 256
    n_mels: int = 80
    dtype: Any = jnp.float32
    pool_ddof: int = 0
    pool_eps: float = POOL_EPS
    # > 0: kernel gradients over slices of this many examples; AUTO_SLICE (-1): sized per
    # layer (slice_examples); 0: the whole batch. See sliced_conv.
    conv_slice: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.block not in _BLOCKS:
            raise ValueError(f"ResNet.block={self.block!r}; expected one of {list(_BLOCKS)}")
        if x.ndim != 3 or x.shape[-1] != self.n_mels:
            raise ValueError(
                f"ResNet expects (batch, frames, {self.n_mels}) features, "
                f"got shape {x.shape}; set n_mels to match the features"
            )
        x = _stem(self, x, self.width, train, self.dtype, self.conv_slice)
        for name, cls, planes, stride in _block_specs(self):
            x = cls(planes, stride, self.dtype, self.conv_slice, name=name)(x, train)
        return _head(self, x, self.embed_dim, self.pool_ddof, self.pool_eps)


def _block_specs(encoder: ResNet) -> list[tuple[str, type, int, int]]:
    """``(name, block class, planes, stride)`` of each residual block, in order."""
    cls = _BLOCKS[encoder.block]
    return [
        (f"layer{i + 1}_{j}", cls, encoder.width * 2**i, 2 if i > 0 and j == 0 else 1)
        for i, n_blocks in enumerate(encoder.stage_sizes)
        for j in range(n_blocks)
    ]


def _stem(
    module: nn.Module, x: jax.Array, width: int, train: bool, dtype: Any, slice_: int = 0
) -> jax.Array:
    """(B, T, F) features -> NHWC (B, F, T, 1) -> 3x3 conv + BN + ReLU (in ``module``'s scope)."""
    x = jnp.transpose(x, (0, 2, 1))[..., None].astype(dtype)
    if _fused(module, train):
        return conv_bn(x, *_conv_bn_of(module, "stem_conv", "stem_bn"))
    x = _conv(width, 3, 1, "stem_conv", dtype, slice_)(x)
    return nn.relu(_bn(train, "stem_bn", dtype)(x))


def _head(
    module: nn.Module, x: jax.Array, embed_dim: int, ddof: int = 0, eps: float = POOL_EPS
) -> jax.Array:
    """Temporal statistics pooling and the embedding layer (in ``module``'s scope)."""
    # (B, F', T', C) -> (B, T', C * F'), channel-major like WeSpeaker's flatten of (C, F').
    b, f, t, c = x.shape
    x = jnp.transpose(x, (0, 2, 3, 1)).reshape(b, t, c * f).astype(jnp.float32)
    mean = jnp.mean(x, axis=1)
    var = jnp.mean(jnp.square(x - mean[:, None, :]), axis=1) * (t / max(t - ddof, 1))
    std = jnp.sqrt(var + eps)
    stats = jnp.concatenate([mean, std], axis=-1)  # (B, 2 * C * F')
    return nn.Dense(embed_dim, dtype=jnp.float32, name="embedding")(stats)


def _unwrap(apply: Callable, name: str, variables, x: jax.Array) -> jax.Array:
    return apply({c: tree[name] for c, tree in variables.items() if name in tree}, x)


class _Part(nn.Module):
    """Runs ``fn(module, x)`` as a module, so the layers ``fn`` creates are this module's own."""

    fn: Callable[[nn.Module, jax.Array], jax.Array]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fn(self, x)


class Segment(NamedTuple):
    """One link of ``encoder_segments``: ``apply(variables, x)``, jitted, where
    ``variables`` holds only the subtrees of the top-level layer names ``keys``."""

    keys: tuple[str, ...]
    apply: Callable


@functools.lru_cache(maxsize=8)
def encoder_segments(encoder: "ResNet") -> tuple[Segment, ...]:
    """The inference forward pass of ``encoder`` as a chain: the stem, each residual
    block, the pooling head. Chained, the segments compute
    ``encoder.apply(variables, x, train=False)`` (to float rounding: each is its own
    program). Used to re-run only the part of the network after a changed layer."""

    def jitted(module, *args):
        return jit_inference(lambda v, x: module.apply(v, x, *args))

    d = encoder.dtype
    stem = _Part(functools.partial(_stem, width=encoder.width, train=False, dtype=d), dtype=d)
    head = _Part(
        functools.partial(
            _head, embed_dim=encoder.embed_dim, ddof=encoder.pool_ddof, eps=encoder.pool_eps
        )
    )
    by_block: dict = {}
    segs = [Segment(("stem_conv", "stem_bn"), jitted(stem))]
    for name, cls, planes, stride in _block_specs(encoder):
        if (cls, planes, stride) not in by_block:  # equal blocks share their compiles
            by_block[cls, planes, stride] = jitted(cls(planes, stride, d), False)
        segs.append(
            Segment((name,), functools.partial(_unwrap, by_block[cls, planes, stride], name))
        )
    segs.append(Segment(("embedding",), jitted(head)))
    return tuple(segs)


PRESETS: dict[str, dict] = {
    "resnet34": {"stage_sizes": (3, 4, 6, 3), "block": "basic"},
    "resnet36": {"stage_sizes": (3, 4, 7, 3), "block": "basic"},
    "resnet200": {"stage_sizes": (3, 24, 36, 3), "block": "bottleneck"},
    "resnet221": {"stage_sizes": (6, 16, 48, 3), "block": "bottleneck"},
    "resnet293": {"stage_sizes": (10, 20, 64, 3), "block": "bottleneck"},
    # WeSpeaker's other depths (for imported models).
    "resnet18": {"stage_sizes": (2, 2, 2, 2), "block": "basic"},
    "resnet50": {"stage_sizes": (3, 4, 6, 3), "block": "bottleneck"},
    "resnet101": {"stage_sizes": (3, 4, 23, 3), "block": "bottleneck"},
    "resnet152": {"stage_sizes": (3, 8, 36, 3), "block": "bottleneck"},
    # Small presets (ours) for CPU demos and tests.
    "resnet_demo": {"stage_sizes": (2, 2, 2, 2), "block": "basic", "width": 16},
    "resnet_tiny": {"stage_sizes": (1, 1, 1, 1), "block": "basic", "width": 4, "embed_dim": 32},
}


def build_encoder(name: str, **overrides: Any) -> ResNet:
    """Returns the preset encoder ``name`` with fields replaced by ``overrides``."""
    if name not in PRESETS:
        raise ValueError(f"unknown encoder preset {name!r}; choose one of {sorted(PRESETS)}")
    return ResNet(**{**PRESETS[name], **overrides})


def _abstract_init(module: nn.Module, n_frames: int, n_mels: int | None):
    n_mels = getattr(module, "n_mels", 80) if n_mels is None else n_mels
    x = jax.ShapeDtypeStruct((1, n_frames, n_mels), jnp.float32)
    # A fresh closure per call: eval_shape must trace (and run interceptors) every time.
    return jax.eval_shape(lambda x: module.init(jax.random.key(0), x), x)


def count_params(module: nn.Module, n_frames: int = 200, n_mels: int | None = None) -> int:
    """Number of trainable parameters ('params' collection, BN scale/bias included).

    Uses ``jax.eval_shape``, so no parameter memory is allocated. ``n_mels`` defaults to
    ``module.n_mels``; the count does not depend on ``n_frames``.
    """
    variables = _abstract_init(module, n_frames, n_mels)
    return sum(math.prod(p.shape) for p in jax.tree.leaves(variables["params"]))


def encoder_macs_by_layer(module: nn.Module, n_frames: int = 200) -> dict[str, int]:
    """Multiply-accumulates of each Conv / Dense layer for one utterance of ``n_frames``.

    Counted from the shapes seen in an abstract forward pass: a conv costs
    out_positions * kh * kw * in_channels / groups * out_channels, a dense layer
    in_features * out_features per output row. BN, ReLU, additions and pooling are not
    counted (they are O(activations), not O(activations x channels)).
    Returns {layer path, e.g. "layer2_0/conv1": MACs}.
    """
    macs: dict[str, int] = {}

    def record(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, nn.Conv | nn.Dense):
            k = math.prod(mod.kernel_size) if isinstance(mod, nn.Conv) else 1
            groups = getattr(mod, "feature_group_count", 1)
            in_features = args[0].shape[-1]
            n = math.prod(y.shape[:-1]) * k * (in_features // groups) * mod.features
            macs["/".join(mod.scope.path)] = int(n)
        return y

    with nn.intercept_methods(record):
        _abstract_init(module, n_frames, None)
    return macs


def encoder_macs(module: nn.Module, n_frames: int = 200) -> int:
    """Total multiply-accumulates of one forward pass for one utterance of ``n_frames``."""
    return sum(encoder_macs_by_layer(module, n_frames).values())


class AAMSoftmax(nn.Module):
    """Additive angular margin softmax (ArcFace) head; not part of the deployed encoder.

    The target logit is s * cos(theta + m) while theta + m <= pi; beyond that
    (cos theta <= cos(pi - m)) it falls back to s * (cos theta - (1 - cos m)), which keeps
    the logit monotonic and continuous at the threshold (WeSpeaker's choice; insightface
    subtracts m * sin(m) instead, a small jump). ``easy_margin`` applies the margin only
    where cos theta > 0.
    """

    num_classes: int
    scale: float = 32.0
    easy_margin: bool = False

    @nn.compact
    def __call__(
        self, embeddings: jax.Array, labels: jax.Array, margin: jax.Array | float
    ) -> tuple[jax.Array, jax.Array]:
        """Args: embeddings (batch, embed_dim); labels (batch,) int; margin scalar (radians,
        may be traced so it can warm up). Returns (mean cross-entropy, logits (batch, classes)).
        """
        kernel = self.param(
            "kernel",
            nn.initializers.xavier_uniform(),
            (embeddings.shape[-1], self.num_classes),
            jnp.float32,
        )
        cosine = _l2_normalize(embeddings.astype(jnp.float32), 1) @ _l2_normalize(kernel, 0)
        cosine = jnp.clip(cosine, -1.0, 1.0)
        margin = jnp.asarray(margin, jnp.float32)
        # Floor keeps d sqrt / d cos finite at |cos| = 1 (else 0 * inf = NaN with m = 0).
        sine = jnp.sqrt(jnp.maximum(1.0 - jnp.square(cosine), 1e-12))
        phi = cosine * jnp.cos(margin) - sine * jnp.sin(margin)  # cos(theta + m)
        if self.easy_margin:
            phi = jnp.where(cosine > 0.0, phi, cosine)
        else:
            phi = jnp.where(
                cosine > jnp.cos(math.pi - margin), phi, cosine - (1.0 + jnp.cos(math.pi - margin))
            )
        target = jax.nn.one_hot(labels, self.num_classes, dtype=jnp.bool_)
        logits = self.scale * jnp.where(target, phi, cosine)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, logits


def _l2_normalize(x: jax.Array, axis: int) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis, keepdims=True), 1e-12))
