"""Score-level analysis of b-bit models against FP32 on the same trials.

For a bit width b and trial t, the drift is d_b(t) = s_b(t) - s_32(t). A trial is accepted
when ``score >= theta`` (as in ``sqjax.metrics``). A decision flip is a trial whose b-bit
decision differs from the FP32 one; it is harmful when the FP32 decision was right and
beneficial when it was wrong.

Everything returned is JSON-serialisable: dicts of floats, ints, lists, strings and None.
Non-finite floats become None (JSON null); each docstring says what None means there.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence

import numpy as np

from sqjax import metrics
from sqjax.analysis.calibration import min_cllr


def _float(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def _check_pair(s_b, s_32, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    b, y = metrics._check_trials(s_b, labels, "s_b")
    s, _ = metrics._check_trials(s_32, labels, "s_32")
    return b, s, y


# ----------------------------------------------------------------------------- drift


def _summary(d: np.ndarray) -> dict:
    q05, q50, q95 = np.quantile(d, [0.05, 0.5, 0.95])
    return {
        "mean": float(d.mean()),
        "std": float(d.std()),
        "mean_abs": float(np.abs(d).mean()),
        "q05": float(q05),
        "q50": float(q50),
        "q95": float(q95),
        "n": int(d.size),
    }


def drift_stats(s_b, s_32, labels) -> dict:
    """Statistics of the drift d = s_b - s_32, over all, target and non-target trials.

    Returns:
      {"all" | "target" | "nontarget": {"mean", "std" (population, ddof=0), "mean_abs",
      "q05", "q50", "q95" (NumPy's linear quantiles), "n"}}.
    """
    b, s, y = _check_pair(s_b, s_32, labels)
    d = b - s
    return {"all": _summary(d), "target": _summary(d[y]), "nontarget": _summary(d[~y])}


# ----------------------------------------------------------------------------- flips


def fp32_threshold(s_32, labels, kind: str = "eer", p_target: float = 0.01) -> float:
    """The FP32 decision threshold theta: at the EER point, or at minDCF(p_target).

    The minDCF threshold is +inf when rejecting every trial is optimal.
    """
    if kind == "eer":
        return metrics.eer(s_32, labels)[1]
    if kind == "min_dcf":
        return metrics.min_dcf(s_32, labels, p_target=p_target)[1]
    raise ValueError(f"threshold kind must be 'eer' or 'min_dcf', got {kind!r}")


def _count(flip, harmful, beneficial, err_32, err_b) -> dict:
    n = flip.size

    def rate(mask):
        return float(mask.mean()) if n else None

    return {
        "n": int(n),
        "flips": int(flip.sum()),
        "harmful": int(harmful.sum()),
        "beneficial": int(beneficial.sum()),
        "flip_rate": rate(flip),
        "harmful_rate": rate(harmful),
        "beneficial_rate": rate(beneficial),
        "errors_32": int(err_32.sum()),
        "errors_b": int(err_b.sum()),
    }


def _flip_table(acc_b: np.ndarray, acc_32: np.ndarray, y: np.ndarray) -> dict:
    flip = acc_b != acc_32
    err_32, err_b = acc_32 != y, acc_b != y
    harmful, beneficial = flip & ~err_32, flip & err_32
    table = _count(flip, harmful, beneficial, err_32, err_b)
    for name, m in [("target", y), ("nontarget", ~y)]:
        table[name] = _count(flip[m], harmful[m], beneficial[m], err_32[m], err_b[m])
    return table


def flips(s_b, s_32, labels, theta: float) -> dict:
    """Decision flips of s_b against s_32, both decided at theta (``score >= theta``).

    Returns:
      {"n", "flips", "harmful", "beneficial" (counts), "flip_rate", "harmful_rate",
      "beneficial_rate" (count / n), "errors_32", "errors_b" (wrong decisions; their
      difference is harmful - beneficial), and the same under "target" and "nontarget"
      with rates over that class}.
    """
    b, s, y = _check_pair(s_b, s_32, labels)
    return _flip_table(b >= theta, s >= theta, y)


def flips_own_threshold(s_b, s_32, labels) -> dict:
    """Flips when each system decides at its own EER threshold.

    Unlike ``flips`` at the FP32 theta, a b-bit model whose scores are only shifted or
    rescaled (a monotone change) flips nothing here. Same keys as ``flips``, plus
    "theta_32" and "theta_b".
    """
    b, s, y = _check_pair(s_b, s_32, labels)
    theta_32, theta_b = metrics.eer(s, y)[1], metrics.eer(b, y)[1]
    return {**_flip_table(b >= theta_b, s >= theta_32, y), "theta_32": theta_32, "theta_b": theta_b}


def _nearest_rank(dist: np.ndarray) -> np.ndarray:
    """Rank of each trial by distance to theta (0 = nearest; ties in input order)."""
    rank = np.empty(dist.size, dtype=np.int64)
    rank[np.argsort(dist, kind="stable")] = np.arange(dist.size)
    return rank


def _harmful(b, s, y, theta) -> tuple[np.ndarray, np.ndarray]:
    acc_b, acc_32 = b >= theta, s >= theta
    flip = acc_b != acc_32
    return flip, flip & (acc_32 == y)


def _share_nearest(dist, harmful, frac) -> float | None:
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    k = int(np.ceil(frac * dist.size))
    total = harmful.sum()
    return float(harmful[_nearest_rank(dist) < k].sum() / total) if total else None


def harmful_share_nearest(s_b, s_32, labels, theta: float, frac: float = 0.1) -> float | None:
    """Share of all harmful flips among the ceil(frac * T) trials nearest to theta.

    Nearness is |s_32 - theta|. A trial can only flip where |s_32 - theta| <= |drift|, so
    some concentration near theta is expected of any drift; the rate per distance bin of
    ``flip_concentration`` shows how much. None when there is no harmful flip.
    """
    b, s, y = _check_pair(s_b, s_32, labels)
    return _share_nearest(np.abs(s - theta), _harmful(b, s, y, theta)[1], frac)


def _bin_table(bin_of, n_bins, flip, harmful, edges) -> dict:
    n = np.bincount(bin_of, minlength=n_bins)
    nf = np.bincount(bin_of, flip, n_bins).astype(np.int64)
    nh = np.bincount(bin_of, harmful, n_bins).astype(np.int64)
    total = harmful.sum()

    def ratio(num, den):
        return [float(a / c) if c else None for a, c in zip(num, den)]

    return {
        "edges": [_float(e) for e in edges],
        "n": n.tolist(),
        "flips": nf.tolist(),
        "harmful": nh.tolist(),
        "flip_rate": ratio(nf, n),
        "harmful_rate": ratio(nh, n),
        "harmful_share": ratio(nh, np.full(n_bins, total)),
    }


def flip_concentration(
    s_b,
    s_32,
    labels,
    theta: float,
    n_quantile_bins: int = 10,
    std_edges: Sequence[float] = (0.0, 0.25, 0.5, 1.0, 2.0, np.inf),
    nearest_frac: float = 0.1,
) -> dict:
    """Flip and harmful-flip rates in bins of the distance |s_32 - theta|.

    Two binnings:
      "quantile": n_quantile_bins bins of equal trial counts by rank of the distance (ties
        split in input order, so every bin is filled even when distances tie). edges[k] is
        the smallest distance in bin k, edges[-1] the largest distance.
      "std": bins [edges[k], edges[k+1]) of the distance in units of the FP32 score
        standard deviation (over all trials); std_edges must start at 0 and end at inf so
        every trial falls in one bin; the open last edge is None in the output.

    Each binning gives {"edges", "n", "flips", "harmful", "flip_rate", "harmful_rate"
    (per trial of the bin; None for an empty bin), "harmful_share" (of all harmful flips;
    None when there is none)}.

    Returns:
      {"theta", "quantile", "std" (the binning above, plus "std": the FP32 score std),
      "nearest_frac", "harmful_share_nearest" (see ``harmful_share_nearest``)}.
    """
    b, s, y = _check_pair(s_b, s_32, labels)
    if not 1 <= n_quantile_bins <= s.size:
        raise ValueError(
            f"n_quantile_bins must be in [1, {s.size}] (the number of trials), "
            f"got {n_quantile_bins}"
        )
    edges = np.asarray(std_edges, dtype=np.float64)
    if edges.ndim != 1 or edges.size < 2 or edges[0] != 0 or edges[-1] != np.inf:
        raise ValueError(f"std_edges must run from 0 to inf, got {tuple(std_edges)}")
    if np.any(np.diff(edges) <= 0):
        raise ValueError(f"std_edges must increase strictly, got {tuple(std_edges)}")
    if not np.isfinite(theta):
        raise ValueError(f"theta must be finite to measure distances to it, got {theta}")
    flip, harmful = _harmful(b, s, y, theta)
    dist = np.abs(s - theta)

    # The trial of rank r (0 = nearest) goes to bin r * n_bins // T.
    q_bin = _nearest_rank(dist) * n_quantile_bins // s.size
    sorted_dist = np.sort(dist)
    starts = -(-np.arange(n_quantile_bins) * s.size // n_quantile_bins)  # first rank of a bin
    q_edges = np.append(sorted_dist[starts], sorted_dist[-1])

    sd = float(s.std())
    unit = dist / sd if sd > 0 else np.zeros_like(dist)
    s_bin = np.searchsorted(edges, unit, side="right") - 1
    return {
        "theta": _float(theta),
        "quantile": _bin_table(q_bin, n_quantile_bins, flip, harmful, q_edges),
        "std": {**_bin_table(s_bin, edges.size - 1, flip, harmful, edges), "std": sd},
        "nearest_frac": nearest_frac,
        "harmful_share_nearest": _share_nearest(dist, harmful, nearest_frac),
    }


# ----------------------------------------------------------------------------- knee


def knee(bits: Sequence[int], values: Sequence[float], direction: str = "decreasing") -> dict:
    """Knee of a degradation curve (EER, minDCF, mean |drift|) against bit width (Kneedle).

    The x axis is ordinal: the bit widths, FP32 included (pass it as 32), are sorted and
    placed at equal steps, as the paper's figures show FP32, 8, 4, 3, 2, 1. FP32 has no
    natural position on a bits axis: at x = 32 the 8 -> 32 span takes three quarters of
    the normalised axis that Kneedle works on and moves the knee up (a drift curve
    0, .01, .03, .05, .12, .35 gets its knee at 4 bits on that axis, at 2 on the ordinal
    one). The price: the knee depends on which widths were studied.

    Kneedle settings (``kneed.KneeLocator``): S=1, offline, interp1d (no smoothing);
    curve="convex" with direction="decreasing" when the value falls as bits rise (an
    error rate), curve="concave" with "increasing" when it rises (an accuracy). A knee at
    either end of the curve needs a neighbour it does not have, so it counts as no knee.
    On 5-6 points the Kneedle answer is fragile; "strength" (the peak of Kneedle's
    difference curve, 0 for a straight line, up to 1 for a right angle) says how clear
    the bend is.

    Returns:
      {"knee": bit width or None, "bits": [...], "values": [...] (FP32 first, then
      decreasing bits), "strength": float, "statement": a plain sentence}.
    """
    x_bits = np.asarray(bits)
    v = np.asarray(values, dtype=np.float64)
    if x_bits.ndim != 1 or x_bits.shape != v.shape:
        raise ValueError(
            f"bits and values must be 1-D of the same length, got {x_bits.shape} and {v.shape}"
        )
    if len(np.unique(x_bits)) != x_bits.size:
        raise ValueError(f"bits must be distinct, got {x_bits.tolist()}")
    if not np.isfinite(v).all():
        raise ValueError(f"values must be finite, got {v.tolist()}")
    curves = {"decreasing": "convex", "increasing": "concave"}
    if direction not in curves:
        raise ValueError(f"direction must be 'decreasing' or 'increasing', got {direction!r}")
    order = np.argsort(-x_bits, kind="stable")
    x_bits, v = x_bits[order], v[order]
    out = {"bits": [int(b) for b in x_bits], "values": v.tolist(), "knee": None, "strength": 0.0}
    if v.size < 3:
        return {**out, "statement": f"no knee: {v.size} points, a knee needs at least 3"}
    if np.ptp(v) == 0:
        return {**out, "statement": "no knee: the curve is flat"}
    # Imported here: kneed imports matplotlib.pyplot at import time, which plain analyses
    # and the pyplot-free plots module should not drag in.
    from kneed import KneeLocator

    x = -np.arange(v.size, dtype=np.float64)  # ordinal, rising with bits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kneed warns when it finds no knee; we say so below
        kl = KneeLocator(x, v, S=1.0, curve=curves[direction], direction=direction, online=False)
    strength = float(np.max(kl.y_difference))
    out["strength"] = strength
    if kl.knee is None:
        why = f"Kneedle finds no bend above its threshold (strength {strength:.2f})"
        return {**out, "statement": f"no knee stands out: {why}"}
    i = int(np.flatnonzero(x == kl.knee)[0])
    if i in (0, v.size - 1):
        return {
            **out,
            "statement": f"no knee stands out: Kneedle's best point is the end of the "
            f"curve at {x_bits[i]} bits (strength {strength:.2f}), not a bend",
        }
    k = int(x_bits[i])
    return {
        **out,
        "knee": k,
        "statement": f"knee at {k} bits (Kneedle, strength {strength:.2f} of 1): the curve "
        f"bends most sharply there",
    }


# ----------------------------------------------------------------------------- all


def _bits_of(name: str) -> int:
    if name.lower() == "fp32":
        return 32
    m = re.fullmatch(r"(\d+)\s*(bits?)?", name.strip().lower())
    if not m:
        raise ValueError(
            f"cannot read a bit width from precision name {name!r}; name precisions "
            f"'fp32' or '<b>bit', or pass bits=[...]"
        )
    return int(m.group(1))


def score_analysis(
    scores,
    llrs,
    labels,
    precisions: Sequence[str],
    fp32_index: int = 0,
    threshold: str = "eer",
    p_target: float = 0.01,
    bits: Sequence[int] | None = None,
    boot=None,
    level: float = 0.95,
) -> dict:
    """The paper's score-level analysis of P precisions on the same T trials.

    Args:
      scores: (P, T) raw scores, one row per precision.
      llrs: (P, T) calibrated LLRs of the same trials, or None.
      labels: (T,) labels.
      precisions: P names, e.g. ["fp32", "8bit", "4bit", "3bit", "2bit", "1bit"].
      fp32_index: the row of the FP32 reference.
      threshold: "eer" or "min_dcf" (at p_target): how theta is set on FP32 scores.
      bits: bit width of each row (FP32 as 32); read from the names when None.
      boot: resamples of the trials (``uncertainty.bootstrap``), or None for point
        estimates only.
      level: the intervals' coverage.

    Returns:
      {"precisions", "bits", "fp32",
       "theta": {"kind", "p_target", "value" (None when the minDCF threshold is +inf:
         reject all)},
       "per_precision": {name: {
         "metrics": ``metrics.verification_metrics`` of the scores plus "min_cllr", and
           with llrs "act_dcf@0.01", "act_dcf@0.05", "cllr",
         "drift": ``drift_stats`` of the scores, "llr_drift": of the LLRs or None,
         "flips": ``flips`` at theta, "flips_own_threshold", "concentration":
           ``flip_concentration`` at theta (None when theta is +inf)}},
       "knee": {"eer", "min_dcf@0.01", "mean_abs_drift"}: ``knee`` of each against bits}.

      With ``boot``, also: in each "metrics", ``m + "_ci"``, ``"delta_" + m`` (minus
      FP32's), ``"delta_" + m + "_ci"``, ``"rel_delta_" + m`` and its ``_ci`` for every
      metric m of ``uncertainty.compare``; per precision "flip_tests"
      (``uncertainty.flip_tests`` at theta, None when theta is +inf); "knee_stability"
      (``uncertainty.knee_stability`` of EER and mean |drift|); "uncertainty" (level,
      method, the bootstrap's level and size).
    """
    s = np.asarray(scores, dtype=np.float64)
    names = list(precisions)
    if s.ndim != 2 or s.shape[0] != len(names):
        raise ValueError(
            f"scores must be (precisions, trials) with one row per name in precisions "
            f"({len(names)}), got shape {s.shape}"
        )
    lr = None if llrs is None else np.asarray(llrs, dtype=np.float64)
    if lr is not None and lr.shape != s.shape:
        raise ValueError(f"llrs must have the shape of scores {s.shape}, got {lr.shape}")
    if not 0 <= fp32_index < len(names):
        raise ValueError(f"fp32_index must be in [0, {len(names)}), got {fp32_index}")
    bits = [_bits_of(n) for n in names] if bits is None else [int(b) for b in bits]
    if len(bits) != len(names):
        raise ValueError(f"bits must have one entry per precision, got {len(bits)}")

    ref = s[fp32_index]
    theta = fp32_threshold(ref, labels, threshold, p_target)
    per = {}
    for p, name in enumerate(names):  # a handful of precisions; each call is vectorised
        m = {**metrics.verification_metrics(s[p], labels), "min_cllr": min_cllr(s[p], labels)}
        if lr is not None:
            m["act_dcf@0.01"] = metrics.act_dcf(lr[p], labels, 0.01)
            m["act_dcf@0.05"] = metrics.act_dcf(lr[p], labels, 0.05)
            m["cllr"] = metrics.cllr(lr[p], labels)
        per[name] = {
            "metrics": m,
            "drift": drift_stats(s[p], ref, labels),
            "llr_drift": None if lr is None else drift_stats(lr[p], lr[fp32_index], labels),
            "flips": flips(s[p], ref, labels, theta),
            "flips_own_threshold": flips_own_threshold(s[p], ref, labels),
            "concentration": (
                flip_concentration(s[p], ref, labels, theta) if np.isfinite(theta) else None
            ),
        }
    extra = {}
    if boot is not None:
        from sqjax.analysis import uncertainty

        cmp = uncertainty.compare(
            s, labels, names, boot, llrs=lr, reference=fp32_index, level=level
        )
        for name in names:
            per[name]["metrics"].update(cmp["systems"][name])
            per[name]["flip_tests"] = (
                uncertainty.flip_tests(s[names.index(name)], ref, labels, theta, boot, level=level)
                if np.isfinite(theta)
                else None
            )
        drift = uncertainty.drift_samples(boot, s, fp32_index)
        extra["knee_stability"] = uncertainty.knee_stability(
            bits, {"eer": cmp["samples"]["eer"], "mean_abs_drift": drift}
        )
        extra["uncertainty"] = {k: cmp[k] for k in ("level", "method", "bootstrap")}
    curves = {
        "eer": [per[n]["metrics"]["eer"] for n in names],
        "min_dcf@0.01": [per[n]["metrics"]["min_dcf@0.01"] for n in names],
        "mean_abs_drift": [per[n]["drift"]["all"]["mean_abs"] for n in names],
    }
    return {
        "precisions": names,
        "bits": bits,
        "fp32": names[fp32_index],
        "theta": {"kind": threshold, "p_target": p_target, "value": _float(theta)},
        "per_precision": per,
        "knee": {key: knee(bits, vals) for key, vals in curves.items()},
        **extra,
    }
