"""The study report: results in, one document out, as Markdown and as self-contained HTML.

``study_report(...)`` builds the document as a list of blocks (headings, paragraphs,
tables, figures) from the analyses' results; ``to_markdown`` and ``to_html`` render the
same blocks, so both files say the same thing. ``claims`` reads the paper's claims off the
numbers with the rules stated in each verdict.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Mapping, Sequence
from pathlib import Path

from sqjax.analysis import uncertainty

# Rules for calling a claim supported (ours; stated in the report).
NEAR_SHARE = 0.5  # harmful 2-bit flips among the 10% of trials nearest theta: >= 5x uniform
R2_EXPLAINED = 0.5  # distortion "explains" sensitivity when R^2 >= this
MOST_AT_FIRST = 0.5  # "most trials stop at 2 bits": more than half decided at stage 1


def _fmt(v, spec: str = ".4f") -> str:
    return "-" if v is None else format(v, spec)


def _verdict(ok: bool | None) -> str:
    """A verdict from a point estimate (analyses written before intervals existed)."""
    return {True: "supported", False: "contradicted", None: "not measured"}[ok]


KNEE_SUPPORT, KNEE_CONTRADICT = 0.8, 0.2  # shares of resamples with the knee at 2 bits


def _ci(v) -> str:
    lo, hi = v if v is not None else (None, None)
    return f"[{_fmt(lo, '.0%')}, {_fmt(hi, '.0%')}]"


def _knee_claim(name: str, a: Mapping) -> dict:
    k, d = a["knee"]["eer"], a["knee"]["mean_abs_drift"]
    claim = f"{name}: the EER and the score drift bend at 2 bits (the knee)"
    stab = a.get("knee_stability")
    if stab is None:
        return {
            "claim": claim,
            "verdict": _verdict(k["knee"] == 2 and d["knee"] == 2),
            "evidence": f"EER: {k['statement']}; mean |drift|: {d['statement']} (point "
            "estimates: no intervals in this analysis)",
            "rule": "point estimate: Kneedle puts the knee of both curves at 2 bits",
        }

    def shares(key):
        return ", ".join(f"{w}: {s:.0%}" for w, s in stab[key]["share"].items())

    both = stab["joint"].get("2", 0.0)
    return {
        "claim": claim,
        "verdict": uncertainty.verdict_share(both, KNEE_SUPPORT, KNEE_CONTRADICT),
        "evidence": f"knee of both curves at 2 bits in {both:.0%} of {stab['n']} "
        f"{a['uncertainty']['bootstrap']['level']} resamples; EER knee by width: "
        f"{shares('eer')}; mean |drift|: {shares('mean_abs_drift')}; on the data "
        f"themselves: EER {k['statement']}, drift {d['statement']}",
        "rule": f"Kneedle on each resample: supported when both knees fall at 2 bits in >= "
        f"{KNEE_SUPPORT:.0%} of resamples, contradicted when in <= {KNEE_CONTRADICT:.0%}",
    }


def _flip_claim(name: str, a: Mapping) -> dict:
    claim = f"{name}: harmful 2-bit flips are concentrated near the FP32 threshold"
    two = a["per_precision"].get("2bit")
    conc = None if two is None else two["concentration"]
    share = None if conc is None else conc["harmful_share_nearest"]
    if share is None:
        return {
            "claim": claim,
            "verdict": "not measured",
            "evidence": "no 2-bit model or no harmful flip",
            "rule": "",
        }
    tests = two.get("flip_tests")
    head = (
        f"{share:.0%} of the {two['flips']['harmful']} harmful 2-bit flips lie among the 10% "
        f"of trials nearest theta"
    )
    if tests is None:
        return {
            "claim": claim,
            "verdict": _verdict(share >= NEAR_SHARE),
            "evidence": head + " (point estimate: no interval in this analysis)",
            "rule": f"point estimate: that share is >= {NEAR_SHARE:.0%} (5x an even spread)",
        }
    mc = tests["mcnemar"]
    return {
        "claim": claim,
        "verdict": uncertainty.verdict_above(tests["share_nearest_ci"], NEAR_SHARE),
        "evidence": f"{head}, interval {_ci(tests['share_nearest_ci'])}; FP32 scores plus "
        f"noise of the same spread: {_fmt(tests['null_share_nearest'], '.0%')}; harmful "
        f"{mc['harmful']} vs beneficial {mc['beneficial']}, McNemar p = "
        f"{mc['p_value']:.2g}",
        "rule": f"supported when the share's interval lies above {NEAR_SHARE:.0%} (5x an "
        f"even spread), contradicted when below it",
    }


def _layer_claim(name: str, width: str, a: Mapping) -> dict:
    c = a["correlation"]["drift"]
    ci = c.get("r2_ci")
    ev = (
        f"over {c['n']} layers, Spearman rho {_fmt(c['spearman'], '.2f')}, R^2 "
        f"{_fmt(c['r2'], '.2f')}"
    )
    if ci is not None:
        ev += f" [{_fmt(ci[0], '.2f')}, {_fmt(ci[1], '.2f')}]"
    ev += "; most sensitive: " + ", ".join(p.removesuffix("/kernel") for p in a["ranking"][:3])
    claim = f"{name} {width}: weight distortion does not fully explain a layer's score sensitivity"
    if ci is None or c["r2"] is None:
        return {
            "claim": claim,
            "verdict": _verdict(None if c["r2"] is None else c["r2"] < R2_EXPLAINED),
            "evidence": ev + ("" if c["r2"] is None else " (point estimate: no interval)"),
            "rule": f"point estimate: R^2 of |drift| on distortion < {R2_EXPLAINED}",
        }
    return {
        "claim": claim,
        "verdict": uncertainty.verdict_below(ci, R2_EXPLAINED),
        "evidence": ev,
        "rule": f"R^2 of the layers' |drift| on their distortion, its interval over trial "
        f"resamples below {R2_EXPLAINED} (supported), above (contradicted), or across it",
    }


def _cascade_claim(cascade: Mapping) -> dict:
    c = cascade["chosen"]
    first = cascade["stages"][0]
    fp32 = cascade["systems"][cascade["stages"][-1]]
    tol, metric = cascade["tolerance"], cascade["metric"]
    claim = f"the cascade keeps {metric} close to FP32 while most trials stop at {first}"
    if c is None:
        return {
            "claim": claim,
            "verdict": "contradicted",
            "evidence": "no tau keeps the metric within tolerance on the calibration trials",
            "rule": "",
        }
    most = c["fractions"][0] > MOST_AT_FIRST
    ev = (
        f"test {metric} {c[metric]:.4f} vs {fp32[metric]:.4f} for FP32 alone; "
        f"{c['fractions'][0]:.0%} of trials decided at {first}; relative bit-ops "
        f"{c['rel_bitops']:.3f}, MACs {c['rel_macs']:.3f} of FP32 alone"
    )
    rel = c.get(f"rel_delta_{metric}_ci")
    if rel is None:
        close = c[metric] <= (1 + tol) * fp32[metric]
        return {
            "claim": claim,
            "verdict": _verdict(close and most),
            "evidence": ev + " (point estimates: no intervals in this analysis)",
            "rule": f"point estimate: test {metric} <= (1 + {tol:g}) x FP32's and > "
            f"{MOST_AT_FIRST:.0%} of trials decided at the first stage",
        }
    verdict = uncertainty.verdict_at_most(rel, tol) if most else "contradicted"
    return {
        "claim": claim,
        "verdict": verdict,
        "evidence": f"{ev}; relative change against FP32 {_fmt(c[f'rel_delta_{metric}'], '+.1%')}"
        f", interval [{_fmt(rel[0], '+.1%')}, {_fmt(rel[1], '+.1%')}]",
        "rule": f"more than {MOST_AT_FIRST:.0%} of trials decided at the first stage, and the "
        f"paired interval of the relative {metric} change against FP32 below +{tol:.0%} "
        f"(supported), above it (contradicted) or across it (undetermined)",
    }


def claims(qat: Mapping | None, ptq: Mapping | None, layers: Mapping, cascade: Mapping | None):
    """The paper's claims, each ``{"claim", "verdict", "evidence", "rule"}``, from the
    score-level analyses (QAT and PTQ), the layer analyses and the cascade. A verdict is
    "supported", "contradicted" or "undetermined" (the intervals allow both), decided
    by the rule it states."""
    out = []
    for name, a in (("QAT", qat), ("PTQ", ptq)):
        if a is not None:
            out += [_knee_claim(name, a), _flip_claim(name, a)]
    for name, la in layers.items():
        for width, a in la["widths"].items():
            out.append(_layer_claim(name, width, a))
    if cascade is not None:
        out.append(_cascade_claim(cascade))
    return out


# --------------------------------------------------------------------------- document


def study_report(
    setup: Mapping,
    results: Mapping,
    analyses: Mapping,
    layers: Mapping,
    cascade: Mapping | None,
    figures: Sequence[tuple[str, Path]],
) -> list[tuple]:
    """The report's blocks.

    Args:
      setup: {"title", "items": [(label, value)], "ours": [choice, ...]}.
      results: {"rows": [{"precision", "method", "eer", "min_dcf@0.01", "min_dcf@0.05",
        "act_dcf@0.01", "cllr", "size_bytes"}]}.
      analyses: {"QAT" | "PTQ": ``score_analysis`` result}.
      layers: {"PTQ" | "QAT": ``analyze_layers`` result}.
      cascade: ``run_cascade`` result or None.
      figures: (caption, PNG path) in order.
    """
    b: list[tuple] = [("h", 1, setup["title"])]
    verdicts = claims(analyses.get("QAT"), analyses.get("PTQ"), layers, cascade)
    b.append(("h", 2, "What the data show"))
    b.append(
        (
            "list",
            [
                f"**{c['verdict']}**: {c['claim']}. {c['evidence']} (rule: {c['rule']})."
                for c in verdicts
            ],
        )
    )
    b.append(("h", 2, "Setup"))
    b.append(("table", [("setting", "value"), *setup["items"]]))
    if setup.get("ours"):
        b.append(("p", "Choices that are ours, not the paper's:"))
        b.append(("list", list(setup["ours"])))

    b.append(("h", 2, "Results per precision"))
    rows = [("precision", "method", "EER", "minDCF 0.01", "minDCF 0.05", "actDCF 0.01")]
    rows[0] += ("Cllr", "size (bytes)")
    for r in results["rows"]:
        rows.append(
            (
                r["precision"],
                r["method"],
                _fmt(r["eer"]),
                _fmt(r["min_dcf@0.01"]),
                _fmt(r["min_dcf@0.05"]),
                _fmt(r.get("act_dcf@0.01")),
                _fmt(r.get("cllr"), ".3f"),
                f"{r['size_bytes']:,}",
            )
        )
    b.append(("table", rows))
    b.append(
        (
            "p",
            (
                "actDCF and Cllr use scores calibrated per precision on the calibration "
                "trials; sizes are packed b-bit indices + codebooks, float leaves 32-bit."
            ),
        )
    )

    for name, a in analyses.items():
        b.append(("h", 2, f"Score drift, flips and the knee ({name})"))
        rows = [("precision", "EER", "mean |drift|", "harmful flips", "beneficial", "near theta")]
        for p in a["precisions"]:
            r = a["per_precision"][p]
            conc = r["concentration"]
            rows.append(
                (
                    p,
                    _fmt(r["metrics"]["eer"]),
                    _fmt(r["drift"]["all"]["mean_abs"]),
                    str(r["flips"]["harmful"]),
                    str(r["flips"]["beneficial"]),
                    "-" if conc is None else _fmt(conc["harmful_share_nearest"], ".0%"),
                )
            )
        b.append(("table", rows))
        b.append(
            (
                "p",
                f"Flips at the FP32 {a['theta']['kind']} threshold theta = "
                f"{_fmt(a['theta']['value'])}; 'near theta': share of the harmful flips "
                "among the 10% of trials nearest theta. "
                + " ".join(f"Knee of {k}: {v['statement']}." for k, v in a["knee"].items()),
            )
        )

    for name, la in layers.items():
        for width, a in la["widths"].items():
            b.append(("h", 2, f"Fragile layers ({name}, {width})"))
            rows = [("layer", "kind", "weights", "rel err", "|drift| alone", "dEER alone")]
            rows[0] += ("EER recovered by protecting it",)
            by = {r["path"]: r for r in a["layers"]}
            for p in a["ranking"][:8]:
                r = by[p]
                rows.append(
                    (
                        p.removesuffix("/kernel"),
                        r["kind"],
                        f"{r['size']:,}",
                        _fmt(r["rel_err"]),
                        _fmt(r["drift"]),
                        _fmt(r["d_eer"], "+.4f"),
                        _fmt(r["gain_eer"], "+.4f"),
                    )
                )
            b.append(("table", rows))
            c = a["correlation"]["drift"]
            text = (
                f"Float reference EER {a['reference']['eer']:.4f}; all layers at "
                f"{a['bits']} bits {a['quantized']['eer']:.4f}. Distortion vs |drift| over "
                f"{c['n']} layers: Spearman {_fmt(c['spearman'], '.2f')}, R^2 "
                f"{_fmt(c['r2'], '.2f')}."
            )
            sug = la["suggestions"].get(width)
            if sug and sug["reached"]:
                text += (
                    f" Mixed precision (chosen on the {sug['selected_on']} trials): "
                    + (
                        f"keep {', '.join(p.removesuffix('/kernel') for p in sug['keep'])} "
                        f"at {sug['high_bits']} bits, "
                        if sug["keep"]
                        else "no layer needs a higher width, "
                    )
                    + f"{sug['mix_size_bytes']:,} B, test EER {sug['test_eer']:.4f} "
                    f"(target {sug['test_target_eer']:.4f})."
                )
            elif sug:
                text += " No mix reached the mixed-precision target."
            b.append(("p", text))

    if cascade is not None:
        b.append(("h", 2, "The calibrated cascade"))
        names = cascade["stages"]
        rows = [("system", "EER", "minDCF 0.01", "actDCF 0.01", *(f"@{n}" for n in names))]
        rows[0] += ("rel bit-ops", "rel MACs", "rel bytes")
        systems = [(f"{n} alone", cascade["systems"][n]) for n in names]
        systems += [
            (lbl, cascade[k])
            for k, lbl in (
                ("chosen", "cascade (tau from cal)"),
                ("test_optimal", "cascade (test-best)"),
            )
            if cascade[k] is not None
        ]
        for label, r in systems:
            rows.append(
                (
                    label,
                    _fmt(r["eer"]),
                    _fmt(r["min_dcf@0.01"]),
                    _fmt(r["act_dcf@0.01"]),
                    *(f"{100 * x:.1f}%" for x in r["fractions"]),
                    _fmt(r["rel_bitops"], ".3f"),
                    _fmt(r["rel_macs"], ".3f"),
                    _fmt(r["rel_bytes"], ".3f"),
                )
            )
        b.append(("table", rows))
        notes = cascade["cost_notes"]
        b.append(
            (
                "p",
                (
                    f"Costs are expected per trial against FP32 alone; {notes['per_trial']}. "
                    f"bit-ops: {notes['bitops']}. bytes: {notes['bytes']}. Storage of all "
                    f"stage models: {cascade['storage_bytes']:,} B."
                ),
            )
        )
        d = cascade.get("deployment")
        if d:
            b.append(
                (
                    "p",
                    (
                        f"Deployment path: {'the same' if d['same_decisions'] else 'DIFFERENT'} "
                        f"decisions as the analysis path; embeddings computed per stage "
                        f"{d['embedded']} of {d['utterances']} utterances."
                    ),
                )
            )

    b.append(("h", 2, "Figures"))
    for caption, path in figures:
        b.append(("img", caption, Path(path)))
    return b


def to_markdown(blocks: Sequence[tuple], base: Path) -> str:
    """Markdown; figures linked relative to ``base`` (the report's folder)."""
    import os

    out = []
    for blk in blocks:
        kind = blk[0]
        if kind == "h":
            out.append("#" * blk[1] + " " + blk[2])
        elif kind == "p":
            out.append(blk[1])
        elif kind == "list":
            out.append("\n".join(f"- {item}" for item in blk[1]))
        elif kind == "table":
            rows = blk[1]
            out.append("| " + " | ".join(map(str, rows[0])) + " |")
            out[-1] += "\n|" + "---|" * len(rows[0])
            out[-1] += "".join("\n| " + " | ".join(map(str, r)) + " |" for r in rows[1:])
        elif kind == "img":
            rel = os.path.relpath(blk[2], base)
            out.append(f"![{blk[1]}]({rel})\n\n*{blk[1]}*")
    return "\n\n".join(out) + "\n"


def _bold(text: str) -> str:
    """Escapes text, turning ``**x**`` into <b>x</b> (the only markup the blocks use)."""
    parts = html.escape(text).split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))


def to_html(blocks: Sequence[tuple]) -> str:
    """One self-contained HTML page: figures inlined as base64 PNG data URIs."""
    body = []
    for blk in blocks:
        kind = blk[0]
        if kind == "h":
            body.append(f"<h{blk[1]}>{html.escape(blk[2])}</h{blk[1]}>")
        elif kind == "p":
            body.append(f"<p>{_bold(blk[1])}</p>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{_bold(i)}</li>" for i in blk[1]) + "</ul>")
        elif kind == "table":
            rows = blk[1]
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in rows[0])
            cells = "".join(
                "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                for r in rows[1:]
            )
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(Path(blk[2]).read_bytes()).decode("ascii")
            cap = html.escape(blk[1])
            body.append(
                f'<figure><img alt="{cap}" src="data:image/png;base64,{data}">'
                f"<figcaption>{cap}</figcaption></figure>"
            )
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse;margin:1em 0;font-size:90%}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
    )
    title = next((html.escape(b[2]) for b in blocks if b[0] == "h"), "sqjax report")
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
