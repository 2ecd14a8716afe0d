"""sqjax (XLA) against PyTorch on the same machine: training steps and embedding.

    pip install torch==2.13.0          # benchmark-only; the package never needs it
    python bench/bench_torch.py                             # demo model and ResNet34
    python bench/bench_torch.py --models resnet_demo --batches 32 --conv-slice 0,4,-1 --native 0

Both sides build the same network (a sqjax preset: stem, residual stages, statistics
pooling, embedding layer; an AAM-softmax head for training) on random 200-frame x 80-mel
inputs. Training: one SGD-with-momentum step, forward + backward + update. Embedding:
the inference forward pass (PyTorch in ``inference_mode``; sqjax's ``jitted_embed``) on
``--embed-frames`` frames. The sides take turns in two rounds of consecutive steps (each
round's first step untimed), so all see the same machine load; the table gives medians
of warm steps and the ratio sqjax/PyTorch in examples/s (above 1: sqjax is faster). ``--conv-slice`` times sqjax once per value of
``builders.conv_slice`` (examples per kernel-gradient slice; 0: the whole batch; -1: sized
per layer, the CPU default) and of ``--native`` (1: float32 kernel gradients by
``sqjax.cpu.native``'s C++ kernel, the CPU default where a compiler is found; 0: the slices)
and of ``--phased`` (1: strided convolutions' input gradients from stride-1 convolutions,
``sqjax.cpu.strided_input_grad``, the CPU default; 0: XLA's);
the step is compiled with ``models.training_compiler_options``, as ``train.train`` does.
``--winograd`` (3x3 stride-1 convolutions by Winograd, ``native.conv3x3``, in the forward
pass and the input gradient, of at least N channels: 1 for ``sqjax.cpu.conv.WINOGRAD_CHANNELS``,
the CPU default, or N; 0: none; in fused inference, 1 stands for
``sqjax.cpu.fused.WINOGRAD_INFERENCE_CHANNELS``). Embedding is timed with XLA's default options (a plain
``jax.jit``; sqjax's Winograd defaults), then as sqjax compiles it (``evaluate.jitted_embed``, with
``models.inference_compiler_options``) once per ``--winograd`` value (in inference too,
``sqjax.cpu.conv.WINOGRAD_INFERENCE``) and ``--fused`` value (1: each convolution with its
BatchNorm, residual and ReLU as one op, ``sqjax.cpu.conv_bn``, the CPU default; 0: Flax's
layers, ``sqjax.cpu.fused.FUSED_INFERENCE``).
``--cpu-devices 2`` runs sqjax data parallel over two simulated CPU devices (one per
core; the batch sharded over them, as ``sqjax --cpu-devices 2 train`` and sharded
evaluation do); PyTorch keeps its threads.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import time

import numpy as np


def torch_resnet(encoder, n_classes: int):
    """A PyTorch module computing ``encoder`` (a sqjax ``ResNet``) and an AAM head."""
    import torch
    from torch import nn

    def bn(c):
        return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)

    class Block(nn.Module):
        def __init__(self, cin, planes, stride, bottleneck):
            super().__init__()
            out = planes * (4 if bottleneck else 1)
            if bottleneck:
                self.body = nn.Sequential(
                    nn.Conv2d(cin, planes, 1, bias=False), bn(planes), nn.ReLU(),
                    nn.Conv2d(planes, planes, 3, stride, 1, bias=False), bn(planes), nn.ReLU(),
                    nn.Conv2d(planes, out, 1, bias=False), bn(out),
                )  # fmt: skip
            else:
                self.body = nn.Sequential(
                    nn.Conv2d(cin, planes, 3, stride, 1, bias=False), bn(planes), nn.ReLU(),
                    nn.Conv2d(planes, planes, 3, 1, 1, bias=False), bn(planes),
                )  # fmt: skip
            self.short = nn.Identity()
            if stride != 1 or cin != out:
                self.short = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), bn(out))
            self.out = out

        def forward(self, x):
            return torch.relu(self.body(x) + self.short(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            w, bottleneck = encoder.width, encoder.block == "bottleneck"
            self.stem = nn.Sequential(nn.Conv2d(1, w, 3, 1, 1, bias=False), bn(w), nn.ReLU())
            blocks, cin = [], w
            for i, n in enumerate(encoder.stage_sizes):
                for j in range(n):
                    blocks.append(Block(cin, w * 2**i, 2 if i and not j else 1, bottleneck))
                    cin = blocks[-1].out
            self.blocks = nn.Sequential(*blocks)
            freq = encoder.n_mels
            for _ in range(3):
                freq = (freq + 1) // 2
            self.embedding = nn.Linear(2 * cin * freq, encoder.embed_dim)
            self.head = nn.Parameter(torch.randn(n_classes, encoder.embed_dim) * 0.01)

        def embed(self, x):  # (B, T, F) -> (B, D)
            x = self.blocks(self.stem(x.transpose(1, 2).unsqueeze(1)))  # (B, C, F', T')
            x = x.flatten(1, 2)
            return self.embedding(torch.cat([x.mean(-1), torch.sqrt(x.var(-1) + 1e-5)], 1))

        def loss(self, x, labels, margin=0.2, scale=32.0):
            cos = nn.functional.normalize(self.embed(x)) @ nn.functional.normalize(self.head).T
            cos = cos.clamp(-1, 1)
            target = torch.cos(torch.acos(cos) + margin)
            onehot = nn.functional.one_hot(labels, cos.shape[1]).bool()
            return nn.functional.cross_entropy(scale * torch.where(onehot, target, cos), labels)

    return Net()


def _torch_train(net, opt, x, y) -> None:
    net.train()
    opt.zero_grad(set_to_none=True)
    net.loss(x, y).backward()
    opt.step()


def _torch_embed(net, x):
    import torch

    net.eval()
    with torch.inference_mode():
        return net.embed(x)


def _shardings():
    """(replicated, batch) shardings over every device (sqjax.train.make_mesh)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from sqjax import train

    mesh = train.make_mesh()
    return NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


