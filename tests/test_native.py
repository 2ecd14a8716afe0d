"""sqjax.cpu.native: the C++ kernel gradient and the 3x3 convolutions (Winograd, direct, with
their fused bias, residual and ReLU) of NHWC convolutions, against XLA's own."""

import ctypes
import os
import platform
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sqjax.cpu import native

needs_native = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler"
)


@needs_native
def test_a_compiler_on_the_path_builds_it():
    assert native.available()


@needs_native
@pytest.mark.parametrize(
    "x_shape,kernel,out,stride,padding",
    [
        ((2, 9, 11, 3), 3, 5, 1, ((1, 1), (1, 1))),  # channel and output tails (scalar)
        ((2, 9, 11, 1), 3, 8, 1, ((1, 1), (1, 1))),  # the stem: one input channel
        ((2, 9, 11, 20), 3, 24, 2, ((1, 1), (1, 1))),  # stride 2, 8-wide outputs
        ((2, 8, 10, 16), 1, 48, 2, ((0, 0), (0, 0))),  # 1x1 shortcut, stride 2
        ((1, 7, 7, 9), 1, 33, 1, ((0, 0), (0, 0))),
        ((3, 10, 12, 8), 3, 64, 2, ((0, 1), (0, 1))),  # XLA's "SAME" at stride 2
        ((2, 16, 32, 16), 3, 16, 1, ((1, 1), (1, 1))),  # large enough for two threads
    ],
)
def test_kernel_grad_equals_xla(x_shape, kernel, out, stride, padding):
    kx, kw, kd = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, x_shape)
    w = jax.random.normal(kw, (kernel, kernel, x_shape[-1], out))
    dn = ("NHWC", "HWIO", "NHWC")
    conv = lambda w: jax.lax.conv_general_dilated(
        x, w, (stride,) * 2, padding, dimension_numbers=dn
    )
    y, pullback = jax.vjp(conv, w)
    dy = jax.random.normal(kd, y.shape)
    expected = pullback(dy)[0]
    got = jax.jit(native.conv_kernel_grad, static_argnums=(2, 3, 4))(
        x, dy, w.shape, (stride,) * 2, padding
    )
    assert got.shape == expected.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(jnp.abs(expected).max()))


def _xla_conv(x, w, padding):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _epilogue(y, bias, residual, relu):
    y = y + bias.reshape(1, 1, 1, -1) + (0 if residual is None else residual)
    return jnp.maximum(y, 0) if relu else y


@needs_native
@pytest.mark.parametrize("method,tile", [("winograd", 2), ("winograd", 4), ("direct", 2)])
@pytest.mark.parametrize(
    "x_shape,out,padding,residual,relu",
    [
        ((2, 9, 11, 64), 64, ((1, 1), (1, 1)), False, False),  # odd sizes: tiles half outside
        ((3, 8, 8, 5), 70, ((0, 2), (2, 0)), True, True),  # asymmetric pads, channel tails
        ((1, 5, 6, 17), 9, ((0, 0), (0, 0)), False, True),  # "VALID": 3 x 4 outputs
        ((2, 1, 7, 3), 33, ((1, 1), (2, 2)), True, False),  # one input row
        ((2, 9, 11, 1), 16, ((1, 1), (1, 1)), False, True),  # the stem: one input channel
        ((4, 20, 30, 64), 128, ((1, 1), (1, 1)), True, True),  # several blocks, two threads
        ((4, 20, 30, 16), 32, ((1, 1), (1, 1)), True, True),
    ],
)
def test_conv3x3_equals_xla(method, tile, x_shape, out, padding, residual, relu):
    """act(conv + bias + residual): the epilogue's parts each change the output."""
    kx, kw, kb, kr = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, x_shape)
    w = jax.random.normal(kw, (3, 3, x_shape[-1], out))
    bias = jax.random.normal(kb, (out,)) * 3
    y = _xla_conv(x, w, padding)
    res = jax.random.normal(kr, y.shape) * 3 if residual else None
    expected = _epilogue(y, bias, res, relu)
    conv = jax.jit(native.conv3x3, static_argnums=(2, 5, 6, 7))
    got = conv(x, w, padding, bias, res, relu, method, tile)
    assert got.shape == expected.shape and got.dtype == jnp.float32
    # Winograd rounds differently: about 1e-6 (F(2x2)) or 1e-5 (F(4x4)) of the outputs' scale
    atol = (1e-5 if tile == 2 else 5e-5) * float(jnp.abs(expected).max())
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=atol)
    if not (residual or relu):  # the bias defaults to none
        plain = conv(x, w, padding, None, None, False, method, tile)
        np.testing.assert_allclose(plain, y, rtol=1e-4, atol=atol)


