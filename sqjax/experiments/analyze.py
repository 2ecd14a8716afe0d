"""``sqjax analyze``: the score-level analysis of every precision against FP32 (drift,
flips, knee, calibration), its files and its table."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import ml_collections
import numpy as np

from sqjax import fileio, prepare
from sqjax.experiments.precisions import all_precision_scores, with_data
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
    result = scores.score_analysis(s, llrs, labels, names, threshold=threshold)
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
    """One table: per precision its metrics, mean |drift| and flips at the FP32 theta."""
    f = lambda v, spec: "-" if v is None else format(v, spec)
    rows = [("precision", "EER", "minDCF.01", "minDCF.05", "actDCF.01", "Cllr", "|drift|")]
    rows[0] += ("harmful", "benefit")
    for name in result["precisions"]:
        r = result["per_precision"][name]
        m = r["metrics"]
        rows.append(
            (
                name,
                f(m["eer"], ".4f"),
                f(m["min_dcf@0.01"], ".4f"),
                f(m["min_dcf@0.05"], ".4f"),
                f(m.get("act_dcf@0.01"), ".4f"),
                f(m.get("cllr"), ".3f"),
                f(r["drift"]["all"]["mean_abs"], ".4f"),
                str(r["flips"]["harmful"]),
                str(r["flips"]["beneficial"]),
            )
        )
    theta = result["theta"]
    lines = [format_table(rows)]
    lines.append(f"theta = FP32 {theta['kind']} threshold {f(theta['value'], '.4f')}")
    lines += [f"knee of {key}: {k['statement']}" for key, k in result["knee"].items()]
    return "\n".join(lines)
