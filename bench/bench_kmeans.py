"""Codebook fitting speed and distortion: sqjax.kmeans vs scikit-learn, side by side.

Fits one codebook per kernel of a ResNet34-sized set of tensors (WeSpeaker ResNet34: stem
3x3 1->32, basic-block stages [3, 4, 6, 3] of widths 32/64/128/256 with 1x1 projection
shortcuts at the start of stages 2-4, embedding dense 5120->256: 37 kernels, ~6.6M
weights) filled with Laplacian values scaled like He init, or the kernels of a trained
model (``--params model.npz``, every array whose key ends in "kernel").

    python bench/bench_kmeans.py                             # ~40 s on 2 CPU cores
    python bench/bench_kmeans.py --bits 8 --sklearn-bits 8   # sklearn alone ~1 min
    python bench/bench_kmeans.py --bits 2 --per-tensor       # one compile per size

Measured (2 shared CPU cores, sklearn 1.9 on 1 thread, its fastest here): warm sqjax
0.056 / 0.056 / 0.12 / 2.7 s at 1 / 2 / 4 / 8 bits against sklearn KMeans(n_init=1)
0.85 / 1.1 / 3.5 / 60 s, i.e. 15-30x faster, at 0.1-5.4% lower distortion; one
compilation per codebook size class (~1.5 s). One call per kernel instead compiles each
of the 12 sizes (~25 s).

sqjax times are warm (best of --repeats); the first run minus the warm one is reported as
compile time. scikit-learn runs only at --sklearn-bits (8 bits takes minutes per pass);
its n_init, threads and an optional subsample of each tensor are flags, and its
distortion is always measured on the full tensor. Distortion = total squared error over
all kernels.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from sqjax import kmeans


def resnet34_kernels(seed: int = 0) -> dict[str, np.ndarray]:
    """Kernel shapes of WeSpeaker ResNet34 (Flax HWIO / (in, out)), He-scaled Laplacian."""
    shapes = {"stem/kernel": (3, 3, 1, 32)}
    cin = 32
    for s, (blocks, width) in enumerate(zip((3, 4, 6, 3), (32, 64, 128, 256)), start=1):
        for b in range(blocks):
            name = f"stage{s}/block{b}"
            shapes[f"{name}/conv1/kernel"] = (3, 3, cin, width)
            shapes[f"{name}/conv2/kernel"] = (3, 3, width, width)
            if b == 0 and s > 1:
                shapes[f"{name}/shortcut/kernel"] = (1, 1, cin, width)
            cin = width
    shapes["embedding/kernel"] = (5120, 256)
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        fan_in = int(np.prod(shape[:-1]))
        std = np.sqrt(2.0 / fan_in)  # Laplace(0, b) has std b*sqrt(2)
        out[name] = rng.laplace(0.0, std / np.sqrt(2.0), shape).astype(np.float32)
    return out


def load_kernels(path: str) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: np.asarray(z[k], np.float32) for k in z.files if k.endswith("kernel")}


def fit_sqjax(kernels, k, bucket, per_tensor):
    """All kernels in one batched call (as quantizer.init does), or one call per kernel."""
    if per_tensor:
        out = [kmeans.kmeans_1d(w, k, bucket=bucket)[0] for w in kernels.values()]
    else:
        groups = [w.reshape(1, -1) for w in kernels.values()]
        out = [c[0] for c, _ in kmeans.kmeans_1d_batch(groups, [k] * len(groups), bucket=bucket)]
    jax.block_until_ready(out)
    return {name: np.asarray(c) for name, c in zip(kernels, out)}


def fit_sklearn(kernels, k, n_init, subsample, threads, seed=0):
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(seed)
    out = {}
    for name, w in kernels.items():
        x = w.reshape(-1, 1)
        if subsample and x.shape[0] > subsample:
            x = x[rng.choice(x.shape[0], subsample, replace=False)]
        with threadpool_limits(threads):
            km = KMeans(n_clusters=min(k, x.shape[0]), n_init=n_init, random_state=seed).fit(x)
        out[name] = np.sort(km.cluster_centers_.ravel())
    return out


def total_sse(kernels, codebooks) -> float:
    """Exact nearest-centroid squared error over all kernels (float64)."""
    sse = 0.0
    for name, w in kernels.items():
        c = codebooks[name]
        x = w.ravel().astype(np.float64)
        i = np.clip(np.searchsorted((c[1:] + c[:-1]) / 2, x, side="right"), 0, len(c) - 1)
        sse += float(np.sum((x - c[i]) ** 2))
    return sse


def timed(fn, *args, repeats=1):
    """(result, best wall time of `repeats` runs): the machine may be shared."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t)
    return out, best


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--params", help="npz of a trained model's parameters (keys ending in 'kernel')")
    p.add_argument("--bits", default="1,2,4,8")
    p.add_argument("--sklearn-bits", default="1,2,4", help="bit widths also run with scikit-learn")
    p.add_argument("--sklearn-n-init", type=int, default=1)
    p.add_argument(
        "--sklearn-subsample",
        type=int,
        default=0,
        help="fit sklearn on this many values per tensor (0 = all)",
    )
    p.add_argument(
        "--no-bucket", action="store_true", help="compile every tensor size (no padding)"
    )
    p.add_argument(
        "--per-tensor", action="store_true", help="one call per kernel instead of one batch"
    )
    p.add_argument("--repeats", type=int, default=3, help="best-of-N timing for sqjax")
    p.add_argument(
        "--sklearn-threads",
        default="1,0",
        help="thread counts tried for sklearn (0 = its default); the fastest is reported",
    )
    args = p.parse_args()

    kernels = load_kernels(args.params) if args.params else resnet34_kernels()
    n = sum(w.size for w in kernels.values())
    sizes = sorted({w.size for w in kernels.values()})
    print(
        f"{len(kernels)} kernels, {n:,} weights, {len(sizes)} distinct sizes"
        f" ({'trained: ' + args.params if args.params else 'He-scaled Laplacian'})"
    )
    mode = "one call per kernel" if args.per_tensor else "all kernels in one batched call"
    print(f"devices: {jax.devices()}; sqjax: {mode}, bucket padding: {not args.no_bucket}")
    sk_bits = {int(b) for b in args.sklearn_bits.split(",") if b}
    sub = f", subsample {args.sklearn_subsample:,}/tensor" if args.sklearn_subsample else ""
    threads = [int(t) or None for t in args.sklearn_threads.split(",")]
    print(
        f"sklearn: KMeans(n_init={args.sklearn_n_init}) at bits {sorted(sk_bits)}{sub}, fastest of"
        f" threads {[t or 'default' for t in threads]}; other bit widths skipped (8 bits takes"
        f" minutes)\nsqjax: best of {args.repeats} warm runs; compile = first run - warm run\n"
    )
    hdr = (
        f"{'bits':>4} {'sqjax warm s':>12} {'compile s':>9} {'sklearn s':>9} {'speedup':>8}"
        f" {'sqjax MSE':>11} {'sklearn MSE':>11} {'MSE ratio':>9}"
    )
    print(hdr)
    print("-" * len(hdr))
    for bits in (int(b) for b in args.bits.split(",")):
        k = 2**bits
        fit_args = (fit_sqjax, kernels, k, not args.no_bucket, args.per_tensor)
        _, first = timed(*fit_args)
        cb, warm = timed(*fit_args, repeats=args.repeats)
        mse = total_sse(kernels, cb) / n
        row = f"{bits:>4} {warm:>12.3f} {max(first - warm, 0):>9.2f}"
        if bits in sk_bits:
            runs = [
                timed(fit_sklearn, kernels, k, args.sklearn_n_init, args.sklearn_subsample, t)
                for t in threads
            ]
            skcb, sk_t = min(runs, key=lambda r: r[1])
            sk_mse = total_sse(kernels, skcb) / n
            row += f" {sk_t:>9.2f} {sk_t / warm:>7.1f}x {mse:>11.4e} {sk_mse:>11.4e} {mse / sk_mse:>9.4f}"
        else:
            row += f" {'-':>9} {'-':>8} {mse:>11.4e} {'-':>11} {'-':>9}"
        print(row, flush=True)
    print("\nMSE ratio < 1: sqjax's codebooks have lower distortion than scikit-learn's.")


if __name__ == "__main__":
    main()
