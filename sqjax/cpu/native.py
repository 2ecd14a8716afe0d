"""sqjax's native XLA:CPU kernels: convolution kernel gradients
(``csrc/conv_kernel_grad.cc``) and 3x3 convolutions, by Winograd
(``csrc/conv3x3_winograd.cc``) or directly (``csrc/conv3x3_direct.cc``).

XLA:CPU computes a convolution's kernel gradient as another convolution whose operands it
first transposes to channel-major layouts; on the ResNets here those transposes and that
convolution were 36-48% of a training step's traced time (``bench/profile_step.py``).
``conv_kernel_grad`` reads the NHWC arrays as they are (a sum of outer products,
register-blocked, split over XLA's intra-op threads): 1.9-4.3x faster per layer than
``conv.sliced_conv``'s slices at 8-64 channels, 0.9-1.6x at 128-256, and 3-7x faster
than XLA's kernel gradient over the whole batch (``bench/bench_kernel_grad.py``, 2-core
CPU, over runs of a noisy machine).

``conv3x3`` computes 3x3 stride-1 convolutions by Winograd's F(2x2, 3x3) or F(4x4, 3x3)
(16 products per 2x2 outputs and channel pair, or 36 per 4x4, not 36 or 144), in blocks
of tiles that stay in L2, the transforms vectorized over channels: F(4x4) ran 1.6-1.7x
XLA's convolution per layer at 32 channels and 2.0-2.3x at 64-128
(``bench/bench_kernel_grad.py``, AMD EPYC); or by a direct kernel (the 9 x C products of
a block of outputs in registers), 1.3-2.1x at 16 channels. Both add a bias and a
residual and apply a ReLU as they write the output: in inference ``fused.conv_bn`` folds
each BatchNorm into its convolution and runs the block's end with them in one pass over
the activations. ``conv.sliced_conv`` uses Winograd from ``conv.WINOGRAD_CHANNELS``
in training too (forward and input gradient).

It is compiled on first use with the C++ compiler on the path (``$CXX``, else ``g++``)
against the XLA FFI headers that jaxlib ships, and cached in ``$SQJAX_CACHE_DIR`` (default
``~/.cache/sqjax``) under a hash of the source, compiler, flags, FFI headers and CPU.
Without a compiler, or with ``SQJAX_NATIVE=0``, ``available()`` is False:
``conv.sliced_conv`` computes kernel gradients over slices of the batch and leaves the
convolutions to XLA.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import inspect
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger("sqjax")

SOURCES = tuple(
    pathlib.Path(__file__).with_name("csrc") / f
    for f in ("conv_kernel_grad.cc", "conv3x3_winograd.cc", "conv3x3_direct.cc")
)
HEADERS = tuple(  # included by SOURCES
    pathlib.Path(__file__).with_name("csrc") / f for f in ("vectors.h", "parallel.h")
)
TARGET = "sqjax_conv_kernel_grad"
WINOGRAD_TARGET = "sqjax_conv3x3_winograd"
DIRECT_TARGET = "sqjax_conv3x3_direct"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


def cache_dir() -> pathlib.Path:
    """Where built kernels are kept: ``$SQJAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/sqjax``
    (``~/.cache/sqjax``); where it cannot be written, the temp dir's ``sqjax``."""
    if os.environ.get("SQJAX_CACHE_DIR"):
        return pathlib.Path(os.environ["SQJAX_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "sqjax"


def _cpu_id() -> str:
    """The CPU's model and instruction sets (what ``-march=native`` compiles for)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        return "".join(dict.fromkeys(lines))  # every core repeats them
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _build(compiler: str) -> pathlib.Path:
    """The shared library, compiled unless the cache has it (written to a temporary file
    in the cache dir, then renamed, so concurrent builds never see half a file)."""
    include = jax.ffi.include_dir()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=True
    ).stdout
    headers = sorted((pathlib.Path(include) / "xla" / "ffi" / "api").glob("*.h"))
    code = [f.read_text() for f in (*SOURCES, *HEADERS)]
    parts = [*code, compiler, version, " ".join(FLAGS), _cpu_id()]
    key = hashlib.sha256("\0".join(parts + [h.read_text() for h in headers]).encode())
    name = f"sqjax_native-{key.hexdigest()[:16]}.so"
    for folder in (cache_dir(), pathlib.Path(tempfile.gettempdir()) / "sqjax"):
        if (folder / name).exists():
            return folder / name
        try:  # the first folder we can write to (a read-only home: the temp dir)
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                break
        except OSError:
            continue
    else:
        raise OSError(f"no writable folder for the kernel: set SQJAX_CACHE_DIR ({cache_dir()})")
    out = folder / name
    log.info("sqjax: compiling %s into %s (once per machine)", [f.name for f in SOURCES], folder)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [compiler, *FLAGS, f"-I{include}", *map(str, SOURCES), "-o", tmp]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return out


_LIBRARY_KEY = [0]  # 28 bits of the loaded library's hash (its name), for ``_signature``


def _signature(*params) -> jax.Array:
    """A constant operand, ignored by the kernels, that names what a custom call's Python
    side holds: its parameters (strides, paddings, epilogue) and the kernel library's
    hash. A ``custom_partitioning`` call appears in the program as its operands and an
    object's address, which differs in every process, so the persistent compilation cache
    never served a program holding one (a train step recompiled in every process).
    ``stable_cache_keys`` drops that address from the cache key; this operand keeps
    programs whose calls differ in these parameters, or run another build, apart."""
    return jnp.asarray(np.array([*params, _LIBRARY_KEY[0]], np.int32))


def stable_cache_keys() -> None:
    """Lets the persistent compilation cache serve programs holding these kernels from one
    process to the next (JAX's ``jax_remove_custom_partitioning_ptr_from_cache_key``).
    Process-wide: any other ``custom_partitioning`` call in the process must then differ
    in its operands where its partitioning differs, as these do (``_signature``). The
    ``sqjax`` command sets it; a program of your own may call it on the same terms."""
    try:
        jax.config.update("jax_remove_custom_partitioning_ptr_from_cache_key", True)
    except AttributeError:  # a jax without the option: programs recompile, as before
        log.info("sqjax: this jax cannot drop custom calls' addresses from cache keys")


def available() -> bool:
    """Whether the native kernel is built and registered with XLA:CPU: False with
    ``SQJAX_NATIVE=0``, else built on the first call (False, with one log line saying why,
    where it cannot be). Read when a program is traced."""
    return os.environ.get("SQJAX_NATIVE", "1") != "0" and _load()


@functools.cache
def _load() -> bool:
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    rules = inspect.signature(custom_partitioning.def_partition).parameters
    if compiler is None or not hasattr(jax, "ffi") or "sharding_rule" not in rules:
        log.info(
            "sqjax: no C++ compiler (set CXX), or a jax without jax.ffi or sharding rules; "
            "XLA computes kernel gradients"
        )
        return False
    try:
        path = _build(compiler)
        lib = ctypes.cdll.LoadLibrary(str(path))
        _LIBRARY_KEY[0] = int(path.stem.rsplit("-", 1)[1][:7], 16)
        for target, symbol in ((TARGET, lib.SqjaxConvKernelGrad),
                               (WINOGRAD_TARGET, lib.SqjaxConv3x3Winograd),
                               (DIRECT_TARGET, lib.SqjaxConv3x3Direct)):  # fmt: skip
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        log.warning("sqjax: native kernel unavailable, XLA computes kernel gradients: %s", e)
        return False
    return True


def conv_kernel_grad(
    x: jax.Array,
    dy: jax.Array,
    kernel_shape: tuple[int, int, int, int],
    strides: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
) -> jax.Array:
    """The gradient, for the kernel (HWIO, ``kernel_shape``), of the float32 NHWC
    convolution ``y = conv(x, kernel, strides, padding)`` given ``dy = dL/dy``; XLA:CPU
    only (needs ``available()``). The high paddings are implied by ``dy``'s shape. On a
    batch sharded over devices each computes its shard's sum, then they are added up
    (``psum``); other dimensions are gathered first."""
    kernel_shape, strides, padding = tuple(kernel_shape), tuple(strides), tuple(map(tuple, padding))
    tag = _signature(*kernel_shape, *strides, *padding[0], *padding[1])
    return _partitioned(kernel_shape, strides, padding)(x, dy, tag)


@functools.cache
def _partitioned(kernel_shape, strides, padding):
    def call(x, dy, tag):  # tag: _signature's operand, not read
        return jax.ffi.ffi_call(
            TARGET, jax.ShapeDtypeStruct(kernel_shape, jnp.float32), vmap_method="sequential"
        )(
            x,
            dy,
            stride_h=np.int64(strides[0]),
            stride_w=np.int64(strides[1]),
            pad_h=np.int64(padding[0][0]),
            pad_w=np.int64(padding[1][0]),
        )

    def partition(mesh, arg_shapes, result_shape):
        spec = arg_shapes[0].sharding.spec
        batch = spec[0] if len(spec) else None  # the mesh axis (or axes) of the batch
        operands, replicated = NamedSharding(mesh, P(batch)), NamedSharding(mesh, P())

        def per_shard(x, dy, tag):
            dw = call(x, dy, tag)
            return jax.lax.psum(dw, batch) if batch is not None else dw

        return mesh, per_shard, replicated, (operands, operands, replicated)

    f = custom_partitioning(call)
    f.def_partition(
        partition,
        infer_sharding_from_operands=lambda mesh, *_: NamedSharding(mesh, P()),
        sharding_rule="b h w c, b i j o, t -> k l c o",
        reduction_factors=("b",),
        need_replication_factors=("h", "w", "c", "i", "j", "o", "t"),  # in the rule's order
    )
    return _vmappable(f)


def _vmappable(f):
    """``f`` under ``jax.vmap`` as one call per element (custom_partitioning has no
    batching rule; ``lax.platform_dependent`` traces the CPU branch on every backend, so
    a vmapped model would fail on GPUs too)."""
    return jax.custom_batching.sequential_vmap(f)


# Winograd's kernel transforms u = G g G^T for each channel pair: F(2x2, 3x3) and (Lavin &
# Gray's) F(4x4, 3x3).
_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)
_G4 = np.array(
    [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
     [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
    np.float64,
)  # fmt: skip
_GG = np.kron(_G, _G)  # [a * 4 + b, i * 3 + j] = G[a, i] * G[b, j]
_GG4 = np.kron(_G4, _G4).astype(np.float32)


def conv3x3(
    x: jax.Array,
    kernel: jax.Array,
    padding: tuple[tuple[int, int], tuple[int, int]],
    bias: jax.Array | None = None,
    residual: jax.Array | None = None,
    relu: bool = False,
    method: str = "winograd",
    tile: int = 2,
) -> jax.Array:
    """``act(conv(x, kernel) + bias + residual)``: the float32 NHWC convolution of ``x``
    with a 3x3 HWIO ``kernel`` at stride 1, ``padding`` (low, high) per spatial axis, plus
    ``bias`` (per output channel) and ``residual`` (shaped like the output) where given,
    through a ReLU if ``relu``; the epilogue is applied as the output is written. Equal to
    ``lax.conv_general_dilated`` (and the additions) to float rounding. XLA:CPU only (needs
    ``available()``); the kernel may be traced. A batch sharded over devices stays sharded
    (each device convolves its shard).

    ``method``: "winograd", Winograd's F(``tile`` x ``tile``, 3x3) for wide layers: at
    ``tile`` 2, 16 products per 2x2 outputs and channel pair instead of 36, about 1e-6 of
    the outputs' scale off the direct sum; at 4, 36 per 4x4 instead of 144, about 1e-5.
    "direct": the 9 x C products per output in registers, for narrow layers."""
    if method not in ("winograd", "direct"):
        raise ValueError(f"conv3x3 method={method!r}; expected 'winograd' or 'direct'")
    if tile not in (2, 4):
        raise ValueError(f"conv3x3 tile={tile!r}; expected 2 or 4 (Winograd's F(2x2) or F(4x4))")
    k = kernel.shape[-1]
    bias = jnp.zeros((k,), jnp.float32) if bias is None else bias.astype(jnp.float32)
    if method == "winograd":
        # (G x G) @ kernel as (9, C*K): one product, no transposes (an einsum made XLA copy
        # the kernel twice, 12% of ResNet34's embedding time)
        gg = _GG if tile == 2 else _GG4
        kernel = (jnp.asarray(gg) @ kernel.reshape(9, -1)).reshape(len(gg), *kernel.shape[2:])
    padding = tuple(map(tuple, padding))
    call = _conv3x3(method, padding, bool(relu), residual is not None)
    tag = _signature(method == "winograd", tile, *padding[0], *padding[1], bool(relu))
    return call(x, kernel, bias, tag) if residual is None else call(x, kernel, bias, tag, residual)


@functools.cache
def _conv3x3(method, padding, relu, has_residual):
    (ph, ph_hi), (pw, pw_hi) = padding
    target = WINOGRAD_TARGET if method == "winograd" else DIRECT_TARGET

    def call(x, kernel, bias, tag, *residual):  # tag: _signature's operand, not read
        n, h, w, _ = x.shape
        shape = (n, h + ph + ph_hi - 2, w + pw + pw_hi - 2, kernel.shape[-1])
        res = residual[0] if residual else jnp.zeros((0,), jnp.float32)
        return jax.ffi.ffi_call(
            target, jax.ShapeDtypeStruct(shape, x.dtype), vmap_method="sequential"
        )(x, kernel, bias, res, pad_h=np.int64(ph), pad_w=np.int64(pw), relu=relu)

    def batch_of(mesh, arg_shapes, result_shape=None):
        spec = arg_shapes[0].sharding.spec
        return NamedSharding(mesh, P(spec[0] if len(spec) else None))

    def partition(mesh, arg_shapes, result_shape):
        batch, replicated = batch_of(mesh, arg_shapes), NamedSharding(mesh, P())
        operands = (batch, replicated, replicated, replicated, batch)
        return mesh, call, batch, operands[: len(arg_shapes)]

    weights = "e c k" if method == "winograd" else "kh kw c k"
    rule = f"b h w c, {weights}, k, t" + (", b i j k" if has_residual else "") + " -> b i j k"
    f = custom_partitioning(call)
    factors = rule.replace(",", " ").replace("->", " ").split()
    f.def_partition(
        partition,
        infer_sharding_from_operands=batch_of,
        sharding_rule=rule,
        need_replication_factors=tuple(d for d in dict.fromkeys(factors) if d != "b"),
    )
    return _vmappable(f)
