"""``sqjax grids``: K-means codebooks against uniform integer grids at equal bits, per
tensor and per channel, after training (PTQ) and in QAT."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import jax
import ml_collections
import numpy as np

from sqjax import builders, evaluate, fileio, prepare, runs
from sqjax.analysis import uncertainty
from sqjax.experiments import qat_study
from sqjax.experiments.precisions import (
    all_precision_scores,
    interval_level,
    trial_bootstrap,
    with_data,
)
from sqjax.tables import csv_text, format_table
from sqjax.workdir import atomic_write, write_json

log = logging.getLogger("sqjax")

GRID_METHODS = (("kmeans", False), ("kmeans", True), ("uniform", False), ("uniform", True))


def grid_label(method: str, per_channel: bool) -> str:
    return f"{method} per {'channel' if per_channel else 'tensor'}"


def _deployed_distortion(rules_config, bits: int, fp32: dict, deployed: dict) -> float:
    """sum ||W - Q||^2 / sum ||W||^2 over the kernels ``builders.build_quantizer`` quantizes:
    W the FP32 weights, Q the deployed (quantized) ones."""
    plans = builders.build_quantizer(rules_config, bits).plan(fp32["params"])
    w = jax.tree.leaves(fp32["params"])
    q = jax.tree.leaves(deployed["params"])
    err = sig = 0.0
    for p, a, b in zip(plans, w, q):
        if p.bits is not None:
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            err, sig = err + float(np.sum((a - b) ** 2)), sig + float(np.sum(a**2))
    return err / sig if sig > 0 else 0.0


def compare_grids(
    workdir: str | Path,
    bits_list: Sequence[int] = (1, 2, 3, 4, 8),
    out: str | Path | None = None,
    *,
    qat_studies: Sequence[str | Path] = (),
    qat_bits: Sequence[int] = (),
    qat_config: ml_collections.ConfigDict | None = None,
    symmetric: bool = False,
    scale: str = "mse",
    data: str = "",
    trials: str = "",
) -> dict:
    """K-means codebooks against uniform integer grids at equal bits, per tensor and per
    channel: PTQ of the FP32 run ``workdir`` with each of ``GRID_METHODS`` at each width
    of ``bits_list`` (uniform: ``symmetric``, ``scale``), and the QAT runs of each
    ``sqjax qat`` study in ``qat_studies`` (its config names its method and granularity).
    With ``qat_bits``, QAT studies at those widths are first run (or resumed) from
    ``workdir`` with each of ``GRID_METHODS``, into ``<out>/qat/<method>_per_<tensor|
    channel>``, with the QAT settings of ``qat_config`` (default: the run's config).

    Every model is scored in one all-precision pass. Per row: test EER and minDCF@0.01,
    the weight distortion against the FP32 weights (``sum ||W - Q||^2 / sum ||W||^2``
    over the quantized kernels) and the packed size (``export.size_report``: b-bit
    indices plus each codebook, or each scale and zero point).

    Writes ``grids.csv``, ``grids.json`` and ``figures/grids.png`` (EER and distortion
    against bits, one curve per method and granularity, PTQ solid and QAT dashed) to
    ``out`` (default ``<workdir>/grids``); returns ``{"rows": [...], "fp32": {...}}``.
    """
    from sqjax import export
    from sqjax.analysis import plots

    config, state, quantizer = runs.restore_run(workdir)
    if quantizer is not None:
        raise ValueError(f"{workdir} is a QAT run ({config.quant.bits} bits): give an FP32 run")
    config = with_data(config, data, trials)
    fp32 = evaluate.encoder_variables(state)
    params = fp32["params"]
    out = fileio.local_dir(out, "out") if out else fileio.local_dir(workdir) / "grids"
    qat_studies = list(qat_studies)
    for method, per_channel in GRID_METHODS if qat_bits else ():
        c = ml_collections.ConfigDict((qat_config or config).to_dict())
        c.quant.method, c.quant.per_channel = method, per_channel
        c.quant.symmetric, c.quant.scale = symmetric, scale
        c.quant.init_from, c.quant.bits_list = str(workdir), tuple(qat_bits)
        qat_studies.append(out / "qat" / grid_label(method, per_channel).replace(" ", "_"))
        log.info("grids: QAT %s at %s bits", grid_label(method, per_channel), qat_bits)
        qat_study.quantization_study(c, qat_studies[-1])
    models_, rows = {"fp32": fp32}, []
    for method, per_channel in GRID_METHODS:
        c = ml_collections.ConfigDict(config.to_dict())
        c.quant.method, c.quant.per_channel = method, per_channel
        c.quant.symmetric, c.quant.scale, c.quant.learn_scale = symmetric, scale, False
        for b in sorted(bits_list):
            q = builders.build_quantizer(c, b)
            qstate = q.init(params)
            name = f"ptq {grid_label(method, per_channel)} {b}bit"
            models_[name] = {**fp32, "params": q.apply(params, qstate)}
            size = export.size_report(params, qstate).packed_bytes
            rows.append(_grid_row("ptq", method, per_channel, b, name, size))
            rows[-1]["distortion"] = _deployed_distortion(c, b, fp32, models_[name])
    for study_dir in qat_studies:
        subs = sorted(p for p in Path(study_dir).glob("*bit") if (p / "config.json").exists())
        if not subs:
            raise FileNotFoundError(f"{study_dir}: no <b>bit QAT runs; give a `sqjax qat` study")
        for sub in subs:
            rc, st, qz = runs.restore_run(sub)
            method = rc.quant.get("method", "kmeans")
            name = f"qat {grid_label(method, rc.quant.per_channel)} {sub.name}"
            if name in models_:  # two studies of one method: tell them apart by directory
                name = f"{name} ({sub})"
            models_[name] = evaluate.encoder_variables(st, qz)
            size = export.size_report(st.params["encoder"], st.qstate).packed_bytes
            rows.append(_grid_row("qat", method, rc.quant.per_channel, rc.quant.bits, name, size))
            rows[-1]["distortion"] = _deployed_distortion(rc, rc.quant.bits, fp32, models_[name])
    split = prepare.test_data(config)
    scores = all_precision_scores(config, models_, split)
    labels = split.trials.labels
    level = interval_level(config)
    cmp = uncertainty.compare(
        scores,
        labels,
        list(models_),
        trial_bootstrap(config, split),
        p_targets=(0.01,),
        level=level,
    )
    for row in rows:
        r = cmp["systems"][row["name"]]
        row["min_dcf"] = r["min_dcf@0.01"]
        row.update({k: v for k, v in r.items() if k.endswith(("eer", "eer_ci"))})
    fp32_bytes = 4 * sum(int(np.size(x)) for x in jax.tree.leaves(params))
    f = cmp["systems"]["fp32"]
    result = {
        "fp32": {
            "eer": f["eer"],
            "eer_ci": f["eer_ci"],
            "min_dcf": f["min_dcf@0.01"],
            "bytes": fp32_bytes,
        },
        "rows": rows,
        "comparisons": _kmeans_vs_uniform(rows, list(models_), cmp, level),
        "uncertainty": {k: cmp[k] for k in ("level", "method", "bootstrap")},
        "uniform": {"symmetric": symmetric, "scale": scale},
        "trials": {"data": config.data.test, "trials": config.data.test_trials},
    }
    if jax.process_index() == 0:
        atomic_write(out / "grids.csv", csv_text(rows, GRID_CSV_COLUMNS))
        plots.plot_grids(result, out / "figures" / "grids.png")
        write_json(out / "grids.json", result)  # last: marks the output complete
    return result


GRID_CSV_COLUMNS = (
    "mode", "method", "per_channel", "bits", "eer", "min_dcf", "distortion", "bytes",
)  # fmt: skip


def _kmeans_vs_uniform(rows, names, cmp, level) -> list[dict]:
    """Uniform minus K-means EER at each mode, granularity and width, with its paired
    interval and the verdict on "K-means has the lower EER"."""
    by = {(r["mode"], r["method"], r["per_channel"], r["bits"]): r for r in rows}
    eer = cmp["samples"]["eer"]
    out = []
    for (mode, method, pc, b), r in sorted(by.items()):
        k = by.get((mode, "kmeans", pc, b))
        if method != "uniform" or k is None:
            continue
        i, j = names.index(r["name"]), names.index(k["name"])
        d = r["eer"] - k["eer"]
        ci = list(uncertainty.interval(eer[:, i] - eer[:, j], d, level))
        out.append(
            {
                "mode": mode,
                "per_channel": pc,
                "bits": b,
                "uniform_minus_kmeans_eer": d,
                "uniform_minus_kmeans_eer_ci": ci,
                "verdict": uncertainty.verdict_above(ci, 0.0),
            }
        )
    return out


def _grid_row(mode, method, per_channel, bits, name, size) -> dict:
    return {
        "mode": mode,
        "method": method,
        "per_channel": bool(per_channel),
        "bits": int(bits),
        "name": name,
        "bytes": round(float(size)),
    }


def _grid_verdict(diffs: Sequence[tuple[int, float]]) -> str:
    """Where K-means, the uniform grid, or neither has the lower EER; diffs are
    (bits, uniform EER - K-means EER)."""

    def at(sel):
        return ", ".join(f"{b} bits ({d * 100:+.2f})" for b, d in diffs if sel(d)) or "no width"

    text = (
        f"uniform minus K-means EER in points: K-means lower at {at(lambda d: d > 1e-9)}; "
        f"the uniform grid lower at {at(lambda d: d < -1e-9)}"
    )
    if any(abs(d) <= 1e-9 for _, d in diffs):
        text += f"; equal at {at(lambda d: abs(d) <= 1e-9)}"
    return text


def _pts(v) -> str:
    return "n/a" if v is None else f"{v:+.2f}"


def format_grids(result: dict) -> str:
    """One table, bits down and method x granularity across: EER, distortion and size,
    PTQ then QAT; and where K-means beats the uniform grid."""
    f = result["fp32"]
    lines = [f"FP32: EER {f['eer']:.4f}, minDCF@0.01 {f['min_dcf']:.4f}, {f['bytes']:,} B"]
    for mode in ("ptq", "qat"):
        rows = [r for r in result["rows"] if r["mode"] == mode]
        if not rows:
            continue
        by = {(r["method"], r["per_channel"], r["bits"]): r for r in rows}
        methods = [m for m in GRID_METHODS if any((*m, b) in by for b in range(1, 9))]
        header = ("bits", *(f"{grid_label(*m)}: EER / dist / kB" for m in methods))
        table = [header]
        for b in sorted({r["bits"] for r in rows}):
            cells = []
            for m in methods:
                r = by.get((*m, b))
                cells.append(
                    "-"
                    if r is None
                    else f"{r['eer']:.4f} / {r['distortion']:.1e} / {r['bytes'] / 1000:.1f}"
                )
            table.append((str(b), *cells))
        lines.append(f"{mode.upper()} (EER, relative weight distortion, packed size)")
        lines.append(format_table(table))
        comps = [c for c in result.get("comparisons", ()) if c["mode"] == mode]
        for c in comps:
            gran = "per channel" if c["per_channel"] else "per tensor"
            lo, hi = (v * 100 if v is not None else None for v in c["uniform_minus_kmeans_eer_ci"])
            lines.append(
                f"{mode.upper()} {gran} {c['bits']} bits: uniform minus K-means EER "
                f"{c['uniform_minus_kmeans_eer'] * 100:+.2f} points "
                f"[{_pts(lo)}, {_pts(hi)}]: K-means lower is {c['verdict']}"
            )
        if comps:
            lines.append(
                "  (rule: supported when the paired 95% interval of uniform minus K-means lies "
                "above 0, contradicted when below, undetermined when it holds 0)"
            )
        for pc in () if comps else (False, True):
            gran = "per channel" if pc else "per tensor"
            diffs = [
                (b, by[("uniform", pc, b)]["eer"] - by[("kmeans", pc, b)]["eer"])
                for b in sorted({r["bits"] for r in rows})
                if ("uniform", pc, b) in by and ("kmeans", pc, b) in by
            ]
            if diffs:
                lines.append(f"{mode.upper()} {gran}: {_grid_verdict(diffs)}")
    return "\n".join(lines)
