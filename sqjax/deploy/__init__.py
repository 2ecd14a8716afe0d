"""Deployment: the encoder in ONNX with packed weights (``onnx_export``), and the
enroll/verify runtime (``runtime``: onnxruntime and NumPy only, no JAX).

    sqjax export --workdir runs/demo_qat/2bit --format onnx
    sqjax export --cascade --study runs/qat_demo --stages 2,4,32 --out bundle/
    sqjax verify --bundle bundle/ --data DIR --enroll LIST --claims FILE

``sqjax.deploy.runtime`` imports nothing from sqjax; a bundle carries a copy of it, so a
device runs ``from sqjax_runtime import Verifier`` with the bundle on its path.
"""

from sqjax.deploy.runtime import Encoder, Verifier

__all__ = ["Encoder", "Verifier"]
