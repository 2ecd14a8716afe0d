"""All-precision embeddings in one pass: throughput of each ``precision_embed`` strategy.

    python bench/bench_precisions.py                      # demo 64x300, resnet34 4x150
    python bench/bench_precisions.py --models resnet34 --batch 16 --frames 300 --reps 9
    python bench/bench_precisions.py --models resnet_demo:width=8:embed_dim=128 \
        --env-sets ";XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false"

For each model: random FP32 variables (BatchNorm statistics perturbed so they matter),
PTQ at each of ``--bits`` (``quant.quantize_params``; 32 = the FP32 model itself), params
and batch_stats stacked on a leading precision axis, one random ``(batch, frames, 80)``
batch. Every strategy is compiled first (compile time printed apart), then timed in
``--reps`` rounds, each round calling every strategy once in a rotated order, so drift
from other load on the machine hits all strategies alike. Printed: median seconds per
call, throughput (utterances x precisions / s), the median over rounds of the loop's time
over the strategy's (speedup, > 1 is faster than the loop), XLA's temp buffer size of the
compiled program, the memory page-faulted per call (fresh pages the call touched), and the
largest deviation from the loop's embeddings relative to their scale.

Measured (2 shared CPU cores, jax 0.10.2, 5 precisions; x_loop over 3-6 runs): demo model
64 x 300: map 1.05-1.23, unroll 1.02-1.19, vmap 0.21-0.31; ResNet34 4 x 150 and 16 x 300:
map 0.95-1.07, unroll 0.87-0.99, vmap 0.16-0.19. The two folding variants were no faster
than ``unroll`` (``vmap_rule`` slower). The default run takes about 7 minutes (ResNet34 part: 2-3 minutes).
Since inference programs compile with XLA:CPU's YNNPACK fusions off
(``models.inference_compiler_options``; every strategy here), one default run gave: demo
map 1.08, unroll 1.02, vmap 0.41; ResNet34 map 0.98, unroll 0.95, vmap 0.62 (the loop
itself 1.7 s and 0.57 s per call).

Strategies: ``loop`` is ``jitted_embed`` called once per precision on variables sliced
beforehand (what a caller with P separate models does); ``vmap``, ``unroll``, ``map`` are
``sqjax.evaluate.precision_embed``. Two more, bench-only, test "fold the precision axis
into the computation": ``vmap_rule`` is ``vmap`` with a custom batching rule for every
convolution (shared input: one conv with the P kernels side by side on the output axis;
both batched: P plain convs), ``unroll_stem`` is ``unroll`` with the stem conv, whose
input all precisions share, run once for all P kernels.
"""

from __future__ import annotations

import argparse
import operator
import os
import resource
import statistics
import subprocess
import sys
import time


def parse_model(spec: str):
    name, *fields = spec.split(":")
    overrides = {}
    for f in fields:
        k, v = f.split("=")
        overrides[k] = int(v)
    return name, overrides


def conv_rule_interceptor(stem_only: bool, stacked_stem_kernel=None):
    """A Flax interceptor that runs every nn.Conv through a custom-batched convolution.

    ``stem_only``: used inside the unrolled program; the first precision's stem call
    computes all P stems in one conv (``stacked_stem_kernel``, (P, 3, 3, 1, C)) and later
    calls take their slice.
    """
    import flax.linen as nn
    import jax.numpy as jnp
    from jax import lax
    from jax.custom_batching import custom_vmap

    dn = ("NHWC", "HWIO", "NHWC")

    def plain(x, k, strides, padding):
        return lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=dn)

    def wide(x, k, strides, padding):
        # x (B, H, W, Cin) shared; k (P, kh, kw, Cin, C) -> one conv with P * C outputs.
        p, c = k.shape[0], k.shape[-1]
        kk = jnp.moveaxis(k, 0, -2).reshape(*k.shape[1:-1], p * c)
        y = plain(x, kk, strides, padding)
        return jnp.moveaxis(y.reshape(*y.shape[:-1], p, c), -2, 0)

    def batched_conv(strides, padding):
        @custom_vmap
        def conv(x, k):
            return plain(x, k, strides, padding)

        @conv.def_vmap
        def rule(axis_size, in_batched, x, k):
            xb, kb = in_batched
            if xb and kb:
                return jnp.stack(
                    [plain(x[p], k[p], strides, padding) for p in range(axis_size)]
                ), True
            if kb:
                return wide(x, k, strides, padding), True
            if xb:  # same kernel for all: fold the precision axis into the batch
                y = plain(x.reshape(-1, *x.shape[2:]), k, strides, padding)
                return y.reshape(axis_size, -1, *y.shape[1:]), True
            return plain(x, k, strides, padding), False

        return conv

    cache = {}

    def intercept(next_fun, args, kwargs, context):
        mod = context.module
        if context.method_name != "__call__" or not isinstance(mod, nn.Conv):
            return next_fun(*args, **kwargs)
        padding = mod.padding if isinstance(mod.padding, str) else tuple(mod.padding)
        strides = tuple(mod.strides)
        x = args[0]
        if stem_only:
            if mod.name != "stem_conv":
                return next_fun(*args, **kwargs)
            if "stem" not in cache:
                cache["stem"] = list(wide(x, stacked_stem_kernel, strides, padding))
            return cache["stem"].pop(0)
        return batched_conv(strides, padding)(x, mod.get_variable("params", "kernel"))

    return intercept


