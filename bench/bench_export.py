"""Packed file size of a ResNet encoder at each bit width, against its FP32 file.

    python bench/bench_export.py                 # resnet34, 1/2/3/4/8 bits
    python bench/bench_export.py --model resnet200 --bits 2

The FP32 file is every params leaf as float32 in an uncompressed .npz; the packed file is
``sqjax.export_packed`` (b-bit indices + float32 codebooks, float leaves as they are,
uncompressed). Sizes are on-disk bytes, so headers and codebooks are counted.
"""

import argparse
import os
import tempfile
import time

import jax
import numpy as np

from sqjax import export, models, quant


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet34")
    p.add_argument("--bits", default="1,2,3,4,8")
    a = p.parse_args()
    encoder = models.build_encoder(a.model)
    params = encoder.init(jax.random.key(0), np.zeros((1, 200, 80), np.float32))["params"]
    n = sum(x.size for x in jax.tree.leaves(params))
    with tempfile.TemporaryDirectory() as d:
        fp32 = os.path.join(d, "fp32.npz")
        np.savez(fp32, *[np.asarray(x, np.float32) for x in jax.tree.leaves(params)])
        fp32_bytes = os.path.getsize(fp32)
        print(f"# {a.model}: {n:,} parameters; FP32 file {fp32_bytes:,} bytes")
        print(f"{'bits':>4} {'file_bytes':>12} {'predicted':>12} {'fp32/file':>9} {'fit_s':>6}")
        for bits in (int(b) for b in a.bits.split(",")):
            q = quant.kmeans_quantizer(quant.default_rules(bits))
            tic = time.perf_counter()
            state = q.init(params)
            fit_s = time.perf_counter() - tic
            report = export.export_packed(os.path.join(d, f"{bits}.npz"), params, state)
            print(
                f"{bits:>4} {report.file_bytes:>12,} {round(report.packed_bytes):>12,} "
                f"{fp32_bytes / report.file_bytes:>9.2f} {fit_s:>6.2f}"
            )


if __name__ == "__main__":
    main()
