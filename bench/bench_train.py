"""Training throughput (examples/s) of sqjax encoders on the current backend.

    python bench/bench_train.py                                  # demo model + resnet34
    python bench/bench_train.py --models resnet_demo:width=8:embed_dim=128 --qat-bits 2,8
    python bench/bench_train.py --models resnet_demo,resnet_demo:width=8 --batches 8,16,32 \
        --cpu-devices 1,2

Encoders take ``builders.conv_slice``'s CPU default (-1: kernel gradients by
``sqjax.cpu.native``, else slices sized per layer) unless the spec sets ``conv_slice=N``.
For each model and per-device batch size it times jitted ``train_step`` calls on random
200-frame inputs (median warm step; compile time reported apart), with the batch
sharded over every device. ``--qat-bits 2,8`` also times the QAT step (K-means
quantized forward, straight-through backward) and prints its ratio to the FP32 step. ``--cpu-devices 1,2`` reruns the table in subprocesses with that many simulated
CPU devices (data parallelism over cores), ``--microbatches`` accumulates gradients over
that many chunks per step. ``--xla-options sqjax,default`` times the FP32 step compiled
with each: "sqjax" as ``train.train`` compiles it (``models.training_compiler_options``),
"default" XLA's defaults, "off" YNNPACK's fusions off.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def bench(models_, batches, steps, microbatches, n_frames, n_classes, qat_bits, xla_options):
    import functools

    import jax
    import numpy as np
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from sqjax import builders, models, quant, train

    mesh = train.make_mesh()
    n_dev = mesh.devices.size
    rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    print(f"# backend={jax.default_backend()} devices={n_dev} microbatches={microbatches}")
    print(
        f"{'model':>34} {'precision':>12} {'batch/dev':>9} {'compile_s':>9} {'step_s':>8} "
        f"{'examples/s':>10} {'vs_fp32':>7}"
    )
    for spec in models_:
        # "resnet_demo:width=8:embed_dim=128" = a preset with overrides
        name, *kv = spec.split(":")
        # builders.conv_slice's CPU default (the native kernel gradients) unless the spec sets it
        over = {"conv_slice": models.AUTO_SLICE if jax.default_backend() == "cpu" else 0}
        over.update({k: int(v) for k, v in (x.split("=") for x in kv)})
        encoder = models.build_encoder(name, **over)
        head = models.AAMSoftmax(num_classes=n_classes)
        tx = optax.sgd(0.01, momentum=0.9)
        for per_dev in batches:
            b = per_dev * n_dev
            rng = np.random.default_rng(0)
            batch = jax.device_put(
                {
                    "feats": rng.normal(size=(b, n_frames, 80)).astype(np.float32),
                    "labels": rng.integers(0, n_classes, b).astype(np.int32),
                },
                shard,
            )
            fp32_dt = None
            variants = [(0, o) for o in xla_options] + [(b, xla_options[0]) for b in qat_bits]
            for bits, xla in variants:
                state = builders.create_train_state(jax.random.key(0), encoder, head, tx, n_frames)
                quantizer = None
                if bits:
                    quantizer = quant.kmeans_quantizer(quant.default_rules(bits))
                    state = state.replace(qstate=quantizer.init(state.params["encoder"]))
                state = jax.device_put(state, rep)
                step = jax.jit(
                    functools.partial(
                        train.train_step,
                        encoder=encoder,
                        head=head,
                        tx=tx,
                        margin=0.2,
                        margin_warmup_steps=0,
                        quantizer=quantizer,
                        microbatches=microbatches,
                    ),
                    in_shardings=(rep, shard),
                    out_shardings=(rep, rep),
                    donate_argnums=0,
                    compiler_options=_options(xla, encoder),
                )
                tic = time.perf_counter()
                state, m = step(state, batch)
                jax.block_until_ready(m)
                compile_s = time.perf_counter() - tic
                times = []
                for _ in range(steps):
                    tic = time.perf_counter()
                    state, m = step(state, batch)
                    jax.block_until_ready(m)  # one step at a time: see the note in train.py
                    times.append(time.perf_counter() - tic)
                dt = float(np.median(times))
                fp32_dt = fp32_dt or dt
                label = (f"{bits}bit" if bits else "fp32") + ("" if xla == "sqjax" else f" {xla}")
                print(
                    f"{spec:>34} {label:>12} {per_dev:>9} {compile_s:>9.1f} {dt:>8.3f} "
                    f"{b / dt:>10.1f} {dt / fp32_dt:>7.2f}",
                    flush=True,
                )
                del state


def _options(name, encoder):
    from sqjax import models

    ynn = "xla_cpu_experimental_ynn_fusion_type"
    if name == "sqjax":
        return models.training_compiler_options(encoder) or None
    return {"default": None, "off": {ynn: ""}}[name]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet_demo,resnet34")
    p.add_argument("--batches", default="8,16,32", help="per-device batch sizes")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--microbatches", type=int, default=1)
    p.add_argument("--n-frames", type=int, default=200)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--qat-bits", default="", help="e.g. 2,8: also time QAT steps at these widths")
    p.add_argument("--cpu-devices", default="", help="e.g. 1,2: one subprocess per count")
    p.add_argument("--xla-options", default="sqjax", help="sqjax, default, off (comma list)")
    a = p.parse_args()
    if a.cpu_devices:
        for n in a.cpu_devices.split(","):
            env = dict(
                os.environ,
                JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
            )
            argv = [
                f"--models={a.models}",
                f"--batches={a.batches}",
                f"--steps={a.steps}",
                f"--microbatches={a.microbatches}",
                f"--n-frames={a.n_frames}",
                f"--classes={a.classes}",
                f"--qat-bits={a.qat_bits}",
                f"--xla-options={a.xla_options}",
            ]
            subprocess.run([sys.executable, __file__, *argv], env=env, check=True)
        return
    bench(
        a.models.split(","),
        [int(x) for x in a.batches.split(",")],
        a.steps,
        a.microbatches,
        a.n_frames,
        a.classes,
        [int(x) for x in a.qat_bits.split(",") if x],
        a.xla_options.split(","),
    )


if __name__ == "__main__":
    main()