class _JaxTrain:
    """One jitted sqjax train step per call, on a fixed batch (the state is donated),
    data parallel over every device."""

    def __init__(self, encoder, head, tx, x, y, n_frames):
        import jax

        from sqjax import builders, models, train

        replicated, batch = _shardings()
        state = builders.create_train_state(jax.random.key(0), encoder, head, tx, n_frames)
        self.state = jax.device_put(state, replicated)
        step = functools.partial(
            train.train_step, encoder=encoder, head=head, tx=tx, margin=0.2, margin_warmup_steps=0
        )
        options = models.training_compiler_options(encoder) or None  # as train.train
        self.step = jax.jit(step, donate_argnums=0, compiler_options=options)
        self.batch = jax.device_put({"feats": x, "labels": y.astype("int32")}, batch)

    def __call__(self) -> None:
        import jax

        self.state, metrics = self.step(self.state, self.batch)
        jax.block_until_ready(metrics)


def _jax_embed(embed, variables, x) -> None:
    import jax

    jax.block_until_ready(embed(variables, x))


def run(a) -> None:
    import jax
    import optax
    import torch

    from sqjax import evaluate, models
    from sqjax.cpu import conv as cpu_conv
    from sqjax.cpu import fused as cpu_fused
    from sqjax.cpu import native

    defaults = cpu_conv.WINOGRAD_CHANNELS, cpu_conv.WINOGRAD_INFERENCE, cpu_fused.FUSED_INFERENCE
    default_inference_channels = cpu_fused.WINOGRAD_INFERENCE_CHANNELS
    default_tile = cpu_conv.WINOGRAD_TILE
    a.tile = a.tile or str(default_tile)
    native_env = os.environ.get("SQJAX_NATIVE")

    def winograd_channels(value: str) -> int:  # --winograd: 0 none, 1 the default, else N
        return {"0": 1 << 30, "1": defaults[0]}.get(value) or int(value)

    torch.set_num_threads(a.threads or torch.get_num_threads())
    print(
        f"# jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); medians of "
        f"{a.steps} warm steps, alternating"
    )
    print(
        f"{'model':>12} {'what':>6} {'batch':>5} {'variant':>15} {'sqjax ex/s':>10} "
        f"{'torch ex/s':>10} {'ratio':>6}"
    )
    rng = np.random.default_rng(0)
    for name in a.models.split(","):
        encoder = models.build_encoder(name)
        net = torch_resnet(encoder, a.classes)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        head = models.AAMSoftmax(num_classes=a.classes)
        tx = optax.sgd(0.01, momentum=0.9, nesterov=True)
        for batch in (int(b) for b in a.batches.split(",")):
            x = rng.normal(size=(batch, a.n_frames, encoder.n_mels)).astype(np.float32)
            y = rng.integers(0, a.classes, batch)
            theirs_fn = functools.partial(_torch_train, net, opt, torch.from_numpy(x),
                                          torch.from_numpy(y))  # fmt: skip
            for examples, use_native, phased, winograd, tile in itertools.product(
                (int(c) for c in a.conv_slice.split(",")),
                a.native.split(","),
                a.phased.split(","),
                a.winograd.split(","),
                (int(t) for t in a.tile.split(",")),
            ):
                if use_native == "1" and not examples:
                    continue  # conv_slice 0: XLA's kernel gradients either way
                os.environ["SQJAX_NATIVE"] = use_native  # read when the step is traced
                cpu_conv.PHASED_INPUT_GRADS = phased == "1"  # also
                cpu_conv.WINOGRAD_CHANNELS = winograd_channels(winograd)
                cpu_conv.WINOGRAD_TILE = tile
                enc = models.build_encoder(name, conv_slice=examples)
                ours_fn = _JaxTrain(enc, head, tx, x, y, a.n_frames)
                ours, theirs = _alternate(ours_fn, theirs_fn, steps=a.steps)
                variant = f"slices {examples if examples >= 0 else 'auto'}"
                if use_native == "1" and native.available():
                    variant = "native"
                variant += "" if phased == "1" else ", xla dx"
                variant += {"0": ", no wino", "1": ""}.get(winograd, f", wino {winograd}")
                variant += "" if tile == default_tile or winograd == "0" else f", tile {tile}"
                print(
                    f"{name:>12} {'train':>6} {batch:>5} {variant:>15} {batch / ours:>10.1f} "
                    f"{batch / theirs:>10.1f} {theirs / ours:>6.2f}",
                    flush=True,
                )
            if native_env is None:  # as before the training variants
                os.environ.pop("SQJAX_NATIVE", None)
            else:
                os.environ["SQJAX_NATIVE"] = native_env
            xe = rng.normal(size=(batch, a.embed_frames, encoder.n_mels)).astype(np.float32)
            replicated, sharded = _shardings()
            args = (
                jax.device_put(evaluate.encoder_variables(ours_fn.state), replicated),
                jax.device_put(xe, sharded),
            )
            # a new function each time: jax reuses a function's trace
            apply = lambda enc=encoder: functools.partial(enc.apply, train=False)
            cpu_conv.WINOGRAD_CHANNELS, cpu_conv.WINOGRAD_INFERENCE, cpu_fused.FUSED_INFERENCE = (
                defaults
            )
            compiled = {"xla default": jax.jit(apply()).lower(*args).compile()}  # XLA's options
            for fused, winograd, tile in itertools.product(
                a.fused.split(","), a.winograd.split(","), (int(t) for t in a.tile.split(","))
            ):
                cpu_fused.FUSED_INFERENCE = fused == "1"  # read when traced
                cpu_conv.WINOGRAD_INFERENCE = winograd != "0"
                cpu_conv.WINOGRAD_CHANNELS = winograd_channels(winograd)
                cpu_fused.WINOGRAD_INFERENCE_CHANNELS = (  # what conv_bn reads
                    default_inference_channels if winograd == "1" else winograd_channels(winograd)
                )
                cpu_conv.WINOGRAD_TILE = tile
                variant = {"0": "sqjax, no wino", "1": "sqjax"}.get(winograd, f"wino {winograd}")
                variant += "" if fused == "1" else ", unfused"
                variant += "" if tile == default_tile or winograd == "0" else f", tile {tile}"
                compiled[variant] = models.jit_inference(apply()).lower(*args).compile()
            cpu_conv.WINOGRAD_CHANNELS, cpu_conv.WINOGRAD_INFERENCE, cpu_fused.FUSED_INFERENCE = (
                defaults
            )
            cpu_fused.WINOGRAD_INFERENCE_CHANNELS = default_inference_channels
            cpu_conv.WINOGRAD_TILE = default_tile
            *ours, theirs = _alternate(
                *(functools.partial(_jax_embed, c, *args) for c in compiled.values()),
                functools.partial(_torch_embed, net, torch.from_numpy(xe)),
                steps=a.steps,
            )
            for variant, t in zip(compiled, ours, strict=True):
                print(
                    f"{name:>12} {'embed':>6} {batch:>5} {variant:>15} {batch / t:>10.1f} "
                    f"{batch / theirs:>10.1f} {theirs / t:>6.2f}",
                    flush=True,
                )


