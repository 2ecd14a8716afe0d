"""Training input paths side by side: cached features vs streamed audio (features and
augmentation on the device), in examples/s of whole training steps.

    python bench/bench_input.py                          # demo config, 40 steps each
    python bench/bench_input.py --config configs/demo.py --steps 60 --workers 0,2

Each variant trains ``--steps`` steps of the config in a fresh temporary work dir with
``sqjax.train.train`` (the real loop: Grain input, prefetch, jitted step) and reports the
median of the logged rates after the first log interval (which holds the compile). The
variants alternate order across ``--repeats`` so a noisy machine affects all alike.
The built-in corpus is generated and its features cached before timing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

VARIANTS = {
    "cache": {"data.input": "cache"},
    "stream": {"data.input": "stream"},
    "stream+aug": {
        "data.input": "stream",
        "data.augment.p_noise": 0.3,
        "data.augment.p_reverb": 0.3,
    },
}


def run(config_path: str, variant: str, steps: int, workers: int) -> float:
    from sqjax import prepare, train
    from sqjax.config import apply_overrides, load_config

    c = load_config(config_path)
    c.progress = False
    overrides = {**VARIANTS[variant], "train.num_steps": steps, "train.log_every": 10}
    overrides.update({"train.checkpoint_every": steps, "data.workers": workers})
    apply_overrides(c, [f"--config.{k}={v}" for k, v in overrides.items()])
    data = prepare.training_input(c)
    c.head.num_classes = data.n_speakers
    with tempfile.TemporaryDirectory() as tmp:
        train.train(c, Path(tmp) / "run", data)
        rows = [
            json.loads(r) for r in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()
        ]
    return statistics.median(r["examples_per_s"] for r in rows[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="configs/demo.py")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--workers", default="2", help="Grain workers of the stream variants, e.g. 0,2")
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args()

    import jax

    from sqjax import prepare
    from sqjax.config import load_config

    c = load_config(args.config)
    prepare.training_data(c)  # the corpus and its feature cache, outside the timing
    jobs = []
    for v in args.variants.split(","):
        for w in [0] if v == "cache" else [int(x) for x in args.workers.split(",")]:
            jobs.append((v, w))
    rates: dict[tuple[str, int], list[float]] = {j: [] for j in jobs}
    for r in range(args.repeats):
        for v, w in jobs if r % 2 == 0 else jobs[::-1]:
            rates[(v, w)].append(run(args.config, v, args.steps, w))
    print(f"# {args.config}, backend={jax.default_backend()}, {args.steps} steps per run")
    base = statistics.median(rates[jobs[0]])
    print(f"{'input':>12} {'workers':>7} {'examples/s':>10} {'vs ' + jobs[0][0]:>9}")
    for (v, w), xs in rates.items():
        m = statistics.median(xs)
        print(f"{v:>12} {w:>7} {m:10.1f} {m / base:9.2f}")


if __name__ == "__main__":
    main()