def test_conv3x3_names_a_wrong_method_or_tile():
    x, w = jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 2))
    with pytest.raises(ValueError, match="method='fft'"):
        native.conv3x3(x, w, ((1, 1), (1, 1)), method="fft")
    with pytest.raises(ValueError, match="tile=3"):
        native.conv3x3(x, w, ((1, 1), (1, 1)), tile=3)


@needs_native
@pytest.mark.parametrize("method", ["winograd", "direct"])
def test_conv3x3_on_a_sharded_batch_and_under_vmap(method):
    """Two CPU devices (conftest.py): each convolves its half of the batch (and of the
    residual), no gathering. Vmapped over stacked kernels (evaluate's "vmap" strategy), one
    call per kernel; the kernel gradient too."""
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    kx, kw = jax.random.split(jax.random.key(2))
    x = jax.random.normal(kx, (4, 6, 10, 8))
    w = jax.random.normal(kw, (2, 3, 3, 8, 16))
    pads = ((1, 1), (1, 1))
    conv = jax.jit(lambda x, w, r: native.conv3x3(x, w, pads, None, r, True, method))
    sharded, res = jax.device_put(x, batch), jax.device_put(jnp.concatenate([x, x], -1), batch)
    assert "all-gather" not in conv.lower(sharded, w[0], res).compile().as_text()
    want = jnp.maximum(_xla_conv(x, w[0], pads) + res, 0)
    np.testing.assert_allclose(conv(sharded, w[0], res), want, rtol=1e-4, atol=1e-4)
    stacked = jax.jit(jax.vmap(lambda w: native.conv3x3(x, w, pads, method=method)))(w)
    expected = jax.vmap(lambda w: _xla_conv(x, w, pads))(w)
    np.testing.assert_allclose(stacked, expected, rtol=1e-4, atol=1e-4)
    y = expected  # and the kernel gradient, vmapped over stacked output gradients
    got = jax.jit(jax.vmap(lambda dy: native.conv_kernel_grad(x, dy, w.shape[1:], (1, 1), pads)))(y)
    want = jax.vmap(lambda dy: jax.vjp(lambda w: _xla_conv(x, w, pads), w[0])[1](dy)[0])(y)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3 * float(jnp.abs(want).max()))


# x86 instruction sets the kernels are written for (vector width, register block), the
# -march that selects each and the /proc/cpuinfo flag a CPU needs to run it.
ISAS = {
    "sse": ("-march=x86-64", "sse2"),
    "avx2": ("-march=haswell", "avx2"),
    "avx512": ("-march=skylake-avx512", "avx512f"),
}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return {w for ln in f if ln.startswith("flags") for w in ln.split(":")[1].split()}
    except OSError:
        return set()


