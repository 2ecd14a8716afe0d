"""Layer-wise analysis cost: seconds per variant, and the whole analysis extrapolated.

    python bench/bench_layers.py                                  # ResNet34, 300 x 3 s
    python bench/bench_layers.py --model resnet_demo --width 8 --embed-dim 128

Builds the model at random initialisation (the cost does not depend on the weights),
quantizes it at 2 bits, and embeds ``--utts`` random utterances of ``--frames`` frames
under ``--measure`` variants of the analysis (``layers.layer_choices``), through
``layers.embed_variants`` as ``sqjax layers`` does; then prints seconds per variant (after
a first, compiling chunk) and the time of the full analysis: 2 + 2L + G variants, plus the
mixed-precision prefixes (2 (L + 1)) on the calibration utterances (assumed as many).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from sqjax import evaluate, models, quant
from sqjax.analysis import layers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet34")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--utts", type=int, default=300)
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--measure", type=int, default=8, help="variants timed after the first chunk")
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()

    encoder = models.build_encoder(args.model, width=args.width, embed_dim=args.embed_dim)
    variables = jax.jit(lambda x: encoder.init(jax.random.key(0), x))(jnp.zeros((1, 200, 80)))
    ref = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    q = {**ref, "params": quant.quantize_params(ref["params"], 2)}
    bank = layers.variant_bank(ref, [q])
    groups = [m for _, _, m in layers.layer_groups(bank)]
    choices = layers.layer_choices(len(bank.paths), groups)
    chunk = layers.variant_chunk(bank)
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(args.frames, 80)).astype(np.float32) for _ in range(args.utts)]
    embed_all = evaluate.precision_embed(encoder)
    kw = {"batch_size": args.batch, "chunk": chunk}

    t0 = time.perf_counter()
    layers.embed_variants(embed_all, bank, choices[:chunk], feats, **kw)
    first = time.perf_counter() - t0
    n = max(chunk, args.measure // chunk * chunk)
    t0 = time.perf_counter()
    layers.embed_variants(embed_all, bank, choices[chunk : chunk + n], feats, **kw)
    per = (time.perf_counter() - t0) / n
    n_l = len(bank.paths)
    total = len(choices) + 2 * (n_l + 1)
    print(
        f"{args.model} width {args.width}: {n_l} quantized tensors, {len(choices)} analysis "
        f"variants + {2 * (n_l + 1)} mixes; chunk {chunk}; {args.utts} utts x {args.frames} frames"
    )
    print(
        f"  first chunk (compiles): {first:.1f} s; then {per:.2f} s per variant "
        f"({per / args.utts * 1e3:.1f} ms per utterance embedding)"
    )
    print(f"  whole analysis at one width: about {per * total / 60:.1f} min")


if __name__ == "__main__":
    main()
