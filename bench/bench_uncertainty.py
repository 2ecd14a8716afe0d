"""Speed of the speaker bootstrap: R resamples of P systems' EER and minDCF.

    python bench/bench_uncertainty.py                      # 100k and 1M trials
    python bench/bench_uncertainty.py --trials 100000 --resamples 1000 --systems 6

Goal (issue 27): 1,000 resamples, 6 systems, EER and minDCF within 3 s at 100k trials and
30 s at 1M trials on 2 cores. Beside it, a naive loop (one weighted trial list per
resample, scored by ``sqjax.metrics``, which sorts it) on a few resamples, scaled to R.
Synthetic scores: S speakers, half target trials, Gaussian scores.

    python bench/bench_uncertainty.py --analyses 37720,579818 --speakers 40,1251

times the analyses that ``sqjax analyze`` and ``sqjax cascade`` run on the scores, with
their intervals, at VoxCeleb1-O and VoxCeleb1-E sizes (6 precisions, 4 cascade stages;
embedding the utterances is not included).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from sqjax import metrics
from sqjax.analysis import uncertainty


def _trial_list(n_trials: int, n_speakers: int, n_systems: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, n_speakers, n_trials)
    y = rng.random(n_trials) < 0.5
    b = np.where(y, a, (a + 1 + rng.integers(0, n_speakers - 1, n_trials)) % n_speakers)
    scores = rng.normal(2.0 * y, 1.0, (n_systems, n_trials))
    return scores, y, a, b


def _naive(boot, scores, y, n: int) -> float:
    """Seconds per resample of the plain way: weights applied by repetition, then each
    system scored from scratch (a sort per resample and system)."""
    ext = np.concatenate([boot.counts, np.ones((boot.n_resamples, 1), np.int32)], axis=1)
    t0 = time.perf_counter()
    for r in range(n):
        w = ext[r, boot.unit_a] * ext[r, boot.unit_b]
        yy = np.repeat(y, w)
        for row in scores:
            ss = np.repeat(row, w)
            metrics.eer(ss, yy)
            metrics.min_dcf(ss, yy, 0.01)
            metrics.min_dcf(ss, yy, 0.05)
    return (time.perf_counter() - t0) / n


def _time_analyses(args) -> None:
    from sqjax.analysis import cascade, scores

    names = ["fp32", "8bit", "4bit", "3bit", "2bit", "1bit"]
    noise = np.array([0.0, 0.02, 0.05, 0.1, 0.4, 1.2])[:, None]
    speakers = [int(s) for s in args.speakers.split(",")]
    print(f"{'trials':>9} {'speakers':>8}  {'analyze s':>9}  {'cascade s':>9}")
    for t, n_spk in zip((int(x) for x in args.analyses.split(",")), speakers):
        s, y, a, b = _trial_list(t, n_spk, 1)
        rng = np.random.default_rng(1)
        rows = s + noise * rng.normal(size=(len(names), t))
        t0 = time.perf_counter()
        boot = uncertainty.bootstrap(y, a, b, n_resamples=args.resamples)
        scores.score_analysis(rows, 0.9 * rows - 1.0, y, names, boot=boot)
        t1 = time.perf_counter()
        stages = rows[[4, 2, 1, 0]]  # 2 -> 4 -> 8 -> FP32
        per = {"macs": np.ones(4), "bitops": np.array([2.0, 4, 8, 32]), "bytes": np.ones(4)}
        idx = np.arange(t)
        cascade.cascade_analysis(stages, y, stages, y, ["2bit", "4bit", "8bit", "fp32"], per,
                                 enroll=idx, test=idx + t, boot=boot)  # fmt: skip
        t2 = time.perf_counter()
        print(f"{t:>9,} {n_spk:>8}  {t1 - t0:>9.1f}  {t2 - t1:>9.1f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--trials", default="100000,1000000", help="comma-separated trial counts")
    p.add_argument("--speakers", default="300,1251", help="speakers per trial count")
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--systems", type=int, default=6)
    p.add_argument("--naive", type=int, default=3, help="resamples timed the naive way")
    p.add_argument(
        "--analyses",
        default="",
        help="time score_analysis + cascade_analysis at "
        "these trial counts instead (comma-separated)",
    )
    args = p.parse_args()
    if args.analyses:
        return _time_analyses(args)
    trials = [int(t) for t in args.trials.split(",")]
    speakers = [int(s) for s in args.speakers.split(",")]
    # compile the kernels outside the timings
    s, y, a, b = _trial_list(2000, 20, 2)
    uncertainty.resample_metrics(uncertainty.bootstrap(y, a, b, n_resamples=2), s, y)

    print(
        f"{'trials':>9} {'speakers':>8} {'R':>5} {'P':>2}  {'bootstrap s':>11}  "
        f"{'naive s (est.)':>14}  {'speed-up':>8}"
    )
    for t, n_spk in zip(trials, speakers):
        s, y, a, b = _trial_list(t, n_spk, args.systems)
        t0 = time.perf_counter()
        boot = uncertainty.bootstrap(y, a, b, n_resamples=args.resamples)
        uncertainty.resample_metrics(boot, s, y, p_targets=(0.01, 0.05))
        fast = time.perf_counter() - t0
        naive = _naive(boot, s, y, args.naive) * args.resamples
        print(
            f"{t:>9,} {n_spk:>8} {args.resamples:>5} {args.systems:>2}  {fast:>11.2f}  "
            f"{naive:>14.1f}  {naive / fast:>7.0f}x",
            flush=True,
        )


if __name__ == "__main__":
    main()
