"""Figures of the score-level analysis, written as PNG files.

Each function draws results that ``scores.score_analysis`` and ``calibration.reliability``
already computed, or the (P, T) score arrays they were computed from (a histogram of
s_b - s_32 and the DET points of ``metrics.det_curve`` are cheap), and returns the path
it wrote. Figures are ``matplotlib.figure.Figure`` objects saved directly, never pyplot
state, so this works under any backend and in threads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter
from scipy.stats import norm

from sqjax import metrics

DPI = 100


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": the size stays figsize * DPI
    return path


def _bit_label(b: int) -> str:
    return "FP32" if b == 32 else f"{b}"


def plot_degradation(analysis: Mapping, path) -> Path:
    """EER and minDCF@0.01 against bit width with the knee marked (``score_analysis``),
    with the intervals as error bars where the analysis has them."""
    fig = Figure(figsize=(10, 4), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, key, scale, ylabel in [
        (axes[0], "eer", 100.0, "EER (%)"),
        (axes[1], "min_dcf@0.01", 1.0, "minDCF (p_target = 0.01)"),
    ]:
        k = analysis["knee"][key]
        x = np.arange(len(k["bits"]))  # the ordinal axis the knee is found on
        v = np.asarray(k["values"]) * scale
        ms = [analysis["per_precision"][n]["metrics"] for n in _by_bits(analysis, k["bits"])]
        if all(m.get(key + "_ci") and None not in m[key + "_ci"] for m in ms):
            ci = np.array([m[key + "_ci"] for m in ms]).T * scale
            yerr = np.clip([v - ci[0], ci[1] - v], 0, None)
            ax.errorbar(x, v, yerr=yerr, fmt="o-", capsize=3, label="95% interval")
        else:
            ax.plot(x, v, "o-")
        ax.set_xticks(x, [_bit_label(b) for b in k["bits"]])
        if k["knee"] is not None:
            ax.axvline(k["bits"].index(k["knee"]), color="C3", ls="--", label="knee")
            ax.legend()
        ax.set_xlabel("weight bits")
        ax.set_ylabel(ylabel)
        ax.set_title(k["statement"], fontsize=8, wrap=True)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _by_bits(analysis: Mapping, bits) -> list[str]:
    """The precision names in the order of ``bits`` (the knee's order)."""
    of = dict(zip(analysis["bits"], analysis["precisions"]))
    return [of[b] for b in bits]


def plot_drift_histograms(
    scores, labels, precisions: Sequence[str], path, fp32_index: int = 0, bins: int = 50
) -> Path:
    """Histograms of the drift s_b - s_32, targets and non-targets, one panel per width.

    Args:
      scores: (P, T) raw scores, the rows of ``precisions``; labels: (T,).
    """
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    others = [p for p in range(len(precisions)) if p != fp32_index]
    fig = Figure(figsize=(3.2 * max(len(others), 1), 3.2), dpi=DPI, layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(len(others), 1), sharey=False))
    for ax, p in zip(axes, others):
        d = s[p] - s[fp32_index]
        edges = np.histogram_bin_edges(d, bins=bins)
        ax.hist(d[y], edges, alpha=0.6, density=True, label="target")
        ax.hist(d[~y], edges, alpha=0.6, density=True, label="non-target")
        ax.axvline(0.0, color="k", lw=0.8)
        ax.set_title(f"{precisions[p]}: s_b - s_32")
        ax.set_xlabel("score drift")
    axes[0].set_ylabel("density")
    axes[0].legend()
    return _save(fig, path)


