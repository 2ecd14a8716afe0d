"""XLA:CPU compiler options for sqjax's programs: inference (embedding, layer analysis) and
training steps whose kernel gradients ``sqjax.cpu.native`` computes."""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from sqjax.cpu import native

# XLA:CPU compiles convolutions (with the elementwise ops around them) into YNNPACK
# fusions by default in recent jaxlibs. For the inference forward pass they ran slower here
# than XLA's Eigen convolutions: with them off, embedding was 1.15-1.3x faster on the demo
# models and ResNet34 (bench/bench_torch.py, 2-core CPU). Training steps whose kernel
# gradients sqjax.cpu.native computes were fastest with only YNNPACK's reduce fusions on
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


def training_compiler_options(
    conv_slice: int, dtype: Any, backend: str | None = None
) -> dict[str, str]:
    """XLA options for the training step of a model whose convolutions are
    ``sliced_conv(conv_slice)`` computing in ``dtype``, on ``backend`` (default: JAX's): on
    CPU, where ``sliced_conv`` hands the kernel gradients to ``native`` (float32,
    ``conv_slice`` set, the kernel built), only YNNPACK's reduce fusions; else none."""
    value = _CPU_TRAINING_OPTIONS[_YNN_FUSIONS]
    native_grads = conv_slice != 0 and jnp.dtype(dtype) == jnp.float32
    if (backend or jax.default_backend()) != "cpu" or not native_grads:
        return {}
    if not native.available() or not _cpu_accepts(_YNN_FUSIONS, value):
        return {}
    return dict(_CPU_TRAINING_OPTIONS)


def jit_inference(fun: Callable, **jit_kwargs: Any) -> Callable:
    """``jax.jit(fun)`` compiled with ``inference_compiler_options()``: for programs that
    run the encoder forward only, in inference mode (embedding, layer analysis)."""
    return jax.jit(fun, compiler_options=inference_compiler_options() or None, **jit_kwargs)
