"""Training-step throughput and MFU (model FLOP utilisation) of an sqjax encoder on the
current backend (CPU, GPU or TPU).

    python bench/bench_mfu.py                          # ResNet34, bf16 on GPU/TPU, fp32 on CPU
    python bench/bench_mfu.py --model resnet_demo --batch 8 --steps 3     # a quick CPU check
    python bench/bench_mfu.py --batch 16 --json mfu.json                  # one TPU host
    python bench/bench_mfu.py --peak-tflops 197                           # an unlisted chip
    python bench/bench_mfu.py --input stream --augment 0.3    # as configs/resnet34*.py train
    python bench/bench_mfu.py --batch 16 --distributed        # on every host of a pod slice

It times the real ``sqjax.train.train_step`` (jitted with donated state, the batch
sharded over every device of ``sqjax.train.make_mesh()``, global batch = ``--batch`` x
device count), as ``sqjax train`` runs it: on random features (``--input cache``) or on
random audio crops whose log-mel and augmentation are computed inside the step
(``--input stream``, ``sqjax.train.stream_input``, synthetic noise and impulse-response
banks). Step time is the median of ``--steps`` warm steps, each blocked on.

FLOPs per step come from XLA's cost analysis of the compiled step (per-device program x
device count; it counts every op, elementwise ones included) and, as a cross-check, from
the model's shapes: 2 FLOPs per conv/dense multiply-accumulate
(``sqjax.models.encoder_macs`` plus the AAM head), training ~3x the forward pass
(forward, input gradients, kernel gradients). That count is the model's only: streamed
input's FFTs and augmentation are in XLA's figure, not in it. MFU is the achieved FLOP/s
over the devices' peak: vendor figures by ``device_kind`` (``PEAKS`` below), or
``--peak-tflops``; on CPU the FLOP/s of a large float32 matmul measured here (a
"measured" peak, for the whole host). The embedding (inference) path is timed the same
way with ``sqjax.evaluate.jitted_embed``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time
from pathlib import Path

# Dense peak TFLOP/s per JAX device: (bf16, tf32, fp32); None where the chip has no such
# unit. Vendor data sheets list tensor-core figures "with sparsity": halved here.
#  - H100 SXM / PCIe / NVL, H200 SXM / NVL: NVIDIA H100 and H200 Tensor Core GPU data sheets
#    (nvidia.com/en-us/data-center/h100/, /h200/): BF16 1979* / 1513* / 1671*,
#    TF32 989* / 756* / 835*, FP32 67 / 51 / 60 (* with sparsity). H200 has H100's compute.
#  - A100 40/80 GB, SXM and PCIe: NVIDIA A100 data sheet: BF16 312, TF32 156, FP32 19.5.
#  - L4: NVIDIA L4 data sheet: BF16 242*, TF32 120*, FP32 30.3.
#  - T4: NVIDIA T4 data sheet: FP32 8.1 (FP16 tensor cores 65; no BF16 or TF32).
#  - V100 SXM2 / PCIe: NVIDIA V100 data sheet: FP32 15.7 / 14 (FP16 tensor 125 / 112;
#    no BF16 or TF32). Without bf16 units XLA computes bf16 convs in fp32: fp32 is the roof.
#  - TPU per chip (one JAX device per chip; v4 and v5p are megacore): Cloud TPU docs
#    (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e): BF16 275 (v4), 197 (v5e), 459 (v5p),
#    918 (v6e). No fp32 figure is published; at JAX's default precision float32 convs and
#    matmuls run as one bf16 pass of the MXU, so the bf16 figure is their roof too.
PEAKS: list[tuple[str, tuple[float | None, float | None, float | None]]] = [
    # (regex on device_kind, lower case; first match wins)
    (r"h100.*pcie", (756.0, 378.0, 51.0)),
    (r"h100.*nvl|h200.*nvl", (835.5, 417.5, 60.0)),
    (r"h100|h200|gh200", (989.5, 494.5, 67.0)),
    (r"a100", (312.0, 156.0, 19.5)),
    (r"\bl4\b", (121.0, 60.0, 30.3)),
    (r"\bt4\b", (None, None, 8.1)),
    (r"v100.*pcie", (None, None, 14.0)),
    (r"v100", (None, None, 15.7)),
    (r"tpu v4$", (275.0, None, None)),
    (r"tpu v5 ?lite|tpu v5e", (197.0, None, None)),
    (r"tpu v5p?$", (459.0, None, None)),
    (r"tpu v6 ?lite|tpu v6e", (918.0, None, None)),
]
VOXCELEB2_SPEAKERS = 5994  # the AAM head's classes in a VoxCeleb2 dev run


def vendor_peak(device_kind: str, dtype: str) -> tuple[float, str] | None:
    """``(peak FLOP/s per device, which figure)`` from ``PEAKS``, or None if unlisted.

    On GPUs float32 takes the TF32 figure where there is one: JAX's default precision lets
    XLA run float32 convs and matmuls in TF32 on Ampere and newer.
    """
    kind = device_kind.lower()
    for pattern, (bf16, tf32, fp32) in PEAKS:
        if not re.search(pattern, kind):
            continue
        if kind.startswith("tpu"):
            return bf16 * 1e12, "bf16 per chip (Cloud TPU docs)"
        if dtype == "bfloat16" and bf16 is not None:
            return bf16 * 1e12, "bf16 dense (data sheet)"
        if tf32 is not None:
            return tf32 * 1e12, "tf32 dense (data sheet; JAX's default float32 precision)"
        return fp32 * 1e12, "fp32 (data sheet)"
    return None


def measured_matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of the fastest of ``reps`` jitted float32 ``(n, n) @ (n, n)`` matmuls."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        tic = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - tic)
    return 2 * n**3 / best


def xla_flops(compiled) -> float | None:
    """FLOPs of a compiled program from XLA's cost analysis (per device for a sharded
    program); None where the backend gives none. A dict in recent JAX, a list of one dict
    per program in older ones."""
    import jax

    try:
        cost = compiled.cost_analysis()
    except (NotImplementedError, jax.errors.JaxRuntimeError) as e:  # backends without one
        print(f"# XLA cost analysis unavailable: {type(e).__name__}: {e}")
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    flops = cost.get("flops") if cost else None
    return float(flops) if flops and flops > 0 else None


def timed(compiled, args, steps: int, carry: bool) -> tuple[float, list[float]]:
    """``(first call s, warm step seconds)``: each step blocked on; with ``carry`` the
    first output (the donated train state) feeds the next step."""
    import jax

    def call(args):
        tic = time.perf_counter()
        out = compiled(*args)
        jax.block_until_ready(out)
        return out, time.perf_counter() - tic

    out, first = call(args)
    times = []
    for _ in range(steps):
        if carry:
            args = (out[0], *args[1:])
        out, dt = call(args)
        times.append(dt)
    return first, times


def bench(a: argparse.Namespace) -> dict:
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from sqjax import builders, evaluate, models, train
    from sqjax.config import default_config

    backend = jax.default_backend()
    on_cpu = backend == "cpu"
    dtype = a.dtype or ("float32" if on_cpu else "bfloat16")
    per_dev = a.batch or (8 if on_cpu else 32)
    mesh = train.make_mesh()
    n_dev = mesh.devices.size
    rep, shard = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    kind = jax.devices()[0].device_kind

    c = default_config()
    c.model.name, c.model.width, c.model.embed_dim = a.model, a.width, a.embed_dim
    c.model.n_mels, c.model.dtype = a.n_mels, dtype
    c.head.num_classes = a.classes
    c.train.batch_size, c.train.n_frames = per_dev * n_dev, a.frames
    c.train.conv_slice, c.train.microbatches = a.conv_slice, a.microbatches
    c.data.input = a.input
    c.data.augment.p_noise = c.data.augment.p_reverb = a.augment
    encoder, head, tx = (
        builders.build_encoder(c),
        builders.build_head(c),
        builders.make_optimizer(c),
    )
    b = c.train.batch_size

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(b, a.frames, a.n_mels)).astype(np.float32)
    labels = rng.integers(0, a.classes, b).astype(np.int32)
    # From a callback: every process supplies only its devices' rows (multi-host safe).
    put = lambda x: jax.make_array_from_callback(x.shape, shard, lambda i: x[i])
    batch = {"feats": put(feats), "labels": put(labels)}
    featurize, banks = None, {}
    if a.input == "stream":
        featurize, banks, n_samples = train.stream_input(c, a.frames)
        wave = (0.1 * rng.normal(size=(b, n_samples))).astype(np.float32)
        batch = {"wave": put(wave), "labels": put(labels)}
    banks = jax.device_put(banks, rep)
    create = lambda key: builders.create_train_state(key, encoder, head, tx, a.frames)
    state = jax.jit(create, out_shardings=rep)(jax.random.key(0))

    step = jax.jit(
        functools.partial(
            train.train_step,
            encoder=encoder,
            head=head,
            tx=tx,
            margin=c.head.margin,
            margin_warmup_steps=0,
            microbatches=a.microbatches,
            featurize=featurize,
        ),
        in_shardings=(rep, shard, rep),
        out_shardings=(rep, rep),
        donate_argnums=0,
        compiler_options=models.training_compiler_options(encoder) or None,
    )
    tic = time.perf_counter()
    compiled = step.lower(state, batch, banks).compile()
    compile_s = time.perf_counter() - tic
    flops_xla = xla_flops(compiled)
    first_s, times = timed(compiled, (state, batch, banks), a.steps, carry=True)
    del state
    step_s = statistics.median(times)

    # Analytic: 2 FLOPs per MAC; training = forward + input grads + kernel grads.
    enc_macs = models.encoder_macs(encoder, a.frames)
    head_macs = encoder.embed_dim * a.classes
    fwd_flops = 2 * (enc_macs + head_macs) * b
    train_flops = 3 * fwd_flops

    # Peak of the whole mesh.
    if a.peak_tflops:
        peak, peak_src = a.peak_tflops * 1e12 * n_dev, "--peak-tflops"
    elif on_cpu:
        peak = measured_matmul_peak(a.cpu_peak_n)
        peak_src = f"MEASURED: float32 {a.cpu_peak_n}^3 matmul on this host"
    elif found := vendor_peak(kind, dtype):
        peak, peak_src = found[0] * n_dev, found[1]
    else:
        peak, peak_src = None, f"unknown device_kind {kind!r}: pass --peak-tflops"

    r = {
        "backend": backend,
        "device_kind": kind,
        "devices": n_dev,
        "processes": jax.process_count(),
        "model": a.model,
        "width": encoder.width,
        "embed_dim": encoder.embed_dim,
        "dtype": dtype,
        "conv_slice": encoder.conv_slice,
        "batch_per_device": per_dev,
        "global_batch": b,
        "frames": a.frames,
        "n_mels": a.n_mels,
        "classes": a.classes,
        "input": a.input,
        "augment": a.augment,
        "compile_s": compile_s,
        "first_step_s": first_s,
        "step_s": step_s,
        "step_s_all": times,
        "train_examples_per_s": b / step_s,
        "flops_per_step_xla": None if flops_xla is None else flops_xla * n_dev,
        "flops_per_step_analytic": train_flops,
        "peak_flops": peak,
        "peak_source": peak_src,
    }
    r["flops_per_step"] = r["flops_per_step_xla"] or train_flops
    r["flops_source"] = "xla" if flops_xla else "analytic (XLA gave none)"
    r["xla_over_analytic"] = flops_xla and flops_xla * n_dev / train_flops
    r["achieved_flops"] = r["flops_per_step"] / step_s
    r["achieved_flops_analytic"] = train_flops / step_s
    r["mfu"] = peak and r["achieved_flops"] / peak
    r["mfu_analytic"] = peak and r["achieved_flops_analytic"] / peak

    if a.embed_steps:
        embed = evaluate.jitted_embed(encoder)
        variables = jax.jit(
            lambda key: encoder.init(key, jnp.zeros((1, a.frames, a.n_mels)), train=False),
            out_shardings=rep,
        )(jax.random.key(1))
        x = put(feats)
        compiled = embed.lower(variables, x).compile()
        _, times = timed(compiled, (variables, x), a.embed_steps, carry=False)
        embed_s = statistics.median(times)
        r["embed_step_s"] = embed_s
        r["embed_examples_per_s"] = b / embed_s
        r["embed_flops_analytic"] = 2 * enc_macs * b
        r["embed_mfu_analytic"] = peak and 2 * enc_macs * b / embed_s / peak
    return r


def report(r: dict) -> None:
    g = lambda x, unit=1e12, f="{:.2f}": "-" if x is None else f.format(x / unit)
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
    print(
        f"# {r['backend']} x{r['devices']} ({r['device_kind']}), {r['processes']} process(es); "
        f"{r['model']} width {r['width']} embed {r['embed_dim']} {r['dtype']}, "
        f"{r['frames']} frames x {r['n_mels']} mels, {r['classes']} classes, "
        f"conv_slice {r['conv_slice']}, input {r['input']} (augment {r['augment']})"
    )
    print(f"# peak {g(r['peak_flops'])} TFLOP/s: {r['peak_source']}")
    rows = [
        ("batch / device, global", f"{r['batch_per_device']}, {r['global_batch']}"),
        ("compile s, first step s", f"{r['compile_s']:.1f}, {r['first_step_s']:.2f}"),
        ("train step s (median)", f"{r['step_s']:.4f}  ({len(r['step_s_all'])} warm steps)"),
        ("train examples/s", f"{r['train_examples_per_s']:.1f}"),
        ("TFLOP/step XLA", g(r["flops_per_step_xla"], f="{:.4f}")),
        ("TFLOP/step analytic (3x fwd)", g(r["flops_per_step_analytic"], f="{:.4f}")),
        ("XLA / analytic", "-" if not r["xla_over_analytic"] else f"{r['xla_over_analytic']:.3f}"),
        (f"achieved TFLOP/s ({r['flops_source'][:8]})", g(r["achieved_flops"], f="{:.3f}")),
        ("MFU", pct(r["mfu"])),
        ("MFU analytic (conv/dense only)", pct(r["mfu_analytic"])),
    ]
    if "embed_step_s" in r:
        rows += [
            ("embed step s (median)", f"{r['embed_step_s']:.4f}"),
            ("embed examples/s", f"{r['embed_examples_per_s']:.1f}"),
            ("embed MFU analytic", pct(r["embed_mfu_analytic"])),
        ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet34", help="a preset of sqjax.models.PRESETS")
    p.add_argument("--width", type=int, default=0, help="0 = the preset's")
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--batch", type=int, default=0, help="per device; 0 = 32 (8 on CPU)")
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--n-mels", type=int, default=80)
    p.add_argument("--dtype", default="", choices=["", "float32", "bfloat16"],
                   help="'' = bfloat16 on GPU/TPU, float32 on CPU")  # fmt: skip
    p.add_argument("--classes", type=int, default=VOXCELEB2_SPEAKERS)
    p.add_argument("--input", default="cache", choices=["cache", "stream"],
                   help="features given, or computed from audio in the step")  # fmt: skip
    p.add_argument("--augment", type=float, default=0.0,
                   help="stream: p_noise = p_reverb (configs/resnet34.py: 0.3)")  # fmt: skip
    p.add_argument("--conv-slice", type=int, default=-1, help="config.train.conv_slice")
    p.add_argument("--microbatches", type=int, default=1)
    p.add_argument("--steps", type=int, default=10, help="warm training steps timed")
    p.add_argument("--embed-steps", type=int, default=0, help="0 = as --steps; -1 = skip")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="per device; overrides")
    p.add_argument("--cpu-peak-n", type=int, default=2048, help="CPU peak matmul size")
    p.add_argument("--json", default="", help="also write the results to this file")
    p.add_argument("--distributed", action="store_true",
                   help="multi-host: jax.distributed.initialize(); run on every host")  # fmt: skip
    a = p.parse_args()
    a.embed_steps = a.steps if a.embed_steps == 0 else max(a.embed_steps, 0)

    import jax

    if a.distributed:
        jax.distributed.initialize()
    r = bench(a)
    if jax.process_index() == 0:
        report(r)
        if a.json:
            Path(a.json).write_text(json.dumps(r, indent=1) + "\n")


if __name__ == "__main__":
    main()
