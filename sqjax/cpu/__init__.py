"""The XLA:CPU backend of the encoders' convolutions: faster kernel and input gradients
(``conv.sliced_conv``), the fused conv + BatchNorm inference (``fused.conv_bn``), the
compiler options of sqjax's programs (``options``) and the C++ kernels they call
(``native``, built from ``csrc/`` on first use). Other backends get XLA's own.

Only ``sqjax.models`` imports this package; the rest of sqjax reaches it through models.
The switches and thresholds (``conv.WINOGRAD_CHANNELS``, ``conv.WINOGRAD_TILE``,
``conv.PHASED_INPUT_GRADS``, ``fused.FUSED_INFERENCE``, ...) are read when a program is
traced: set them on their module (``sqjax.cpu.conv.WINOGRAD_TILE = 2``), not here.
"""

from sqjax.cpu import native
from sqjax.cpu.conv import AUTO_SLICE, slice_examples, sliced_conv, strided_input_grad
from sqjax.cpu.fused import conv_bn, fused_inference
from sqjax.cpu.options import (
    inference_compiler_options,
    jit_inference,
    training_compiler_options,
)

__all__ = [
    "AUTO_SLICE",
    "conv_bn",
    "fused_inference",
    "inference_compiler_options",
    "jit_inference",
    "native",
    "slice_examples",
    "sliced_conv",
    "strided_input_grad",
    "training_compiler_options",
]
