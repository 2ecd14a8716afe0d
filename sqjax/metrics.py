"""Speaker-verification metrics: EER, minDCF, actDCF, Cllr, DET curve and score calibration.

Pure NumPy. Every function takes one score (or LLR) per trial as a 1-D array and a label
array of the same length (bool or 0/1, 1 = target trial). A trial is accepted as target
when ``score >= threshold``.

All threshold sweeps share one sort and cumulative sums, so they are O(n log n). Trials with
equal scores always change decision together: the operating points of a sweep are the
thresholds ``+inf`` (accept nothing) and every distinct score, in decreasing order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_LOG2 = np.log(2.0)


def _check_trials(scores, labels, name: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    """Validates scores/labels and returns them as (float64, bool) arrays of shape (n,)."""
    s = np.asarray(scores)
    y = np.asarray(labels)
    if s.ndim != 1:
        raise ValueError(
            f"{name} must be 1-D (one value per trial), got shape {s.shape}; "
            f"flatten it with .ravel()"
        )
    if y.ndim != 1:
        raise ValueError(
            f"labels must be 1-D (one label per trial), got shape {y.shape}; "
            f"flatten it with .ravel()"
        )
    if len(s) != len(y):
        raise ValueError(
            f"{name} and labels must have the same length, got {len(s)} and "
            f"{len(y)}; pass one label per trial"
        )
    if not np.issubdtype(s.dtype, np.number) or np.issubdtype(s.dtype, np.complexfloating):
        raise ValueError(f"{name} must be real numbers, got dtype {s.dtype}")
    s = s.astype(np.float64)
    bad = ~np.isfinite(s)
    if bad.any():
        raise ValueError(
            f"{name} must be finite, got {int(bad.sum())} NaN/inf values "
            f"(first at index {int(np.argmax(bad))}); fix or drop those trials"
        )
    if y.dtype != np.bool_:
        if not np.issubdtype(y.dtype, np.number) or not np.isin(y, (0, 1)).all():
            extra = np.setdiff1d(np.unique(y), [0, 1]) if y.dtype.kind in "iuf" else y
            raise ValueError(
                f"labels must be bool or 0/1 (1 = target), got values such as "
                f"{extra[:5].tolist()}; map them to 0/1"
            )
        y = y.astype(bool)
    n_tar = int(y.sum())
    if n_tar == 0 or n_tar == len(y):
        missing = "target" if n_tar == 0 else "non-target"
        raise ValueError(
            f"labels must contain both classes, but there is no {missing} trial "
            f"among {len(y)}; use a trial list with targets and non-targets"
        )
    return s, y


def _check_costs(p_target: float, c_miss: float, c_fa: float) -> None:
    if not 0.0 < p_target < 1.0:
        raise ValueError(f"p_target must be in (0, 1), got {p_target}")
    if not (c_miss > 0 and c_fa > 0):
        raise ValueError(f"c_miss and c_fa must be > 0, got c_miss={c_miss}, c_fa={c_fa}")


def _sweep(s: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Error rates at every operating point of a decreasing-threshold sweep.

    Returns:
      (p_fa, p_miss, thresholds), each of shape (m + 1,) for m distinct scores: the first
      point is threshold +inf (p_fa=0, p_miss=1), the last the lowest score (p_fa=1,
      p_miss=0).
    """
    order = np.argsort(s, kind="stable")[::-1]
    s_sorted, y_sorted = s[order], y[order]
    # Last index of every run of equal scores: a threshold can only sit between runs.
    ends = np.append(np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), len(s) - 1)
    tar_acc = np.cumsum(y_sorted)[ends]
    non_acc = ends + 1 - tar_acc
    n_tar, n_non = tar_acc[-1], non_acc[-1]
    p_fa = np.concatenate([[0.0], non_acc / n_non])
    p_miss = np.concatenate([[1.0], 1.0 - tar_acc / n_tar])
    thresholds = np.concatenate([[np.inf], s_sorted[ends]])
    return p_fa, p_miss, thresholds


def _eer_from_sweep(p_fa, p_miss, thresholds) -> tuple[float, float]:
    # fnr - fpr falls strictly from +1 to -1 along the sweep; the EER is where the straight
    # DET segment between the two points that bracket the sign change crosses fnr = fpr.
    # Walking a segment is what breaking a tie at random does, so ties are exact.
    diff = p_miss - p_fa
    k = int(np.flatnonzero(diff >= 0)[-1])
    alpha = diff[k] / (diff[k] - diff[k + 1])
    eer = p_fa[k] + alpha * (p_fa[k + 1] - p_fa[k])
    # The threshold is that of the bracketing point nearer to the crossing (never +inf).
    j = k + 1 if abs(diff[k + 1]) <= abs(diff[k]) else k
    return float(eer), float(thresholds[j])