@needs_native
@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86 instruction sets")
@pytest.mark.parametrize("isa", ISAS)
def test_every_vector_width_computes_the_same(isa, tmp_path):
    """The sources built for each instruction set this CPU runs (not only -march=native):
    their vector types and register blocks differ, so do their tails."""
    march, flag = ISAS[isa]
    if flag not in _cpu_flags():
        pytest.skip(f"this CPU lacks {flag}")
    flags = [f for f in native.FLAGS if not f.startswith("-march")] + [march]
    lib_path = tmp_path / f"{isa}.so"
    cmd = [shutil.which(os.environ.get("CXX", "g++")), *flags, f"-I{jax.ffi.include_dir()}"]
    subprocess.run([*cmd, *map(str, native.SOURCES), "-o", str(lib_path)], check=True)
    lib = ctypes.cdll.LoadLibrary(str(lib_path))
    grad_target, conv_target = f"sqjax_test_{isa}_grad", f"sqjax_test_{isa}_conv"
    direct_target = f"sqjax_test_{isa}_direct"
    for target, symbol in ((grad_target, lib.SqjaxConvKernelGrad),
                           (conv_target, lib.SqjaxConv3x3Winograd),
                           (direct_target, lib.SqjaxConv3x3Direct)):  # fmt: skip
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
    # 13 channels: blocks of 6 or 8 and a tail; 45 outputs: 32 + 8 + 4 + 1 or 16 + 16 + ...
    kx, kw, kd = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(kx, (2, 9, 11, 13))
    w = jax.random.normal(kw, (3, 3, 13, 45))
    pads = ((1, 1), (1, 1))
    y, pullback = jax.vjp(lambda w: _xla_conv(x, w, pads), w)
    dy = jax.random.normal(kd, y.shape)
    one = np.int64(1)
    grad = jax.ffi.ffi_call(grad_target, jax.ShapeDtypeStruct(w.shape, jnp.float32))(
        x, dy, stride_h=one, stride_w=one, pad_h=one, pad_w=one
    )
    want = pullback(dy)[0]
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
    # G g G^T, as native.conv3x3 computes it, for F(2x2) and F(4x4)
    u2, u4 = ((gg @ w.reshape(9, -1)).reshape(len(gg), 13, 45) for gg in (native._GG, native._GG4))
    bias, res = jnp.linspace(-2, 2, 45), dy  # the epilogue: + bias + residual, ReLU
    want = jnp.maximum(y + bias.reshape(1, 1, 1, -1) + res, 0)
    for target, weights in ((conv_target, u2), (conv_target, u4), (direct_target, w)):
        conv = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(y.shape, jnp.float32))(
            x, weights, bias, res, pad_h=one, pad_w=one, relu=True
        )
        np.testing.assert_allclose(conv, want, rtol=1e-4, atol=5e-5 * float(jnp.abs(y).max()))


def test_off_with_the_environment_variable(monkeypatch):
    monkeypatch.setenv("SQJAX_NATIVE", "0")
    assert not native.available()


def _small_sources(folder, monkeypatch) -> str:
    """native._build's sources replaced by one small file, so that the tests of where it
    builds and what it keeps compile in a fraction of a second (the kernels' own build,
    12-15 s, is test_a_compiler_on_the_path_builds_it's and the vector widths' above)."""
    folder.mkdir(exist_ok=True)
    small = folder / "small.cc"
    small.write_text('extern "C" int sqjax_small() { return 7; }\n')
    monkeypatch.setattr(native, "SOURCES", (small,))
    monkeypatch.setattr(native, "HEADERS", ())
    return shutil.which(os.environ.get("CXX", "g++"))


@needs_native
def test_build_is_cached_and_a_failed_build_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SQJAX_CACHE_DIR", str(tmp_path / "cache"))
    compiler = _small_sources(tmp_path / "src", monkeypatch)
    lib = native._build(compiler)
    assert lib.parent == tmp_path / "cache" and ctypes.CDLL(str(lib)).sqjax_small() == 7
    mtime = lib.stat().st_mtime_ns
    assert native._build(compiler) == lib and lib.stat().st_mtime_ns == mtime  # not rebuilt
    broken = tmp_path / "broken.cc"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCES", (broken,))
    with pytest.raises(RuntimeError, match="failed"):
        native._build(compiler)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [lib.name]