def plot_flip_concentration(analysis: Mapping, path) -> Path:
    """Flip and harmful-flip rates against the distance |s_32 - theta|, both binnings.

    Top row: equal-count bins (x = percentile of trials by distance); bottom row: bins in
    units of the FP32 score std. One line per non-FP32 precision.
    """
    fig = Figure(figsize=(10, 7), dpi=DPI, layout="constrained")
    axes = fig.subplots(2, 2)
    fp32 = analysis["fp32"]
    for name, res in analysis["per_precision"].items():
        conc = res["concentration"]
        if name == fp32 or conc is None:
            continue
        q, sd = conc["quantile"], conc["std"]
        xq = (np.arange(len(q["n"])) + 0.5) * 100.0 / len(q["n"])
        xs = np.arange(len(sd["n"]))
        for col, key in enumerate(["flip_rate", "harmful_rate"]):
            # None (an empty bin) becomes NaN: a gap in the line.
            axes[0, col].plot(xq, np.asarray(q[key], dtype=float) * 100.0, "o-", label=name)
            axes[1, col].plot(xs, np.asarray(sd[key], dtype=float) * 100.0, "o-", label=name)
    std_edges = _std_edges(analysis)
    for col, what in enumerate(["flip rate (%)", "harmful-flip rate (%)"]):
        axes[0, col].set_xlabel("trials ranked by |s_32 - theta| (percentile, nearest first)")
        axes[1, col].set_xlabel("|s_32 - theta| in FP32 score std")
        if std_edges is not None:
            axes[1, col].set_xticks(np.arange(len(std_edges) - 1), _interval_labels(std_edges))
        for row in range(2):
            axes[row, col].set_ylabel(what)
            axes[row, col].grid(alpha=0.3)
    axes[0, 0].legend()
    return _save(fig, path)


def _std_edges(analysis: Mapping) -> list | None:
    """The std-unit bin edges of the first precision with a concentration, or None."""
    for res in analysis["per_precision"].values():
        if res["concentration"] is not None:
            return res["concentration"]["std"]["edges"]
    return None


def _interval_labels(edges: Sequence) -> list[str]:
    return [f"[{lo:g}, {hi:g})" if hi is not None else f">= {lo:g}" for lo, hi in pairwise(edges)]


_DET_TICKS = np.array([0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4])


