"""ONNX Runtime against sqjax (JAX) on this CPU: file sizes, session memory, speed.

    python bench/bench_onnx.py [--bits 2] [--batch 8] [--frames 300] [--repeats 10]

Builds the demo preset's encoder (configs/demo.py; random weights: sizes and speed do not
depend on training), writes the FP32 ONNX file and the b-bit files with sub-byte and uint8
indices, and measures per file:
- size on disk;
- resident memory an InferenceSession adds (RSS after loading minus before, in a fresh
  process), with onnxruntime's default optimisations (which fold the decoding subgraphs to
  float kernels at load) and with ``keep_packed`` (optimisations off: indices stay packed
  and are decoded on every run);
- embedding time of one batch, best of ``--repeats``, against sqjax's jitted embedding
  (``evaluate.jitted_embed``) of the same b-bit model, from one run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]

_CHILD = r"""
import json, os, sys, time, numpy as np
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
import onnxruntime  # noqa: F401  (its import is not the session's memory)
sys.path.insert(0, sys.argv[1])
from sqjax_runtime_copy import Encoder
before = rss()
enc = Encoder(sys.argv[2], keep_packed=sys.argv[3] == "1")
loaded = rss()
x = np.random.default_rng(0).normal(size=(int(sys.argv[4]), int(sys.argv[5]), enc.n_mels)).astype(np.float32)
enc.run(x)
best = min((lambda t: (enc.run(x), time.perf_counter() - t)[1])(time.perf_counter()) for _ in range(int(sys.argv[6])))
print(json.dumps({"session_rss": loaded - before, "rss_after_run": rss() - before, "run_s": best}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from sqjax import builders, evaluate, export, runs
    from sqjax.config import load_config
    from sqjax.deploy import onnx_export, runtime

    config = load_config(str(ROOT / "configs" / "demo.py"))
    enc = builders.build_encoder(config)
    variables = enc.init(jax.random.key(0), jnp.zeros((1, 200, 80)))
    tmp = Path(tempfile.mkdtemp(prefix="bench_onnx_"))
    q = builders.build_quantizer(config, args.bits)
    state = q.init(variables["params"])
    floats = jax.tree.map(lambda _: None, variables["batch_stats"])
    state = type(state)(*({"params": f, "batch_stats": floats} for f in state))
    npz = tmp / f"demo{args.bits}.npz"
    export.export_packed(npz, variables, state, runs._model_metadata(config, args.bits, tmp))
    meta32 = runs._model_metadata(config, 32, tmp)
    files = {
        "fp32": onnx_export.export_variables(variables, meta32, tmp / "fp32.onnx"),
        f"{args.bits}bit": onnx_export.export_model_file(npz, tmp / "bits.onnx", "bits"),
        f"{args.bits}bit uint8": onnx_export.export_model_file(npz, tmp / "u8.onnx", "uint8"),
    }
    (tmp / "sqjax_runtime_copy.py").write_text(Path(runtime.__file__).read_text())
    fp32_size = files["fp32"].stat().st_size
    print(f"demo preset ({config.model.name}, width {config.model.width}), batch {args.batch} x "
          f"{args.frames} frames, {args.repeats} repeats, best; npz {npz.stat().st_size:,} B")  # fmt: skip
    rows = {}
    for name, path in files.items():
        for keep in (0, 1):
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    _CHILD,
                    str(tmp),
                    str(path),
                    str(keep),
                    str(args.batch),
                    str(args.frames),
                    str(args.repeats),
                ],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            rows[name, keep] = json.loads(out.strip().splitlines()[-1])

    # sqjax, the same b-bit model (JAX, jitted), in this process.
    cfg, v = runs.load_model_file(npz)
    embed = evaluate.jitted_embed(builders.build_encoder(cfg))
    x = jnp.asarray(
        np.random.default_rng(0).normal(size=(args.batch, args.frames, 80)), jnp.float32
    )
    embed(v, x).block_until_ready()
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        embed(v, x).block_until_ready()
        times.append(time.perf_counter() - t)
    jax_s = min(times)
    print(f"\n{'file':<14} {'bytes':>10} {'/fp32':>6} {'session':<12} {'RSS MB':>7} "
          f"{'after run':>9} {'ms/batch':>9} {'sqjax/ORT':>9}")  # fmt: skip
    for (name, keep), r in rows.items():
        size = files[name].stat().st_size
        print(f"{name:<14} {size:>10,} {size / fp32_size:>6.3f} "
              f"{'keep_packed' if keep else 'default':<12} {r['session_rss'] / 2**20:>7.1f} "
              f"{r['rss_after_run'] / 2**20:>9.1f} {1e3 * r['run_s']:>9.2f} "
              f"{jax_s / r['run_s']:>9.2f}")  # fmt: skip
    print(f"\nsqjax (JAX, jitted, {args.bits}-bit model file): {1e3 * jax_s:.2f} ms/batch")


if __name__ == "__main__":
    main()