def _min_dcf_from_sweep(p_fa, p_miss, thresholds, p_target, c_miss, c_fa) -> tuple[float, float]:
    dcf = c_miss * p_target * p_miss + c_fa * (1.0 - p_target) * p_fa
    c_default = min(c_miss * p_target, c_fa * (1.0 - p_target))
    i = int(np.argmin(dcf))
    return float(dcf[i] / c_default), float(thresholds[i])


def det_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DET operating points of a decreasing-threshold sweep.

    Returns:
      (p_fa, p_miss, thresholds), each (m + 1,) for m distinct scores. Point i accepts the
      trials with ``score >= thresholds[i]``; thresholds[0] = +inf gives (p_fa, p_miss) =
      (0, 1) and thresholds[-1] = min(scores) gives (1, 0).
    """
    return _sweep(*_check_trials(scores, labels))


def eer(scores, labels) -> tuple[float, float]:
    """Equal error rate and its threshold.

    Convention (as WeSpeaker's ``compute_eer``): the miss rate ``1 - tpr`` and false-alarm
    rate ``fpr`` are taken at every threshold of the sweep; the EER is where the straight
    line between the last point with ``fnr >= fpr`` and the first with ``fnr < fpr``
    crosses ``fnr = fpr``. Unlike WeSpeaker, tied scores form one operating point, so the
    result does not depend on the order of tied trials.

    Returns:
      (eer, threshold): eer in [0, 1]; the threshold of the bracketing operating point
      nearer to the crossing (accept when ``score >= threshold``).
    """
    return _eer_from_sweep(*_sweep(*_check_trials(scores, labels)))


def min_dcf(
    scores, labels, p_target: float = 0.01, c_miss: float = 1.0, c_fa: float = 1.0
) -> tuple[float, float]:
    """Minimum normalised detection cost over all thresholds (Kaldi/WeSpeaker).

    DCF(t) = c_miss * p_target * P_miss(t) + c_fa * (1 - p_target) * P_fa(t), divided by
    min(c_miss * p_target, c_fa * (1 - p_target)), the cost of always deciding the same.

    Returns:
      (min_dcf, threshold); the threshold is +inf when rejecting everything is optimal.
    """
    _check_costs(p_target, c_miss, c_fa)
    sweep = _sweep(*_check_trials(scores, labels))
    return _min_dcf_from_sweep(*sweep, p_target, c_miss, c_fa)


def bayes_threshold(p_target: float, c_miss: float = 1.0, c_fa: float = 1.0) -> float:
    """The Bayes decision threshold on LLRs: -logit(p_eff) = log(c_fa (1-p) / (c_miss p))."""
    _check_costs(p_target, c_miss, c_fa)
    return float(np.log(c_fa * (1.0 - p_target)) - np.log(c_miss * p_target))


def act_dcf(llrs, labels, p_target: float = 0.01, c_miss: float = 1.0, c_fa: float = 1.0) -> float:
    """Actual normalised DCF of LLRs decided at the Bayes threshold.

    A trial is accepted when ``llr >= -logit(p_eff)`` (see ``bayes_threshold``); the cost is
    normalised as in ``min_dcf``, so actDCF >= minDCF and the gap measures miscalibration.
    """
    s, y = _check_trials(llrs, labels, "llrs")
    theta = bayes_threshold(p_target, c_miss, c_fa)
    p_miss = np.mean(s[y] < theta)
    p_fa = np.mean(s[~y] >= theta)
    dcf = c_miss * p_target * p_miss + c_fa * (1.0 - p_target) * p_fa
    return float(dcf / min(c_miss * p_target, c_fa * (1.0 - p_target)))


def cllr(llrs, labels) -> float:
    """Log-likelihood-ratio cost in bits (Brümmer).

    Cllr = 1/2 [mean_tar log2(1 + e^-llr) + mean_non log2(1 + e^llr)]; 1 bit for llr = 0
    everywhere, 0 for perfect, confident LLRs.
    """
    s, y = _check_trials(llrs, labels, "llrs")
    # logaddexp(0, x) = log(1 + e^x) without overflow for large |x|.
    c_tar = np.mean(np.logaddexp(0.0, -s[y]))
    c_non = np.mean(np.logaddexp(0.0, s[~y]))
    return float(0.5 * (c_tar + c_non) / _LOG2)


def fit_calibration(
    scores, labels, p_target: float = 0.5, max_iter: int = 50, tol: float = 1e-10
) -> tuple[float, float]:
    """Fits llr = a * score + b by prior-weighted logistic regression (BOSARIS style).

    Minimises p_target * mean_tar softplus(-z) + (1 - p_target) * mean_non softplus(z) with
    z = a * s + b + logit(p_target), so that a * s + b is an LLR whatever the ratio of
    target to non-target trials. Solved by damped Newton steps on standardised scores. A
    tiny ridge on the slope (1e-6 times the smaller class prior, since the loss scales
    with it) keeps the solution finite when the classes are separable.

    Returns:
      (a, b) such that ``apply_calibration(scores, a, b)`` gives LLRs.
    """
    if not 0.0 < p_target < 1.0:
        raise ValueError(f"p_target must be in (0, 1), got {p_target}")
    s, y = _check_trials(scores, labels)
    # Standardising makes the Hessian well conditioned whatever the score scale.
    mu, sd = s.mean(), s.std()
    sd = sd if sd > 0 else 1.0
    x = np.stack([(s - mu) / sd, np.ones_like(s)], axis=1)
    sign = np.where(y, 1.0, -1.0)
    w = np.where(y, p_target / y.sum(), (1.0 - p_target) / (~y).sum())
    offset = np.log(p_target) - np.log1p(-p_target)
    ridge = np.array([1e-6 * min(p_target, 1.0 - p_target), 0.0])

    def loss(theta):
        return np.sum(w * np.logaddexp(0.0, -sign * (x @ theta + offset))) + 0.5 * ridge @ theta**2

    theta = np.zeros(2)
    f = loss(theta)
    for _ in range(max_iter):
        z = x @ theta + offset
        p = 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid(z), stable for large |z|
        grad = x.T @ (w * (p - (sign > 0))) + ridge * theta
        hess = (x * (w * p * (1.0 - p))[:, None]).T @ x + np.diag(ridge)
        step = np.linalg.solve(hess + 1e-12 * np.eye(2), grad)
        t = 1.0
        while True:  # backtracking keeps every step a descent step
            f_new = loss(theta - t * step)
            if f_new <= f or t < 1e-8:
                break
            t *= 0.5
        theta, f_old, f = theta - t * step, f, f_new
        if grad @ step < tol or f_old - f < tol * 1e-3:
            break
    a_std, b_std = theta
    return float(a_std / sd), float(b_std - a_std * mu / sd)


def apply_calibration(scores, a: float, b: float) -> np.ndarray:
    """LLRs ``a * scores + b`` (float64, same shape as scores)."""
    return a * np.asarray(scores, dtype=np.float64) + b


def verification_metrics(scores, labels, p_targets: Sequence[float] = (0.01, 0.05)) -> dict:
    """EER and minDCF at each p_target (C_miss = C_fa = 1) from one sweep.

    Returns:
      {"eer", "eer_threshold", "min_dcf@<p>" for each p (formatted with ``{p:g}``, e.g.
      "min_dcf@0.01"), "n_target", "n_nontarget"}.
    """
    s, y = _check_trials(scores, labels)
    sweep = _sweep(s, y)
    e, thr = _eer_from_sweep(*sweep)
    out = {"eer": e, "eer_threshold": thr}
    for p in p_targets:
        _check_costs(p, 1.0, 1.0)
        out[f"min_dcf@{p:g}"] = _min_dcf_from_sweep(*sweep, p, 1.0, 1.0)[0]
    out["n_target"] = int(y.sum())
    out["n_nontarget"] = int((~y).sum())
    return out


# ------------------------------------------------------------- many systems, one trial list


def _check_rows(scores, labels, name: str) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(f"{name} must be (systems, trials), got shape {s.shape}")
    _, y = _check_trials(s[0], labels, f"{name}[0]")
    if not np.isfinite(s).all():
        raise ValueError(f"{name} must be finite; fix or drop the NaN/inf trials")
    return s, y


def _sweep_rows(s: np.ndarray, y: np.ndarray):
    """``_sweep`` of every row at once: (p_fa, p_miss, valid) of shape (G, T + 1), where
    ``valid`` marks the operating points (the +inf point and the last trial of each run
    of tied scores), so the result equals ``_sweep`` row by row."""
    # Any sort order will do: within a run of tied scores only the last point is valid.
    order = np.argsort(-s, axis=1)
    s_sorted = np.take_along_axis(s, order, axis=1)
    tar = np.cumsum(y[order], axis=1)
    non = np.arange(1, s.shape[1] + 1) - tar
    n_tar, n_non = y.sum(), (~y).sum()
    g = s.shape[0]
    p_fa = np.concatenate([np.zeros((g, 1)), non / n_non], axis=1)
    p_miss = np.concatenate([np.ones((g, 1)), 1.0 - tar / n_tar], axis=1)
    ends = np.concatenate([s_sorted[:, 1:] != s_sorted[:, :-1], np.ones((g, 1), bool)], axis=1)
    valid = np.concatenate([np.ones((g, 1), bool), ends], axis=1)
    return p_fa, p_miss, valid


_ROW_CHUNK = 1 << 22  # elements per chunk of rows: bounds the sweeps' temporary memory


def _by_chunks(fn, s: np.ndarray, y: np.ndarray) -> np.ndarray:
    rows = max(1, _ROW_CHUNK // max(s.shape[1], 1))
    return np.concatenate([fn(s[i : i + rows], y) for i in range(0, len(s), rows)])


def _eer_of_sweep_rows(p_fa, p_miss, valid) -> np.ndarray:
    diff = p_miss - p_fa
    idx = np.arange(diff.shape[1])
    k = np.where(valid & (diff >= 0), idx, -1).max(axis=1)
    k2 = np.where(valid & (idx > k[:, None]), idx, diff.shape[1]).min(axis=1)
    rows = np.arange(len(p_fa))
    d0, d1 = diff[rows, k], diff[rows, k2]
    alpha = d0 / (d0 - d1)
    return p_fa[rows, k] + alpha * (p_fa[rows, k2] - p_fa[rows, k])


def _min_dcf_of_sweep_rows(p_fa, p_miss, valid, p_target: float) -> np.ndarray:
    dcf = np.where(valid, p_target * p_miss + (1.0 - p_target) * p_fa, np.inf)
    return dcf.min(axis=1) / min(p_target, 1.0 - p_target)


def verification_metrics_rows(
    scores, labels, p_targets: Sequence[float] = (0.01, 0.05)
) -> dict[str, np.ndarray]:
    """``verification_metrics``' EER and minDCF for every row of ``(G, T)`` scores, from one
    sort per chunk of rows: ``{"eer": (G,), "min_dcf@<p>": (G,) ...}``."""
    for p in p_targets:
        _check_costs(p, 1.0, 1.0)
    s, y = _check_rows(scores, labels, "scores")
    keys = ["eer", *(f"min_dcf@{p:g}" for p in p_targets)]

    def chunk(s, y):
        sweep = _sweep_rows(s, y)
        cols = [_eer_of_sweep_rows(*sweep)]
        cols += [_min_dcf_of_sweep_rows(*sweep, p) for p in p_targets]
        return np.stack(cols, axis=1)

    out = _by_chunks(chunk, s, y)
    return {k: out[:, i] for i, k in enumerate(keys)}


def eer_rows(scores, labels) -> np.ndarray:
    """``eer(scores[g], labels)[0]`` for every row g of ``(G, T)`` scores; ``(G,)``."""
    return verification_metrics_rows(scores, labels, ())["eer"]


def min_dcf_rows(scores, labels, p_target: float = 0.01) -> np.ndarray:
    """``min_dcf(scores[g], labels, p_target)[0]`` for every row g (C_miss = C_fa = 1)."""
    return verification_metrics_rows(scores, labels, (p_target,))[f"min_dcf@{p_target:g}"]


def act_dcf_rows(llrs, labels, p_target: float = 0.01) -> np.ndarray:
    """``act_dcf(llrs[g], labels, p_target)`` for every row g (C_miss = C_fa = 1)."""
    s, y = _check_rows(llrs, labels, "llrs")
    theta = bayes_threshold(p_target)
    p_miss = np.mean(s[:, y] < theta, axis=1)
    p_fa = np.mean(s[:, ~y] >= theta, axis=1)
    return (p_target * p_miss + (1.0 - p_target) * p_fa) / min(p_target, 1.0 - p_target)


def cllr_rows(llrs, labels) -> np.ndarray:
    """``cllr(llrs[g], labels)`` for every row g."""
    s, y = _check_rows(llrs, labels, "llrs")
    c_tar = np.mean(np.logaddexp(0.0, -s[:, y]), axis=1)
    c_non = np.mean(np.logaddexp(0.0, s[:, ~y]), axis=1)
    return 0.5 * (c_tar + c_non) / _LOG2
