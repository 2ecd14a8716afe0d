"""``sqjax cascade``: the calibrated multi-precision cascade of a run's precisions, its
cost account and the check of the deployment path."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import jax
import ml_collections
import numpy as np

from sqjax import builders, evaluate, fileio, metrics, models, prepare, quant, uniform
from sqjax.experiments.precisions import (
    all_precision_scores,
    interval_level,
    trial_bootstrap,
    with_data,
)
from sqjax.tables import format_table
from sqjax.workdir import atomic_write, write_json

log = logging.getLogger("sqjax")


def stage_names(stages: Sequence[int]) -> list[str]:
    """``--stages 2,4,8,32`` as precision names: ["2bit", "4bit", "8bit", "fp32"]."""
    if len(stages) < 2 or list(stages) != sorted(set(stages)):
        raise ValueError(f"--stages: give 2+ increasing widths like 2,4,8,32, got {stages}")
    if any(not (1 <= b <= 8 or b == 32) for b in stages):
        raise ValueError(f"--stages: widths are 1..8 or 32 (FP32), got {stages}")
    return ["fp32" if b == 32 else f"{b}bit" for b in stages]


def model_bytes(config, variables: dict, bits: int | None) -> int:
    """Packed storage of one model: quantized leaves as indices + codebooks, or a uniform
    grid's scales and zero points (the rules and method of ``builders.build_quantizer`` at
    ``bits``), everything else (BatchNorm too) float32."""
    total = 32 * sum(np.size(x) for x in jax.tree.leaves(variables.get("batch_stats", {})))
    if bits is None:
        total += 32 * sum(np.size(x) for x in jax.tree.leaves(variables["params"]))
    else:
        rules = builders.build_quantizer(config, bits).rules
        q = config.quant
        group = uniform.group_bits(q.symmetric) if q.get("method") == "uniform" else None
        for p in quant.plan(variables["params"], rules):
            total += quant.packed_bits(p.size, p.bits, p.n_codebooks, group)
    return total // 8


def run_cascade(
    config: ml_collections.ConfigDict,
    variables: dict,
    stages: Sequence[int],
    out: str | Path,
    *,
    data: str = "",
    trials: str = "",
    cal_data: str = "",
    cal_trials: str = "",
    metric: str = "eer",
    tolerance: float = 0.05,
    eta: str | float = "eer",
    cost: str = "bitops",
    p_cal: float = 0.05,
    grid: int = 10,
) -> dict:
    """The calibrated multi-precision cascade over ``stages`` (widths, 32 = FP32) of the
    precisions in ``variables`` (``{"fp32": ..., "<b>bit": ...}``).

    Scores every stage on the calibration and test trials in one batched pass each,
    calibrates each stage on the calibration trials, picks the cheapest tau vector (in
    ``cost`` per trial) whose ``metric`` on the calibration trials is within
    ``tolerance`` (relative) of FP32's -- the test labels are never used for it -- and
    reports it on the test trials, beside the test-optimal choice, each precision alone
    and a curve of one shared tau. Then runs the deployment path on the test trials with
    the chosen taus and checks it makes the same decisions.

    Writes ``cascade.json``, ``cascade_curve.csv`` and ``figures/cascade_*.png`` to
    ``out``; returns the result.
    """
    from sqjax.analysis import calibration, cascade, plots

    cascade.check_options(metric, tolerance, cost)
    names = stage_names(stages)
    missing = [n for n in names if n not in variables]
    if missing:
        raise ValueError(f"--stages: no model for {missing}; there are {list(variables)}")
    stage_vars = {n: variables[n] for n in names}
    config = with_data(config, data, trials, cal_data, cal_trials)
    split, cal_split = prepare.test_data(config), prepare.calibration_data(config)
    if cal_split is None:
        raise ValueError(
            "the cascade needs calibration trials: set config.data.cal/cal_trials or give "
            "--cal-data and --cal-trials (disjoint from the test trials)"
        )
    log.info("cascade: scoring %s on calibration and test trials", ", ".join(names))
    s_cal = all_precision_scores(config, stage_vars, cal_split)
    s = all_precision_scores(config, stage_vars, split)

    # Cost of one embedding at each stage.
    encoder = builders.build_encoder(config)
    frames = int(np.clip(np.mean([len(f) for f in split.raw_feats]), 1, config.eval.max_frames))
    macs = models.encoder_macs(encoder, frames)
    wbits = np.array([32 if n == "fp32" else int(n.removesuffix("bit")) for n in names])
    mbytes = np.array(
        [model_bytes(config, stage_vars[n], None if b == 32 else b) for n, b in zip(names, wbits)]
    )
    per_embedding = {
        "macs": np.full(len(names), float(macs)),
        "bitops": macs * wbits * 1.0,
        "bytes": mbytes * 1.0,
    }
    enroll, test = evaluate.trial_indices(split.corpus.utts, split.trials.enroll, split.trials.test)
    result, arrays = cascade.cascade_analysis(
        s_cal,
        cal_split.trials.labels,
        s,
        split.trials.labels,
        names,
        per_embedding,
        enroll=enroll,
        test=test,
        metric=metric,
        tolerance=tolerance,
        eta=eta,
        cost=cost,
        p_cal=p_cal,
        grid=grid,
        boot=trial_bootstrap(config, split),
        level=interval_level(config),
    )
    result["cost_notes"]["macs"] = (
        f"multiply-accumulates of the conv/dense layers per embedding of a {frames}-frame "
        "utterance (the test utterances' mean); the same at every precision"
    )
    result["macs_per_embedding"] = int(macs)
    result["model_bytes"] = dict(zip(names, (int(b) for b in mbytes)))
    result["storage_bytes"] = int(mbytes.sum())
    result["trials"] = {"data": config.data.test, "trials": config.data.test_trials}
    if result["chosen"] is not None:
        cal = calibration.Calibration(**result["calibration"])
        result["deployment"] = _deploy_check(
            config,
            stage_vars,
            split,
            cal,
            result["eta"]["value"],
            result["chosen"]["taus"],
            arrays["chosen_stage"],
        )

    out = fileio.local_dir(out, "out")
    if jax.process_index() == 0:
        curve, on_test = arrays["curve"], arrays["grid_test"]
        keys = list(cascade.METRIC_KEYS)
        cols = ["tau", *[f"frac_{n}" for n in names], f"rel_{cost}", *keys]
        lines = [",".join(cols)]
        for i in range(len(curve["cost"])):
            vals = [curve["taus"][i][0], *curve["fractions"][i], curve["rel_cost"][i]]
            vals += [curve[k][i] for k in keys]
            lines.append(",".join(f"{v:.6g}" for v in vals))
        atomic_write(out / "cascade_curve.csv", "\n".join(lines) + "\n")
        fig = out / "figures"
        plots.plot_cascade_tradeoff(
            result,
            curve["rel_cost"],
            curve[metric],
            on_test["rel_cost"],
            on_test[metric],
            fig / "cascade_tradeoff.png",
            curve_ci=curve.get("eer_ci") if metric == "eer" else None,
        )
        if result["chosen"] is not None:
            y = split.trials.labels
            plots.plot_cascade_escalations(
                np.abs(s[-1] - metrics.eer(s[-1], y)[1]),
                arrays["chosen_stage"],
                names,
                fig / "cascade_escalations.png",
            )
        write_json(out / "cascade.json", result)  # last: marks the output complete
    return result


def _deploy_check(config, stage_vars, split, cal, eta_value, taus, analysis_stage) -> dict:
    """The deployment path on the test trials: embeddings computed per stage, its wall
    time against embedding every utterance in FP32, and whether it decides as the
    analysis path did."""
    import time

    from sqjax.analysis import cascade

    embed = evaluate.jitted_embed(builders.build_encoder(config))
    feats = split.feats
    kw = {"batch_size": config.eval.batch_size, "max_frames": config.eval.max_frames}

    def stage_fn(variables):
        return lambda ids: evaluate.extract_embeddings(
            embed, variables, [feats[i] for i in ids], **kw
        )

    fns = [stage_fn(v) for v in stage_vars.values()]
    enroll, test = evaluate.trial_indices(split.corpus.utts, split.trials.enroll, split.trials.test)
    ab = list(zip(cal.a, cal.b))
    everyone = np.unique(np.concatenate([enroll, test]))
    fns[-1](everyone)  # compiles every length rung once, so neither timing below does
    t0 = time.perf_counter()
    dep = cascade.deploy(fns, ab, eta_value, taus, enroll, test)
    t_dep = time.perf_counter() - t0
    t0 = time.perf_counter()
    fns[-1](everyone)
    t_last = time.perf_counter() - t0
    same = bool(np.array_equal(dep["stage"], analysis_stage))
    if not same:
        log.warning(
            "cascade: the deployment path decided %d trials at another stage than the "
            "analysis path",
            int(np.sum(dep["stage"] != analysis_stage)),
        )
    return {
        "same_decisions": same,
        "embedded": [int(e) for e in dep["embedded"]],
        "utterances": len(everyone),
        "wall_s": t_dep,
        "wall_s_last_stage_alone": t_last,
    }


def format_cascade(result: dict) -> str:
    """The cascade table: each precision alone and the cascade (calibration-chosen and
    test-optimal): metrics, share decided per stage, relative costs; then the notes."""
    from sqjax.analysis.uncertainty import format_ci

    f = lambda v, spec: "-" if v is None else format(v, spec)
    names = result["stages"]
    ci = "eer_ci" in result["systems"][names[-1]]
    head = ("system", "EER [95% CI]", f"EER - {names[-1]} [95% CI]") if ci else ("system", "EER")
    head += ("minDCF.01", "actDCF.01", "Cllr")
    head += tuple(f"@{n}" for n in names) + ("rel bitops", "rel MACs", "rel bytes")
    rows = [head]

    def row(label, r):
        eer = (
            (format_ci(r["eer"], r["eer_ci"]), format_ci(r["delta_eer"], r["delta_eer_ci"], "+.4f"))
            if ci
            else (f(r["eer"], ".4f"),)
        )
        return (
            label,
            *eer,
            f(r["min_dcf@0.01"], ".4f"),
            f(r["act_dcf@0.01"], ".4f"),
            f(r["cllr"], ".3f"),
            *(f"{100 * x:.1f}%" for x in r["fractions"]),
            f(r["rel_bitops"], ".3f"),
            f(r["rel_macs"], ".3f"),
            f(r["rel_bytes"], ".3f"),
        )

    for n in names:
        rows.append(row(f"{n} alone", result["systems"][n]))
    for key, label in (
        ("chosen", "cascade (tau from cal)"),
        ("test_optimal", "cascade (test-best)"),
    ):
        if result[key] is not None:
            rows.append(row(label, result[key]))
    lines = [format_table(rows, rules=(1, len(names) + 1))]
    tol = f"{result['metric']} within {result['tolerance']:.0%} of FP32"
    c = result["chosen"]
    if c is None:
        lines.append(f"no tau vector keeps {tol} on the calibration trials")
        return "\n".join(lines)
    lines.append(
        f"tau (cal, {tol}, cheapest in {result['cost']}): "
        + ", ".join(f"{n} {t:.3g}" for n, t in zip(names, c["taus"]))
        + f"; eta = {result['eta']['value']:.3f} ({result['eta']['kind']})"
    )
    t = result["test_optimal"]
    if t is not None:
        lines.append(
            f"test-optimal under the same rule: rel {result['cost']} "
            f"{t['rel_' + result['cost']]:.3f} vs {c['rel_' + result['cost']]:.3f} chosen on cal"
        )
    if c is not None:
        lines.append(
            f"service regime (enrolled once, one utterance per claim): "
            f"{c['embeddings_per_claim']:.2f} embeddings per claim, rel bitops "
            f"{c['rel_bitops']:.3f} ({names[-1]} alone: 1.00, 1.000)"
        )
    d = result.get("deployment")
    if d:
        lines.append(
            f"all-pairs deployment path: {'same' if d['same_decisions'] else 'DIFFERENT'} "
            f"decisions; "
            f"embedded {', '.join(f'{n} {e}' for n, e in zip(names, d['embedded']))} of "
            f"{d['utterances']} utterances; wall {d['wall_s']:.1f} s vs "
            f"{d['wall_s_last_stage_alone']:.1f} s for {names[-1]} alone"
        )
    lines.append(
        f"storage of all stage models: {result['storage_bytes']:,} B "
        f"({', '.join(f'{n} {b:,}' for n, b in result['model_bytes'].items())})"
    )
    lines.append(
        "rel bitops/MACs/bytes: expected per trial against FP32 alone, both sides embedded "
        "at each stage reached; MACs are equal at every precision (no low-bit kernels)"
    )
    return "\n".join(lines)
