"""The quantization study: FP32 training, QAT fine-tuning at each bit width, and the
score-level analysis of every precision against FP32.

Each width is its own run directory (``sqjax.runs``); a study grows by adding widths.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import ml_collections
import numpy as np

from sqjax import evaluate, prepare, quant, runs, train
from sqjax.tables import format_table
from sqjax.workdir import atomic_write, load_run_config, write_json

log = logging.getLogger("sqjax")


def qat_run_config(
    config: ml_collections.ConfigDict, bits: int, init_from: str | Path
) -> ml_collections.ConfigDict:
    """The config of one width's QAT run: the study's ``quant`` training settings become
    its ``train`` settings. Study-level settings (``bits_list``) are not part of it, so a
    study can add widths and its runs still resume."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.quant.bits, c.quant.init_from, c.quant.bits_list = bits, str(init_from), ()
    c.train.num_steps, c.train.learning_rate = c.quant.num_steps, c.quant.learning_rate
    c.train.warmup_steps, c.head.margin_warmup_steps = c.quant.warmup_steps, 0
    c.eval.baseline = False
    return c


def quantization_study(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, dict]:
    """FP32 training (unless ``config.quant.init_from`` names a trained run), then QAT
    fine-tuning from it at each width in ``config.quant.bits_list``, each in its own
    sub-run ``workdir/<b>bit``. Returns ``{"fp32": metrics, "<b>bit": metrics, ...}``,
    also written to ``workdir/study.json``. Finished runs are not trained again."""
    workdir = Path(workdir)
    q = config.quant
    rows = {}
    if q.init_from:
        init_from = Path(q.init_from)
        metrics_file = init_from / "metrics_test.json"
        if not metrics_file.exists():
            raise FileNotFoundError(
                f"config.quant.init_from={init_from}: no {metrics_file.name}; "
                f"score the run first: sqjax eval --workdir {init_from}"
            )
        rows["fp32"] = json.loads(metrics_file.read_text())
    else:
        init_from = workdir / "fp32"
        fp32 = ml_collections.ConfigDict(config.to_dict())
        fp32.quant.bits, fp32.quant.bits_list = 0, ()
        rows["fp32"] = runs.train_and_evaluate(fp32, init_from)
    for bits in q.bits_list:
        sub = workdir / f"{bits}bit"
        rows[f"{bits}bit"] = runs.train_and_evaluate(qat_run_config(config, bits, init_from), sub)
    write_json(workdir / "study.json", rows)
    return rows


# ------------------------------------------------------------------ score-level analysis


def _bits_of_run(path: Path) -> int:
    return int(path.name.removesuffix("bit"))


def study_precisions(study_dir: str | Path) -> tuple[ml_collections.ConfigDict, dict]:
    """``(config, {name: variables})`` of a ``sqjax qat`` study: its FP32 run (``fp32/`` or
    the runs' ``init_from``) and every ``<b>bit`` QAT run, widest first."""
    study_dir = Path(study_dir)
    subs = sorted(
        (p for p in study_dir.glob("*bit") if (p / "config.json").exists()),
        key=_bits_of_run,
        reverse=True,
    )
    if not subs:
        raise FileNotFoundError(
            f"{study_dir}: no <b>bit run directories; is it a `sqjax qat` study directory?"
        )
    fp32_dir = Path(load_run_config(subs[0]).quant.init_from)
    config, state, _ = runs.restore_run(fp32_dir)
    out = {"fp32": evaluate.encoder_variables(state)}
    for sub in subs:
        _, state, quantizer = runs.restore_run(sub)
        out[sub.name] = evaluate.encoder_variables(state, quantizer)
    return config, out


def ptq_precisions(workdir: str | Path, bits_list) -> tuple[ml_collections.ConfigDict, dict]:
    """``(config, {name: variables})``: a trained FP32 run and its post-training
    quantization at each width of ``bits_list``."""
    config, state, quantizer = runs.restore_run(workdir)
    if quantizer is not None:
        raise ValueError(f"{workdir} is a QAT run ({config.quant.bits} bits): give an FP32 run")
    out = {"fp32": evaluate.encoder_variables(state)}
    for bits in sorted(bits_list, reverse=True):
        out[f"{bits}bit"] = runs.ptq_variables(config, state, bits)
    return config, out


def all_precision_scores(config, variables: dict, split: prepare.Split) -> np.ndarray:
    """Cosine scores ``(P, T)`` of ``split``'s trials under every precision, from one
    batched embedding pass over the stacked models."""
    stacked = quant.stack_precisions(list(variables.values()))
    emb = evaluate.extract_embeddings_all(
        evaluate.precision_embed(train.build_encoder(config)),
        stacked,
        split.feats,
        batch_size=config.eval.batch_size,
        max_frames=config.eval.max_frames,
    )
    enroll, test = evaluate.trial_indices(split.corpus.utts, split.trials.enroll, split.trials.test)
    return np.stack([evaluate.cosine_scores(e, enroll, test) for e in emb]).astype(np.float32)


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

    config = ml_collections.ConfigDict(config.to_dict())
    if data or trials:
        if not (data and trials):
            raise ValueError("give both --data and --trials (or neither, for the run's test set)")
        config.data.test, config.data.test_trials = data, trials
    if cal_data or cal_trials:
        if not (cal_data and cal_trials):
            raise ValueError("give both --cal-data and --cal-trials")
        config.data.cal, config.data.cal_trials = cal_data, cal_trials
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

    out = Path(out)
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
        write_json(out / "score_analysis.json", result)
        fig = out / "figures"
        fig.mkdir(parents=True, exist_ok=True)
        plots.plot_degradation(result, fig / "degradation.png")
        plots.plot_drift_histograms(s, labels, names, fig / "drift.png")
        plots.plot_flip_concentration(result, fig / "flips.png")
        plots.plot_det(s, labels, names, fig / "det.png")
        if llrs is not None:
            rel = {n: calibration.reliability(llrs[p], labels) for p, n in enumerate(names)}
            plots.plot_reliability(rel, fig / "reliability.png")
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