def _alternate(*fns, steps: int, rounds: int = 2) -> list[float]:
    """Median seconds of each of ``fns`` over ``steps`` timed calls, taken in ``rounds``
    rounds of consecutive calls that each start with one untimed call. Each call runs
    after calls of the same kind, as in a training loop: a step right after the other
    framework's ran up to 1.6x slower here (ResNet34, batch 32: the kernel's page faults
    on the memory the other side had just released took 4-5x the system time)."""
    times = [[] for _ in fns]
    per_round = -(-steps // rounds)
    for _ in range(rounds):
        for fn, ts in zip(fns, times, strict=True):
            fn()
            for _ in range(per_round):
                tic = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - tic)
    return [float(np.median(ts)) for ts in times]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="resnet_demo,resnet34")
    p.add_argument("--batches", default="8,32", help="batch sizes")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--n-frames", type=int, default=200)
    p.add_argument("--embed-frames", type=int, default=300)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
    p.add_argument("--conv-slice", default="-1", help="sqjax conv_slice values (-1: per layer)")
    p.add_argument(
        "--native", default="1,0", help="1: kernel gradients by sqjax.cpu.native; 0: the slices"
    )
    p.add_argument(
        "--phased",
        default="1",
        help="1: strided input gradients from stride-1 convolutions (the CPU default); 0: XLA's",
    )
    p.add_argument(
        "--winograd",
        default="1",
        help="3x3 convolutions by Winograd from 1: sqjax.cpu.conv.WINOGRAD_CHANNELS channels (the "
        "default), N: N channels; 0: none",
    )
    p.add_argument(
        "--tile",
        default=None,
        help="Winograd's output tiles: 2 (F(2x2, 3x3)), 4 (F(4x4, 3x3)); default: "
        "sqjax.cpu.conv.WINOGRAD_TILE",
    )
    p.add_argument(
        "--fused",
        default="1",
        help="embedding: 1: convolution, BatchNorm, residual and ReLU as one op (the CPU "
        "default); 0: Flax's layers",
    )
    p.add_argument("--cpu-devices", type=int, default=1, help="simulated CPU devices for sqjax")
    a = p.parse_args()
    if a.cpu_devices > 1:  # before jax is imported
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={a.cpu_devices}"
    run(a)


if __name__ == "__main__":
    main()