@needs_native
def test_a_batch_sharded_over_devices_sums_the_shards():
    """conftest.py gives two CPU devices: each computes its half of the batch's sum, and
    the halves are added (no gathering of the activations)."""
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    kx, kd = jax.random.split(jax.random.key(1))
    x = jax.device_put(jax.random.normal(kx, (4, 6, 10, 8)), batch)
    dy = jax.device_put(jax.random.normal(kd, (4, 3, 5, 16)), batch)
    pads = ((1, 1), (1, 1))
    grad = jax.jit(lambda x, dy: native.conv_kernel_grad(x, dy, (3, 3, 8, 16), (2, 2), pads))
    assert "all-gather" not in grad.lower(x, dy).compile().as_text()
    conv = lambda w: jax.lax.conv_general_dilated(
        np.asarray(x), w, (2, 2), pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    expected = jax.vjp(conv, jnp.zeros((3, 3, 8, 16)))[1](np.asarray(dy))[0]
    np.testing.assert_allclose(grad(x, dy), expected, rtol=1e-5, atol=1e-5)


@needs_native
def test_an_unwritable_cache_dir_falls_back_to_the_temp_dir(tmp_path, monkeypatch):
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")  # a file: the cache dir cannot be made below it
    monkeypatch.setenv("SQJAX_CACHE_DIR", str(blocked / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    lib = native._build(_small_sources(tmp_path / "src", monkeypatch))
    assert lib.parent == tmp_path / "tmp" / "sqjax" and ctypes.CDLL(str(lib)).sqjax_small() == 7


_CACHED_PROGRAM = """
import sys

import jax, jax.numpy as jnp
from sqjax.cpu import native
native.stable_cache_keys()
assert native.available()
relu, pad = sys.argv[1] == "relu", int(sys.argv[2])
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
batch = NamedSharding(Mesh(jax.devices()[:2], ("b",)), P("b"))  # partitioned: 2 devices
x = jax.device_put(jax.random.normal(jax.random.key(0), (2, 6, 6, 4)), batch)
w = jax.random.normal(jax.random.key(1), (3, 3, 4, 4))
def conv_sum(x, w):
    y = native.conv3x3(x, w, ((pad, 2 - pad), (1, 1)), relu=relu, method="direct")
    return y, native.conv_kernel_grad(x, y - 1.0, w.shape, (1, 1), ((pad, 2 - pad), (1, 1)))
y, dw = jax.jit(conv_sum)(x, w)
print(float(y.sum()), float(dw.sum()))
"""


@needs_native
def test_programs_holding_the_kernels_are_served_by_the_persistent_cache(tmp_path):
    """In a program partitioned over devices a custom_partitioning call appears as an
    object's address, new in each process: without stable_cache_keys every process
    recompiled them. With it, a second process compiles nothing, and programs differing
    only in what the address hid (the epilogue's ReLU, the padding: same shapes) still
    get their own entries and results (native._signature)."""
    env = {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
        "JAX_REMOVE_CUSTOM_PARTITIONING_PTR_FROM_CACHE_KEY": "false",  # the code sets it
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }

    def run(*args):
        done = subprocess.run(
            [sys.executable, "-c", _CACHED_PROGRAM, *args],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        entries = {p.name for p in tmp_path.iterdir() if p.name.startswith("jit_conv_sum")}
        return done.stdout.split(), entries

    first, after_first = run("relu", "1")
    again, after_again = run("relu", "1")
    assert again == first and after_again == after_first and len(after_first) == 1
    plain, after_plain = run("none", "1")  # no ReLU: same shapes, another program
    shifted, after_shifted = run("relu", "0")  # padding (0, 2) for (1, 1): same shapes
    assert len(after_plain) == 2 and len(after_shifted) == 3
    assert len({tuple(first), tuple(plain), tuple(shifted)}) == 3
