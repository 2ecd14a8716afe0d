"""Layer-wise analysis cost, side by side: variants sharing their common front (the
default of ``sqjax layers``) against variants stacked and embedded whole.

    python bench/bench_layers.py                                  # ResNet34 width 32
    python bench/bench_layers.py --model resnet_demo --width 16 --embed-dim 128

Builds the model at random initialisation (the cost does not depend on the weights),
quantizes it at 2 bits and embeds ``--utts`` random utterances of ``--frames`` frames:

- shared: all ``2 + 2L + G`` variants of the analysis (``layers.layer_choices``) through
  ``layers.embed_variants(..., segments=models.encoder_segments(encoder))``;
- stacked: ``--measure`` of them through ``layers.embed_variants`` with the all-precision
  scorer (``evaluate.precision_embed``), in chunks of ``layers.variant_chunk``.

Each path runs once on one batch first (compiles, not timed). Prints seconds per
utterance for the whole variant set, the ratio, and the analysis time extrapolated to
``--target-utts`` test utterances, with the mixed-precision search's variant count (at
most; it is a grid and a bisection) against the old full prefix grid.
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
    p.add_argument("--utts", type=int, default=32, help="timed utterances (one batch: 32)")
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--measure", type=int, default=8, help="variants timed on the stacked path")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--target-utts", type=int, default=300)
    args = p.parse_args()

    encoder = models.build_encoder(args.model, width=args.width, embed_dim=args.embed_dim)
    variables = jax.jit(lambda x: encoder.init(jax.random.key(0), x))(jnp.zeros((1, 200, 80)))
    ref = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
    q = {**ref, "params": quant.quantize_params(ref["params"], 2)}
    bank = layers.variant_bank(ref, [q])
    groups = [m for _, _, m in layers.layer_groups(bank)]
    choices = layers.layer_choices(len(bank.paths), groups)
    segments = models.encoder_segments(encoder)
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(args.frames, 80)).astype(np.float32) for _ in range(args.utts)]
    chunk = layers.variant_chunk(bank)
    stacked = choices[: max(chunk, args.measure // chunk * chunk)]
    embed_all = evaluate.precision_embed(encoder)
    kw = {"batch_size": args.batch}

    layers.embed_variants(None, bank, choices, feats[:1], segments=segments, **kw)
    t0 = time.perf_counter()
    layers.embed_variants(None, bank, choices, feats, segments=segments, **kw)
    shared = (time.perf_counter() - t0) / args.utts
    layers.embed_variants(embed_all, bank, stacked[:chunk], feats[:1], chunk=chunk, **kw)
    t0 = time.perf_counter()
    layers.embed_variants(embed_all, bank, stacked, feats, chunk=chunk, **kw)
    whole = (time.perf_counter() - t0) / args.utts / len(stacked) * len(choices)

    n_l, n_v = len(bank.paths), len(choices)
    _, start = layers.shared_runs(layers.segment_keys(bank, segments, choices))
    runs, full = int(np.sum(len(segments) - start)), n_v * len(segments)
    grid = len({0, n_l, *(2**e for e in range(n_l.bit_length()) if 2**e < n_l)})
    mixes = 2 * grid + 1 + 2 * max(n_l // 2, 1).bit_length()  # two high widths
    print(
        f"{args.model} width {args.width}: {n_l} quantized tensors, {n_v} analysis variants, "
        f"{len(segments)} segments; {args.utts} utts x {args.frames} frames, batch {args.batch}"
    )
    print(f"  segment runs per batch: shared {runs} of {full} ({runs / full:.0%})")
    print(f"  all {n_v} variants, s per utterance: shared {shared:.2f}, stacked {whole:.2f}")
    print(f"  speed-up of sharing: {whole / shared:.2f}x")
    t = args.target_utts
    print(
        f"  analysis of {t} utterances: shared {shared * t / 60:.1f} min, stacked "
        f"{whole * t / 60:.1f} min; mixes at most {mixes} variants (was {2 * (n_l + 1)})"
    )


if __name__ == "__main__":
    main()
