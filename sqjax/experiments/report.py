"""``sqjax report``: a study's report (HTML, Markdown and its numbers) from its files."""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections

from sqjax import fileio
from sqjax.tables import format_table
from sqjax.workdir import atomic_write, write_json


def _ours(synth: bool) -> list[str]:
    data = (
        ["the built-in synthetic speaker corpus (a CPU-sized study)"]
        if synth
        else ["the QAT and analysis settings of the config (the paper fixes few of them)"]
    )
    return data + [
        (
            "calibration by prior-weighted logistic regression at p_target 0.05, on the "
            "calibration trials (the synthetic corpus's dev split by default)"
        ),
        (
            "the knee by Kneedle on the ordinal bit axis; 'near theta' = the 10% of trials "
            "nearest the FP32 EER threshold"
        ),
        (
            "layer sensitivity measured as mean |score drift|; the mixed-precision mix chosen on "
            "the calibration trials"
        ),
        (
            "the cascade's eta at FP32's calibrated EER point; tau on a per-stage quantile grid, "
            "cheapest in bit-ops (MACs x weight bits)"
        ),
    ]


def _load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def write_report(workdir: str | Path) -> dict:
    """``workdir/report/index.html`` and ``report.md`` (same content) from the study's
    files, and ``report.json`` (the numbers and verdicts); returns the latter."""
    from sqjax.analysis import report

    workdir = fileio.local_dir(workdir)
    info = _load(workdir / "study_info.json")
    if info is None:
        raise FileNotFoundError(f"{workdir}: no study_info.json; run `sqjax study` first")
    c = ml_collections.ConfigDict(info["config"])
    analyses = {
        name: a
        for name, a in (
            ("QAT", _load(workdir / "analysis" / "qat" / "score_analysis.json")),
            ("PTQ", _load(workdir / "analysis" / "ptq" / "score_analysis.json")),
        )
        if a is not None
    }
    layers = {
        name: la
        for name, la in (
            ("PTQ", _load(workdir / "layers" / "ptq" / "layer_analysis.json")),
            ("QAT", _load(workdir / "layers" / "qat" / "layer_analysis.json")),
        )
        if la is not None
    }
    cascade = _load(workdir / "cascade" / "cascade.json")
    rows = []
    for method, a in analyses.items():
        for p in a["precisions"]:
            if method == "PTQ" and p == "fp32":
                continue
            m = a["per_precision"][p]["metrics"]
            rows.append(
                {
                    "precision": p,
                    "method": "FP32" if p == "fp32" else method,
                    **{k: m.get(k) for k in ("eer", "min_dcf@0.01", "min_dcf@0.05")},
                    **{k: m.get(k) for k in ("act_dcf@0.01", "cllr")},
                    "size_bytes": info["sizes"].get(p, 0),
                }
            )
    data = "built-in synthetic corpus" if c.data.synth else f"{c.data.train} / {c.data.test}"
    setup = {
        "title": f"sqjax study: {c.model.name} (width {c.model.width}) on {data}",
        "items": [
            ("data", data),
            ("model", f"{c.model.name}, width {c.model.width}, embedding {c.model.embed_dim}"),
            ("parameters", f"{info['params']:,} ({info['macs_2s'] / 1e6:.0f} MMACs per 2 s)"),
            (
                "FP32 training",
                (
                    f"{c.train.num_steps} steps of {c.train.batch_size} crops, "
                    f"{c.train.optimizer} lr {c.train.learning_rate}"
                ),
            ),
            (
                "QAT",
                (
                    f"{c.quant.num_steps} steps per width at {tuple(c.quant.bits_list)} bits, "
                    f"lr {c.quant.learning_rate}, codebooks refreshed every "
                    f"{c.quant.refresh_every} steps"
                ),
            ),
            ("codebooks", "per output channel" if c.quant.per_channel else "per tensor"),
            (
                "layer analysis",
                (
                    f"{tuple(c.study.layer_bits)} bits; mixes within "
                    f"{c.study.layer_tolerance:.0%} of FP32 EER"
                ),
            ),
            (
                "cascade",
                (
                    f"stages {tuple(c.study.cascade_stages)}; EER within "
                    f"{c.study.cascade_tolerance:.0%} of FP32"
                ),
            ),
            ("seed", str(c.seed)),
        ],
        "ours": _ours(bool(c.data.synth)),
    }
    figs = [
        ("QAT: EER and minDCF against bits, with the knee", "analysis/qat/figures/degradation.png"),
        ("PTQ: EER and minDCF against bits, with the knee", "analysis/ptq/figures/degradation.png"),
        ("QAT: score drift per width", "analysis/qat/figures/drift.png"),
        ("QAT: flips against the distance to theta", "analysis/qat/figures/flips.png"),
        ("PTQ: flips against the distance to theta", "analysis/ptq/figures/flips.png"),
        ("QAT: DET curves", "analysis/qat/figures/det.png"),
        ("QAT: reliability of the calibrated scores", "analysis/qat/figures/reliability.png"),
    ]
    for kind, la in layers.items():
        for w in la["widths"]:
            d = f"layers/{kind.lower()}/figures"
            figs += [
                (f"{kind} {w}: distortion against sensitivity", f"{d}/layers_scatter_{w}.png"),
                (f"{kind} {w}: by stage and kind", f"{d}/layers_stages_{w}.png"),
                (f"{kind} {w}: protecting one layer", f"{d}/layers_protection_{w}.png"),
            ]
    figs += [
        ("cascade: EER against relative cost", "cascade/figures/cascade_tradeoff.png"),
        ("cascade: where each stage decides", "cascade/figures/cascade_escalations.png"),
    ]
    figures = [(cap, workdir / rel) for cap, rel in figs if (workdir / rel).exists()]
    blocks = report.study_report(setup, {"rows": rows}, analyses, layers, cascade, figures)
    out = workdir / "report"
    atomic_write(out / "report.md", report.to_markdown(blocks, out))
    atomic_write(out / "index.html", report.to_html(blocks))
    summary = {
        "rows": rows,
        "claims": report.claims(analyses.get("QAT"), analyses.get("PTQ"), layers, cascade),
        "cascade": None if cascade is None else cascade["chosen"],
    }
    write_json(out / "report.json", summary)
    return summary


def format_study(summary: dict) -> str:
    """The results table and the verdicts on the paper's claims."""
    f = lambda v: "-" if v is None else f"{v:.4f}"
    rows = [("precision", "method", "EER", "minDCF.01", "minDCF.05", "actDCF.01", "size B")]
    for r in summary["rows"]:
        rows.append(
            (
                r["precision"],
                r["method"],
                f(r["eer"]),
                f(r["min_dcf@0.01"]),
                f(r["min_dcf@0.05"]),
                f(r["act_dcf@0.01"]),
                f"{r['size_bytes']:,}",
            )
        )
    lines = [format_table(rows)]
    lines += [f"{c['verdict']:>14}: {c['claim']} -- {c['evidence']}" for c in summary["claims"]]
    return "\n".join(lines)