def plot_det(scores, labels, precisions: Sequence[str], path) -> Path:
    """DET curves of all precisions on one chart, probit axes (``metrics.det_curve``).

    Args:
      scores: (P, T) raw scores, the rows of ``precisions``; labels: (T,).
    """
    s = np.asarray(scores, dtype=np.float64)
    fig = Figure(figsize=(6, 6), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    # Rates of exactly 0 or 1 sit at -inf/+inf on a probit axis; clip them just outside
    # the plotted range so the curves run off the edges instead of vanishing.
    lo, hi = 5e-4, 0.6
    for p, name in enumerate(precisions):
        p_fa, p_miss, _ = metrics.det_curve(s[p], labels)
        eer = metrics.eer(s[p], labels)[0]
        ax.plot(
            norm.ppf(np.clip(p_fa, lo / 2, 1 - lo / 2)),
            norm.ppf(np.clip(p_miss, lo / 2, 1 - lo / 2)),
            label=f"{name} (EER {100 * eer:.2f}%)",
        )
    ticks = norm.ppf(_DET_TICKS)
    labels_pct = [f"{100 * t:g}" for t in _DET_TICKS]
    ax.set_xticks(ticks, labels_pct)
    ax.set_yticks(ticks, labels_pct)
    ax.set_xlim(norm.ppf(lo), norm.ppf(hi))
    ax.set_ylim(norm.ppf(lo), norm.ppf(hi))
    ax.plot([norm.ppf(lo), norm.ppf(hi)], [norm.ppf(lo), norm.ppf(hi)], "k:", lw=0.8)
    ax.set_xlabel("false-alarm rate (%)")
    ax.set_ylabel("miss rate (%)")
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_reliability(reliabilities: Mapping[str, Mapping], path) -> Path:
    """Reliability plot: predicted posterior against observed target fraction.

    Args:
      reliabilities: {precision name: ``calibration.reliability(llrs, labels)``}.
    """
    fig = Figure(figsize=(5, 5), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="calibrated")
    for name, r in reliabilities.items():
        ax.plot(r["predicted"], r["observed"], "o-", label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("predicted target posterior (from the LLR at the trial-list prior)")
    ax.set_ylabel("observed target fraction")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


# ------------------------------------------------------------------ layer-wise analysis


def _short(path: str) -> str:
    return path.removesuffix("/kernel")


def plot_layer_scatter(analysis: Mapping, path, label_top: int = 8) -> Path:
    """Weight distortion (relative squared error, log axis) against score sensitivity
    (mean |drift| with the layer alone quantized), one labelled point per layer
    (``layers.layer_analysis``); the ``label_top`` most sensitive layers are named."""
    rows = analysis["layers"]
    fig = Figure(figsize=(7, 5), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    kinds = sorted({r["kind"] for r in rows})
    for i, kind in enumerate(kinds):
        sel = [r for r in rows if r["kind"] == kind]
        ax.scatter(
            [max(r["rel_err"], 1e-12) for r in sel],
            [r["drift"] for r in sel],
            color=f"C{i}",
            label=kind,
        )
    top = set(analysis["ranking"][:label_top])
    for r in rows:
        if r["path"] in top:
            ax.annotate(
                _short(r["path"]),
                (max(r["rel_err"], 1e-12), r["drift"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xscale("log")
    c = analysis["correlation"]["drift"]
    stat = "n/a" if c["spearman"] is None else f"Spearman {c['spearman']:.2f}, R^2 {c['r2']:.2f}"
    ax.set_title(f"{analysis['bits']}-bit, each layer alone quantized ({stat})", fontsize=9)
    ax.set_xlabel("weight distortion ||W - Q(W)||^2 / ||W||^2")
    ax.set_ylabel("mean |score drift| against float")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_layer_groups(analysis: Mapping, path) -> Path:
    """Per stage and per kind of layer: |drift| with the group alone quantized beside the
    sum of its layers' single-layer |drift|, and the group's share of the weights."""
    groups = analysis["groups"]
    fig = Figure(figsize=(10, 4), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 2)
    total = sum(r["size"] for r in analysis["layers"])
    for ax, kind in zip(axes, ("stage", "kind")):
        sel = [g for g in groups if g["group"] == kind]
        x = np.arange(len(sel))
        ax.bar(x - 0.2, [g["drift"] for g in sel], 0.4, label="group alone quantized")
        ax.bar(x + 0.2, [g["sum_drift"] for g in sel], 0.4, label="sum over its layers")
        ax.set_xticks(
            x, [f"{g['name']}\n{100 * g['size'] / total:.0f}% w" for g in sel], fontsize=8
        )
        ax.set_ylabel("mean |score drift|")
        ax.set_title(f"by {kind} ({analysis['bits']}-bit)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def plot_layer_depth(analysis: Mapping, path) -> Path:
    """Single-layer sensitivity by depth: |drift| and the EER change, layers in order."""
    rows = sorted(analysis["layers"], key=lambda r: r["depth"])
    fig = Figure(figsize=(10, 4.5), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(rows))
    ax.plot(x, [r["drift"] for r in rows], "o-", label="mean |drift|")
    ax.set_ylabel("mean |score drift|")
    ax2 = ax.twinx()
    ax2.plot(x, [100 * r["d_eer"] for r in rows], "s--", color="C3", label="EER change")
    ax2.set_ylabel("EER change (% points)")
    ax.set_xticks(x, [_short(r["path"]) for r in rows], rotation=90, fontsize=7)
    ax.set_title(f"{analysis['bits']}-bit, each layer alone quantized, by depth", fontsize=9)
    ax.grid(alpha=0.3)
    fig.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def plot_layer_protection(analysis: Mapping, path) -> Path:
    """Recovery from keeping one layer in float while the rest are quantized: the drop of
    mean |drift| and of the EER against the fully quantized model, per layer."""
    rows = sorted(analysis["layers"], key=lambda r: -r["gain_drift"])
    fig = Figure(figsize=(10, 4.5), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 2)
    x = np.arange(len(rows))
    names = [_short(r["path"]) for r in rows]
    axes[0].bar(x, [r["gain_drift"] for r in rows])
    axes[0].set_ylabel("|drift| recovered")
    axes[1].bar(x, [100 * r["gain_eer"] for r in rows], color="C1")
    axes[1].set_ylabel("EER recovered (% points)")
    for ax in axes:
        ax.set_xticks(x, names, rotation=90, fontsize=7)
        ax.axhline(0, color="k", lw=0.8)
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(f"protecting one layer (float) in the {analysis['bits']}-bit model", fontsize=9)
    return _save(fig, path)


# ---------------------------------------------------------------------------- cascade


def plot_cascade_tradeoff(
    result: Mapping, curve_cost, curve_metric, grid_cost, grid_metric, path, curve_ci=None
) -> Path:
    """The cascade's metric against its relative cost (FP32 alone = 1): every tau vector
    of the grid (dots), one tau shared by all stages (line, with its ``(G, 2)`` interval
    ``curve_ci`` shaded), the calibration-chosen point, and each precision alone as a
    horizontal line."""
    metric = result["metric"]
    scale = 100.0 if metric == "eer" else 1.0
    fig = Figure(figsize=(7, 5), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    ax.scatter(
        grid_cost, np.asarray(grid_metric) * scale, s=6, alpha=0.25, color="0.5", label="tau grid"
    )
    ax.plot(curve_cost, np.asarray(curve_metric) * scale, "-", color="C0", label="one tau")
    if curve_ci is not None:
        lo, hi = np.asarray(curve_ci, np.float64).T * scale
        ax.fill_between(curve_cost, lo, hi, color="C0", alpha=0.15, label="95% interval")
    for i, (name, sysm) in enumerate(result["systems"].items()):
        ax.axhline(sysm[metric] * scale, ls="--", lw=1, color=f"C{i + 1}", label=f"{name} alone")
    if result["chosen"] is not None:
        c = result["chosen"]
        ax.plot(
            [c[f"rel_{result['cost']}"]],
            [c[metric] * scale],
            "*",
            ms=14,
            color="C3",
            label="chosen on calibration",
        )
    ax.set_xlabel(f"relative cost per trial ({result['cost']}, FP32 alone = 1)")
    ax.set_ylabel(f"{metric}{' (%)' if metric == 'eer' else ''} on the test trials")
    ax.set_title(f"cascade {' -> '.join(result['stages'])}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_cascade_escalations(distance, stage, names: Sequence[str], path, bins: int = 40) -> Path:
    """Where the trials each stage decided lie against |s_32 - theta| (the FP32 score's
    distance to its EER threshold): escalated trials should be the ambiguous ones."""
    distance, stage = np.asarray(distance), np.asarray(stage)
    fig = Figure(figsize=(7, 4), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    edges = np.histogram_bin_edges(distance, bins=bins)
    ax.hist(
        [distance[stage == p] for p in range(len(names))],
        edges,
        stacked=True,
        label=[f"decided at {n} ({np.mean(stage == p):.0%})" for p, n in enumerate(names)],
    )
    ax.set_xlabel("|s_32 - theta| (FP32 cosine score to its EER threshold)")
    ax.set_ylabel("trials")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_grids(result: Mapping, path) -> Path:
    """EER and weight distortion against bits (``experiments.grids.compare_grids``): one
    curve per method and granularity, PTQ solid, QAT dashed; FP32's EER as a line."""
    fig = Figure(figsize=(10, 4), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 2)
    styles = {("kmeans", False): "C0", ("kmeans", True): "C1", ("uniform", False): "C2",
              ("uniform", True): "C3"}  # fmt: skip
    for mode, ls in (("ptq", "-"), ("qat", "--")):
        for (method, pc), color in styles.items():
            rows = sorted(
                (r for r in result["rows"]
                 if r["mode"] == mode and r["method"] == method and r["per_channel"] == pc),
                key=lambda r: r["bits"],
            )  # fmt: skip
            if not rows:
                continue
            bits = [r["bits"] for r in rows]
            label = f"{mode.upper()} {method} per {'channel' if pc else 'tensor'}"
            eer = np.array([100 * r["eer"] for r in rows])
            if all(r.get("eer_ci") and None not in r["eer_ci"] for r in rows):
                ci = np.array([r["eer_ci"] for r in rows]).T * 100
                yerr = np.clip([eer - ci[0], ci[1] - eer], 0, None)
                axes[0].errorbar(bits, eer, yerr=yerr, fmt="o" + ls, color=color, label=label,
                                 capsize=2)  # fmt: skip
            else:
                axes[0].plot(bits, eer, "o" + ls, color=color, label=label)
            axes[1].plot(bits, [r["distortion"] for r in rows], "o" + ls, color=color, label=label)
    axes[0].axhline(100 * result["fp32"]["eer"], color="k", lw=0.8, ls=":", label="FP32")
    axes[0].set_ylabel("test EER (%)")
    axes[0].set_yscale("log")
    axes[0].yaxis.set_major_formatter(ScalarFormatter())
    axes[0].yaxis.set_minor_formatter(ScalarFormatter())
    axes[1].set_ylabel("||W - Q||^2 / ||W||^2")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("weight bits")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    return _save(fig, path)
