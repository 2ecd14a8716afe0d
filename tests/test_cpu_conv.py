"""Tests for sqjax.cpu.conv: sliced_conv's output and gradients against
lax.conv_general_dilated's, strided_input_grad against the definition in NumPy, and where
Winograd and the per-layer slices apply."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sqjax.cpu import conv, native
from sqjax.cpu.conv import AUTO_SLICE, slice_examples, sliced_conv, strided_input_grad


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


@pytest.mark.parametrize("batch, examples", [(8, 2), (6, 4), (7, 2), (40, 1)])
def test_sliced_conv_gradients_equal_the_plain_convs(batch, examples):
    """Stride 2 with padding, as the residual stages: output and both gradients equal
    lax.conv_general_dilated's: 8 in 4 slices of 2; 40 in 10 of 4 (at most 16 slices,
    dividing the batch); 6 with slices of 4, and the prime 7, whole."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, 9, 11, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 5)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(batch, 5, 6, 5)), jnp.float32)
    kw = {"window_strides": (2, 2), "padding": ((1, 1), (1, 1)),
          "dimension_numbers": ("NHWC", "HWIO", "NHWC")}  # fmt: skip
    plain = lambda x, w: jax.lax.conv_general_dilated(x, w, **kw)
    chunked = lambda x, w: sliced_conv(examples)(x, w, **kw)
    y0, vjp0 = jax.vjp(plain, x, w)
    y1, vjp1 = jax.jit(lambda x, w: jax.vjp(chunked, x, w))(x, w)
    np.testing.assert_allclose(y1, y0, rtol=1e-6, atol=1e-5)
    for got, want in zip(vjp1(dy), vjp0(dy), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def _numpy_input_grad(dy, w, x_hw, strides, padding):
    """The input gradient of an NHWC/HWIO convolution by its definition: every output
    position o sends dy[o] @ w[k].T to input row s*o + k - pad, for each tap k."""
    dy, w = np.asarray(dy, np.float64), np.asarray(w, np.float64)
    (sh, sw), ((ph, _), (pw, _)) = strides, padding
    dx = np.zeros((dy.shape[0], x_hw[0] + 2 * w.shape[0] + ph, x_hw[1] + 2 * w.shape[1] + pw,
                   w.shape[2]))  # fmt: skip
    for kh in range(w.shape[0]):
        for kw in range(w.shape[1]):
            rows = np.arange(dy.shape[1]) * sh + kh - ph + w.shape[0]  # offset: no negatives
            cols = np.arange(dy.shape[2]) * sw + kw - pw + w.shape[1]
            dx[:, rows[:, None], cols[None, :]] += dy @ w[kh, kw].T
    return dx[:, w.shape[0] : w.shape[0] + x_hw[0], w.shape[1] : w.shape[1] + x_hw[1]]


@pytest.mark.parametrize(
    "x_hw, kernel, strides, padding",
    [
        ((9, 11), 3, (2, 2), ((1, 1), (1, 1))),  # the ResNets' strided 3x3, odd sizes
        ((10, 12), 3, (2, 2), ((1, 1), (1, 1))),  # even sizes
        ((10, 12), 3, (2, 2), "SAME"),  # XLA's asymmetric (0, 1)
        ((9, 10), 1, (2, 2), "VALID"),  # the 1x1 shortcut: no tap reaches odd rows
        ((11, 10), 3, (3, 3), ((2, 2), (1, 0))),  # a tap shift past the padding
        ((9, 11), 5, (2, 1), ((2, 1), (0, 3))),  # strided in one axis only
    ],
)
def test_strided_input_grad_is_the_definition(x_hw, kernel, strides, padding):
    rng = np.random.default_rng(0)
    x = jnp.zeros((3, *x_hw, 5))
    w = jnp.asarray(rng.normal(size=(kernel, kernel, 5, 7)), jnp.float32)
    kw = {"window_strides": strides, "padding": padding,
          "dimension_numbers": ("NHWC", "HWIO", "NHWC")}  # fmt: skip
    pads = padding
    if isinstance(padding, str):
        pads = jax.lax.padtype_to_pads(x_hw, w.shape[:2], strides, padding)
    dy_shape = jax.eval_shape(lambda: jax.lax.conv_general_dilated(x, w, **kw)).shape
    dy = jnp.asarray(rng.normal(size=dy_shape), jnp.float32)
    got = jax.jit(strided_input_grad, static_argnums=(2, 3, 4))(dy, w, x_hw, strides, tuple(pads))
    want = _numpy_input_grad(dy, w, x_hw, strides, pads)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("phased", [True, False])
def test_strided_convs_backward_has_no_dilated_convolution_on_cpu(phased, monkeypatch):
    """sliced_conv's input gradient of a stride-2 convolution on the CPU: stride-1
    convolutions (with PHASED_INPUT_GRADS), not XLA's convolution of a zero-dilated dy;
    the same values either way."""
    monkeypatch.setattr(conv, "PHASED_INPUT_GRADS", phased)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 10, 12, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 5)), jnp.float32)
    kw = {"window_strides": (2, 2), "padding": ((1, 1), (1, 1)),
          "dimension_numbers": ("NHWC", "HWIO", "NHWC")}  # fmt: skip
    dx = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(sliced_conv(2)(x, w, **kw)))))
    hlo = dx.lower(x).compile().as_text()
    assert ("lhs_dilate=2x2" in hlo) != phased
    want = jax.grad(lambda x: jnp.sum(jnp.sin(jax.lax.conv_general_dilated(x, w, **kw))))(x)
    np.testing.assert_allclose(dx(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("examples, calls", [(AUTO_SLICE, 2), (0, 1), (AUTO_SLICE, 0)])
def test_sliced_conv_runs_winograd_where_it_wins(examples, calls, monkeypatch):
    """A 3x3 stride-1 convolution of 64 channels, differentiated on the CPU: Winograd
    (native.conv3x3) in the forward pass and, unless conv_slice is 0 (XLA's gradients), the
    input gradient; with SQJAX_NATIVE=0 (the last case) XLA's. Not differentiated: Winograd
    unless conv.WINOGRAD_INFERENCE is off. Output and gradients equal the plain
    convolution's either way."""
    if calls and not native.available():
        pytest.skip("no C++ compiler: sqjax.cpu.native is not built (tests/test_native.py)")
    monkeypatch.setenv("SQJAX_NATIVE", "1" if calls else "0")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 6, 9, 64)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 64, 64)) / 24, jnp.float32)
    kw = {"window_strides": (1, 1), "padding": ((1, 1), (1, 1)),
          "dimension_numbers": ("NHWC", "HWIO", "NHWC")}  # fmt: skip
    plain = lambda x, w: jax.lax.conv_general_dilated(x, w, **kw)
    fast = lambda x, w: sliced_conv(examples)(x, w, **kw)
    loss = lambda conv: lambda x, w: jnp.sum(jnp.sin(conv(x, w)))
    grad = jax.jit(jax.value_and_grad(loss(fast), argnums=(0, 1)))
    assert grad.lower(x, w).as_text().count(native.WINOGRAD_TARGET) == calls
    got, want = grad(x, w), jax.value_and_grad(loss(plain), argnums=(0, 1))(x, w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))
    for winograd_inference in (True, False):  # not differentiated: as WINOGRAD_INFERENCE says
        monkeypatch.setattr(conv, "WINOGRAD_INFERENCE", winograd_inference)
        inference = jax.jit(lambda x, w: fast(x, w))  # a new function: traced again
        text = inference.lower(x, w).as_text()
        assert text.count(native.WINOGRAD_TARGET) == (calls > 0 and winograd_inference)
        np.testing.assert_allclose(inference(x, w), plain(x, w), rtol=1e-4, atol=1e-4)