def bench_model(spec, batch, frames, bits, reps, strategies, seed=0):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sqjax import evaluate, models, quant

    name, overrides = parse_model(spec)
    encoder = models.build_encoder(name, **overrides)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, frames, encoder.n_mels)), jnp.float32)
    variables = jax.jit(encoder.init)(jax.random.key(seed), x[:1])
    # BatchNorm statistics that matter (a random network's ReLUs would all close under means
    # far from 0), so the max|diff| column tests something.
    variables["batch_stats"] = jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray(
            rng.normal(0, 0.2, s.shape) if path[-1].key == "mean" else rng.uniform(0.5, 2, s.shape),
            jnp.float32,
        ),
        variables["batch_stats"],
    )
    tic = time.perf_counter()
    per_precision = [
        variables
        if b == 32
        else {
            "params": quant.quantize_params(variables["params"], b),
            "batch_stats": variables["batch_stats"],
        }
        for b in bits
    ]
    ptq_s = time.perf_counter() - tic
    stacked = quant.stack_precisions(per_precision)
    n_p = len(bits)

    def with_rule(fn, stem_only):
        def apply(v, x):
            stem = v["params"]["stem_conv"]["kernel"] if stem_only else None
            with nn.intercept_methods(conv_rule_interceptor(stem_only, stem)):
                return fn(v, x)

        return apply

    def apply(v, x):
        return encoder.apply(v, x, train=False)

    def unroll(v, x):
        return jnp.stack([apply(jax.tree.map(operator.itemgetter(p), v), x) for p in range(n_p)])

    jitted = {
        "loop": evaluate.jitted_embed(encoder),  # compiled for one precision, called P times
        "vmap": evaluate.precision_embed(encoder, "vmap"),
        "unroll": evaluate.precision_embed(encoder, "unroll"),
        "map": evaluate.precision_embed(encoder, "map"),
        "vmap_rule": jax.jit(with_rule(jax.vmap(apply, in_axes=(0, None)), False)),
        "unroll_stem": jax.jit(with_rule(unroll, True)),
    }
    print(
        f"# {spec}: batch={batch} frames={frames} precisions={n_p} (bits {','.join(map(str, bits))})"
        f" backend={jax.default_backend()} PTQ {ptq_s:.1f}s"
    )
    fns, outs, compile_s, temp = {}, {}, {}, {}
    for k in ["loop", *strategies]:
        tic = time.perf_counter()
        compiled = jitted[k].lower(per_precision[0] if k == "loop" else stacked, x).compile()
        compile_s[k] = time.perf_counter() - tic
        mem = compiled.memory_analysis()  # None where the backend has none
        temp[k] = mem.temp_size_in_bytes / 2**20 if mem is not None else float("nan")
        if k == "loop":
            fns[k] = lambda _, x, c=compiled: [c(v, x) for v in per_precision]
        else:
            fns[k] = compiled
        outs[k] = np.stack(jax.block_until_ready(fns[k](stacked, x)))
    times = {k: [] for k in fns}
    faults = {k: [] for k in fns}
    for r in range(reps):
        order = list(fns)[r % len(fns) :] + list(fns)[: r % len(fns)]
        for k in order:
            flt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            tic = time.perf_counter()
            jax.block_until_ready(fns[k](stacked, x))
            times[k].append(time.perf_counter() - tic)
            faults[k].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - flt)
    print(
        f"{'strategy':>12} {'median_s':>9} {'utt*prec/s':>10} {'x_loop':>7} "
        f"{'compile_s':>9} {'temp_MiB':>8} {'faults_MiB':>10} {'rel_diff':>8}"
    )
    scale = np.abs(outs["loop"]).max()
    ratio_of = {}
    for k in fns:
        med = statistics.median(times[k])
        ratio_of[k] = statistics.median(a / b for a, b in zip(times["loop"], times[k]))
        diff = float(np.abs(outs[k] - outs["loop"]).max() / scale)
        fault_mib = statistics.median(faults[k]) * resource.getpagesize() / 2**20
        print(
            f"{k:>12} {med:>9.4f} {batch * n_p / med:>10.1f} {ratio_of[k]:>7.2f} "
            f"{compile_s[k]:>9.1f} {temp[k]:>8.1f} {fault_mib:>10.0f} {diff:>8.1e}"
        )
    spread = np.abs(outs["loop"] - outs["loop"][:1]).max(axis=(1, 2)) / scale
    print(f"# max relative difference of each precision to the first: {np.round(spread, 3)}")
    return ratio_of


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet_demo:width=8:embed_dim=128,resnet34")
    p.add_argument("--batch", default="64,4", help="one per model, or one for all")
    p.add_argument("--frames", default="300,150", help="one per model, or one for all")
    p.add_argument("--bits", default="8,4,3,2,1", help="32 = the FP32 model itself")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--strategies", default="vmap,unroll,map,vmap_rule,unroll_stem", help="besides loop"
    )
    p.add_argument(
        "--env-sets",
        default=None,
        help="';'-separated environments, each space-separated VAR=VALUE (empty = as is), "
        "e.g. ';XLA_FLAGS=--xla_cpu_use_onednn=true'; each runs in a subprocess, "
        "alternating, --rounds times",
    )
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    if a.env_sets is not None:
        argv = list(sys.argv[1:])
        i = argv.index("--env-sets")
        del argv[i : i + 2]
        for r in range(a.rounds):
            for env_set in a.env_sets.split(";"):
                env = dict(os.environ)
                env.update(kv.split("=", 1) for kv in env_set.split())
                print(f"## round {r} env: {env_set or '(as is)'}", flush=True)
                subprocess.run([sys.executable, __file__, *argv], env=env, check=True)
        return
    specs = a.models.split(",")

    def per_model(s, cast):
        vals = [cast(v) for v in s.split(",")]
        return vals * len(specs) if len(vals) == 1 else vals

    batches, frames = per_model(a.batch, int), per_model(a.frames, int)
    bits = [int(b) for b in a.bits.split(",")]
    for spec, b, t in zip(specs, batches, frames):
        bench_model(spec, b, t, bits, a.reps, a.strategies.split(","))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
