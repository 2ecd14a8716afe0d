"""``sqjax analyze``: the score-level analysis of every precision against FP32 (drift,
flips, knee, calibration), its files and its table."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import ml_collections
import numpy as np

from sqjax import fileio, prepare
from sqjax.experiments.precisions import (
    all_precision_scores,
    interval_level,
    trial_bootstrap,
    with_data,
)
from sqjax.tables import format_table
from sqjax.workdir import atomic_write, write_json

log = logging.getLogger("sqjax")


def analyze(
    config: ml_collections.ConfigDict,
    variables: dict,
    out: str | Path,
    *,
    data: str = "",
    trials: str = "",
    cal_data: str = "",
    cal_trials: str = "",
    threshold: str = "eer",
    p_cal: float = 0.05,
) -> dict:
    """The score-level analysis of the precisions in ``variables`` (``{"fp32": ...,
    "<b>bit": ...}``) on the config's test trials (or ``data``/``trials``).

    Scores are calibrated per precision on the calibration trials (the config's, or
    ``cal_data``/``cal_trials``; skipped when there are none). Writes to ``out``:
    ``scores.npz`` (precisions, scores (P, T), llrs (P, T), labels, enroll, test),
    ``score_analysis.json`` and ``figures/*.png``; returns the analysis.
    """
    from sqjax.analysis import calibration, plots, scores

    config = with_data(config, data, trials, cal_data, cal_trials)
    names = list(variables)
    split = prepare.test_data(config)
    labels = split.trials.labels
    log.info("scoring %d trials under %s", len(labels), ", ".join(names))
    s = all_precision_scores(config, variables, split)
    cal_split = prepare.calibration_data(config)
    llrs, cal = None, None
    if cal_split is None:
        log.warning("no calibration trials (config.data.cal): actDCF and Cllr are skipped")
    else:
        cal = calibration.calibrate(
            all_precision_scores(config, variables, cal_split), cal_split.trials.labels, p_cal
        )
        llrs = cal.apply(s).astype(np.float32)
    boot = trial_bootstrap(config, split)
    log.info("intervals: %d %s resamples", boot.n_resamples, boot.level)
    result = scores.score_analysis(
        s, llrs, labels, names, threshold=threshold, boot=boot, level=interval_level(config)
    )
    result["calibration"] = None if cal is None else cal.to_dict()
    result["trials"] = {"data": config.data.test, "trials": config.data.test_trials}

    out = fileio.local_dir(out, "out")
    if jax.process_index() == 0:
        arrays = {
            "precisions": np.array(names),
            "scores": s,
            "llrs": llrs if llrs is not None else np.full_like(s, np.nan),
            "labels": labels,
            "enroll": np.array(split.trials.enroll),
            "test": np.array(split.trials.test),
        }
        atomic_write(out / "scores.npz", lambda f: np.savez(f, **arrays))
        fig = out / "figures"
        fig.mkdir(parents=True, exist_ok=True)
        plots.plot_degradation(result, fig / "degradation.png")
        plots.plot_drift_histograms(s, labels, names, fig / "drift.png")
        plots.plot_flip_concentration(result, fig / "flips.png")
        plots.plot_det(s, labels, names, fig / "det.png")
        if llrs is not None:
            rel = {n: calibration.reliability(llrs[p], labels) for p, n in enumerate(names)}
            plots.plot_reliability(rel, fig / "reliability.png")
        write_json(out / "score_analysis.json", result)  # last: marks the output complete
    return result


def format_analysis(result: dict) -> str:
    """One table: per precision its metrics (EER with its interval and its paired
    difference to FP32), mean |drift| and flips at the FP32 theta."""
    from sqjax.analysis.uncertainty import format_ci

    f = lambda v, spec: "-" if v is None else format(v, spec)
    ci = "eer_ci" in result["per_precision"][result["fp32"]]["metrics"]
    rows = [("precision", "EER [95% CI]" if ci else "EER")]
    rows[0] += ("EER - FP32 [95% CI]",) if ci else ()
    rows[0] += ("minDCF.01", "minDCF.05", "actDCF.01", "Cllr", "|drift|", "harmful", "benefit")
    rows[0] += ("McNemar p",) if ci else ()
    for name in result["precisions"]:
        r = result["per_precision"][name]
        m = r["metrics"]
        row = (name, format_ci(m["eer"], m["eer_ci"]) if ci else f(m["eer"], ".4f"))
        if ci:
            row += (format_ci(m["delta_eer"], m["delta_eer_ci"], "+.4f"),)
        row += (
            f(m["min_dcf@0.01"], ".4f"),
            f(m["min_dcf@0.05"], ".4f"),
            f(m.get("act_dcf@0.01"), ".4f"),
            f(m.get("cllr"), ".3f"),
            f(r["drift"]["all"]["mean_abs"], ".4f"),
            str(r["flips"]["harmful"]),
            str(r["flips"]["beneficial"]),
        )
        if ci:
            tests = r.get("flip_tests")
            row += (
                "-"
                if tests is None or name == result["fp32"]
                else f(tests["mcnemar"]["p_value"], ".2g"),
            )
        rows.append(row)
    theta = result["theta"]
    lines = [format_table(rows)]
    lines.append(f"theta = FP32 {theta['kind']} threshold {f(theta['value'], '.4f')}")
    lines += [f"knee of {key}: {k['statement']}" for key, k in result["knee"].items()]
    stab = result.get("knee_stability")
    if stab is not None:
        b = result["uncertainty"]["bootstrap"]
        for key in ("eer", "mean_abs_drift"):
            shares = ", ".join(f"{w}: {v:.0%}" for w, v in stab[key]["share"].items())
            lines.append(f"knee of {key} over {stab['n']} {b['level']} resamples: {shares}")
        lines.append(
            f"intervals: {result['uncertainty']['level']:.0%} {result['uncertainty']['method']}"
            f", {b['n_resamples']} resamples of {b['n_units']} {b['level']}s"
        )
    return "\n".join(lines)
