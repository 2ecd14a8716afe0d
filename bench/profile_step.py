"""Where a training step's and an embedding's time goes on XLA:CPU, per kind of operation.

    python bench/profile_step.py                                   # demo model, batch 32
    python bench/profile_step.py --model resnet34 --width 32 --batch 8

Traces a few warm calls of sqjax's training step (``train.train_step`` on an SGD state,
the encoder built with ``--conv-slice``) and of the embedding (``evaluate.jitted_embed``)
with the JAX profiler and XLA:CPU's per-operation trace events, maps each event to its
operation in the compiled HLO, and sums the durations per step by kind:

    conv forward / conv input grad / conv kernel grad   convolutions (YNNPACK fusions,
                                    XLA's own, or sqjax.cpu.native's kernel-gradient custom
                                    calls), split by the op's JAX name and output shape
    winograd conv / direct conv     sqjax.cpu.native's 3x3 convolutions (with the BatchNorm
                                    bias, residual and ReLU in inference)
    transpose / copy                layout changes XLA inserts (around kernel gradients)
    reduce                          reductions (BatchNorm statistics, pooling)
    elementwise                     the other fusions: BatchNorm, ReLU, residual adds, the
                                    loss and the optimizer update
    untraced / idle                 wall time minus the traced operations: XLA's Eigen
                                    convolutions (they emit no trace events), the runtime's
                                    own work and waits (negative when operations ran side
                                    by side on the two cores)

The trace is this machine's; compare shares within one run, not absolute times.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import tempfile
import time

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
).strip()

import jax  # after XLA_FLAGS, read when jax starts its CPU backend
import jax.numpy as jnp
import numpy as np
import optax

from sqjax import builders, evaluate, models, train

# "  %name = f32[8,3,3,8]{3,2,1,0} fusion(...)" or a tuple "(f32[...]{...}, ...) fusion(...)"
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\([^=]*?\)|\S+) ([\w-]+)\((.*)$")


def _instructions(hlo: str) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """name -> (output shape, opcode, rest of the line) of each instruction in ``hlo``."""
    out = {}
    for line in hlo.splitlines():
        m = _INSTR.match(line)
        if m:
            dims = re.search(r"\[([\d,]*)\]", m.group(2))  # a tuple's first element
            shape = tuple(int(d) for d in dims.group(1).split(",") if d) if dims else ()
            out[m.group(1)] = (shape, m.group(3), m.group(4))
    return out


def _fused_bodies(hlo: str) -> dict[str, str]:
    """fused computation name -> its text."""
    bodies, name, lines = {}, None, []
    for line in hlo.splitlines():
        if line.startswith("%") and "{" in line:
            name, lines = line.split()[0][1:], []
        elif line.startswith("}") and name:
            bodies[name] = "\n".join(lines)
            name = None
        elif name:
            lines.append(line)
    return bodies


def _kind(name: str, instrs: dict, bodies: dict, kernel_shapes: set) -> str:
    shape, opcode, rest = instrs.get(name, ((), "", ""))
    body = ""
    m = re.search(r"calls=%([\w.\-]+)", rest)
    if m:
        body = bodies.get(m.group(1), "")
    if opcode == "custom-call" and "sqjax_conv_kernel_grad" in rest:  # sqjax.cpu.native
        return "conv kernel grad"
    if opcode == "custom-call" and "sqjax_conv3x3_winograd" in rest:
        return "winograd conv"
    if opcode == "custom-call" and "sqjax_conv3x3_direct" in rest:
        return "direct conv"
    is_conv = opcode == "convolution" or " convolution(" in body
    if is_conv:
        if shape in kernel_shapes:
            return "conv kernel grad"
        backward = "transpose(jvp(" in rest or "transpose(jvp(" in body
        return "conv input grad" if backward else "conv forward"
    if "transpose" in name or opcode in ("transpose", "copy") or name.startswith("copy"):
        return "transpose / copy"
    if "reduce" in name or " reduce(" in body or opcode == "reduce":
        return "reduce"
    return "elementwise"


def profile(fn, args, steps: int, kernel_shapes: set) -> tuple[float, dict, list]:
    """(wall ms per call, {kind: ms per call}, top operations) of jitted ``fn(*args)``."""
    hlo = fn.lower(*args).compile().as_text()
    instrs, bodies = _instructions(hlo), _fused_bodies(hlo)
    for _ in range(2):
        jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            tic = time.perf_counter()
            for _ in range(steps):
                jax.block_until_ready(fn(*args))
            wall = (time.perf_counter() - tic) / steps * 1e3
        (path,) = glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    per_op = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and e["name"] in instrs:
            per_op[e["name"]] += e["dur"] / 1e3 / steps
    kinds = collections.Counter()
    for name, ms in per_op.items():
        kinds[_kind(name, instrs, bodies, kernel_shapes)] += ms
    kinds["untraced / idle"] = wall - sum(kinds.values())
    top = [(ms, name, instrs[name][0]) for name, ms in per_op.most_common(8)]
    return wall, kinds, top


def report(title: str, wall: float, kinds: dict, top: list) -> None:
    traced = sum(ms for kind, ms in kinds.items() if kind != "untraced / idle")
    print(f"\n{title}: {wall:.0f} ms per call; traced operations {traced:.0f} ms (summed over")
    print("threads, so above the wall time when operations ran side by side)")
    for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1]):
        share = f"{100 * ms / traced:5.1f}% of traced" if kind != "untraced / idle" else ""
        print(f"  {kind:<18} {ms:8.1f} ms  {share}")
    print("  largest operations:")
    for ms, name, shape in top:
        print(f"    {ms:7.1f} ms  {name} {list(shape)}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet_demo")
    p.add_argument("--width", type=int, default=8, help="0: the preset's")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--n-frames", type=int, default=200)
    p.add_argument("--embed-frames", type=int, default=300)
    p.add_argument("--conv-slice", type=int, default=models.AUTO_SLICE)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args()
    over = {"width": a.width} if a.width else {}
    encoder = models.build_encoder(a.model, conv_slice=a.conv_slice, **over)
    head = models.AAMSoftmax(num_classes=1000)
    tx = optax.sgd(0.01, momentum=0.9, nesterov=True)
    state = builders.create_train_state(jax.random.key(0), encoder, head, tx, a.n_frames)
    kernel_shapes = {tuple(k.shape) for k in jax.tree.leaves(state.params) if k.ndim == 4}
    kernel_shapes |= {(s[2], s[0], s[1], s[3]) for s in list(kernel_shapes)}
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(a.batch, a.n_frames, encoder.n_mels)).astype(np.float32)
    batch = {"feats": jnp.asarray(feats), "labels": jnp.asarray(rng.integers(0, 1000, a.batch))}
    step = jax.jit(
        functools.partial(
            train.train_step, encoder=encoder, head=head, tx=tx, margin=0.2, margin_warmup_steps=0
        ),
        compiler_options=models.training_compiler_options(encoder) or None,  # as train.train
    )
    print(
        f"# jax {jax.__version__} ({jax.default_backend()}); {a.model} width {encoder.width}, "
        f"batch {a.batch}, conv_slice {a.conv_slice}; {a.steps} traced calls"
    )
    title = f"training step ({a.n_frames} frames)"
    report(title, *profile(step, (state, batch), a.steps, kernel_shapes))
    x = jnp.asarray(rng.normal(size=(a.batch, a.embed_frames, encoder.n_mels)), jnp.float32)
    embed = evaluate.jitted_embed(encoder)
    variables = evaluate.encoder_variables(state)
    title = f"embedding ({a.embed_frames} frames, evaluate.jitted_embed)"
    report(title, *profile(embed, (variables, x), a.steps, kernel_shapes))


if __name__ == "__main__":
    main()