def _kernel_grad_convs(jaxpr, kernel_shape) -> int:
    """Convolutions in ``jaxpr`` (and its sub-jaxprs) whose output has the kernel's shape."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            n += eqn.outvars[0].aval.shape == kernel_shape
        for p in eqn.params.values():
            inner = getattr(p, "jaxpr", p)
            if hasattr(inner, "eqns"):
                n += _kernel_grad_convs(inner, kernel_shape)
    return n


@pytest.mark.parametrize("in_channels, batch, slices", [(3, 16, 2), (16, 8, 1), (32, 8, 8),
                                                        (128, 32, 16), (256, 16, 2)])  # fmt: skip
def test_auto_slices_are_sized_by_input_channels(in_channels, batch, slices, monkeypatch):
    """AUTO_SLICE: one example per slice at 32-128 input channels, eight otherwise (at
    most 16 slices), counted as the kernel-gradient convolutions in the backward pass."""
    x = jnp.zeros((batch, 4, 4, in_channels))
    w = jnp.zeros((3, 3, in_channels, 2))
    kw = {"window_strides": (1, 1), "padding": ((1, 1), (1, 1)),
          "dimension_numbers": ("NHWC", "HWIO", "NHWC")}  # fmt: skip
    monkeypatch.setenv("SQJAX_NATIVE", "0")  # the slices, not sqjax.cpu.native's kernel
    y, pullback = jax.vjp(lambda x, w: sliced_conv(AUTO_SLICE)(x, w, **kw), x, w)
    assert _kernel_grad_convs(jax.make_jaxpr(pullback)(y).jaxpr, w.shape) == slices
    assert slice_examples(in_channels, batch) == (1 if 32 <= in_channels <= 128 else 8)
