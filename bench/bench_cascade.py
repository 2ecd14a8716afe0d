"""Cascade speed: the analysis path on many trials, and the deployment path's wall time
against scoring everything in FP32.

    python bench/bench_cascade.py                         # analysis path only, synthetic
    python bench/bench_cascade.py --workdir runs/demo     # + deployment on a trained run

Part 1: decisions (and metrics) of 50 tau values on 1M synthetic trials of a 2 -> 4 -> 8
-> FP32 cascade, as array operations. Part 2 (``--workdir`` an FP32 run): PTQ stages of
that run on its test trials; the deployment path (``cascade.deploy``, lazy per-precision
embedding) at taus escalating about 0, 10, 25, 50 and 100% of the trials from the first
stage, each timed against embedding every test utterance with the FP32 model (both warm:
every shape compiled first). Median of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def bench_analysis(n_trials: int, n_taus: int, repeats: int) -> None:
    from sqjax.analysis import cascade

    rng = np.random.default_rng(0)
    y = rng.random(n_trials) < 0.1
    truth = 3.0 * y - 1.5
    llrs = np.stack([truth + rng.normal(size=n_trials) * s for s in (2.0, 1.2, 1.0, 0.9)])
    taus = cascade.line_taus(llrs, 0.0, n_taus)

    def timed(fn):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    t_dec = timed(lambda: cascade.decided_stage(llrs, 0.0, taus))
    t_all = timed(lambda: cascade.evaluate_cascades(llrs, y, 0.0, taus, [2, 4, 8, 32]))
    print(f"analysis path, {n_trials:,} trials x {n_taus} tau vectors, 4 stages:")
    print(f"  decisions only:                          {t_dec:7.2f} s")
    print(f"  decisions + EER, minDCF, actDCF, Cllr:   {t_all:7.2f} s")


def bench_deployment(workdir: str, repeats: int) -> None:
    from sqjax import builders, evaluate, prepare
    from sqjax.analysis import calibration, cascade
    from sqjax.experiments import precisions

    config, variables = precisions.ptq_precisions(workdir, (2, 4, 8))
    names = ["2bit", "4bit", "8bit", "fp32"]
    split = prepare.test_data(config)
    cal_split = prepare.calibration_data(config) or split
    stage_vars = {n: variables[n] for n in names}
    s_cal = precisions.all_precision_scores(config, stage_vars, cal_split)
    cal = calibration.calibrate(s_cal, cal_split.trials.labels)
    eta = 0.0
    embed = evaluate.jitted_embed(builders.build_encoder(config))
    kw = {"batch_size": config.eval.batch_size, "max_frames": config.eval.max_frames}
    feats = split.feats

    def stage_fn(v):
        return lambda ids: evaluate.extract_embeddings(embed, v, [feats[i] for i in ids], **kw)

    fns = [stage_fn(stage_vars[n]) for n in names]
    enroll, test = evaluate.trial_indices(split.corpus.utts, split.trials.enroll, split.trials.test)
    everyone = np.unique(np.concatenate([enroll, test]))
    fns[-1](everyone)  # compile every length rung
    s2 = precisions.all_precision_scores(config, {"2bit": stage_vars["2bit"]}, split)[0]
    margin = np.sort(np.abs(cal.a[0] * s2.astype(np.float64) + cal.b[0] - eta))
    fp32 = statistics.median(_time(lambda: fns[-1](everyone)) for _ in range(repeats))
    print(f"\ndeployment path, {workdir}: {len(enroll)} trials, {len(everyone)} utterances")
    print(f"  FP32 alone (embed all, warm): {fp32:.2f} s")
    print("  escalated from 2 bits | embedded 2/4/8/32      | wall s | / FP32 alone")
    for share in (0.0, 0.1, 0.25, 0.5, 1.0):
        k = min(int(share * len(margin)), len(margin) - 1)
        tau = np.inf if share >= 1 else (margin[k] + margin[min(k + 1, len(margin) - 1)]) / 2
        if share == 0:
            tau = 0.0
        taus = [tau, tau, tau]
        times, dep = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            dep = cascade.deploy(fns, list(zip(cal.a, cal.b)), eta, taus, enroll, test)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        esc = np.mean(dep["stage"] > 0)
        emb = "/".join(str(e) for e in dep["embedded"])
        print(f"  {esc:21.0%} | {emb:22s} | {t:6.2f} | {t / fp32:5.2f}x")


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=1_000_000)
    p.add_argument("--taus", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", default="", help="a trained FP32 run for the deployment part")
    args = p.parse_args()
    bench_analysis(args.trials, args.taus, args.repeats)
    if args.workdir:
        bench_deployment(args.workdir, args.repeats)


if __name__ == "__main__":
    main()
