"""Score calibration per precision: affine LLRs, the PAV bound minCllr, reliability bins.

Pure NumPy/SciPy on arrays. Scores of P precisions on the same T trials come as a (P, T)
array with one (T,) label array (bool or 0/1, 1 = target), as in ``sqjax.metrics``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import isotonic_regression

from sqjax import metrics

# PAV gives posteriors of exactly 0 or 1 to blocks holding one class only; their trials
# cost nothing in the limit llr -> -inf / +inf. Clipping at this distance from 0 and 1
# keeps the LLRs finite (|llr| <= ~23 + |logit(prior)|) and adds at most ~1e-10 bits per
# trial to minCllr, far below anything reported.
PAV_EPS = 1e-10


def _logit(p):
    return np.log(p) - np.log1p(-p)


def _check_stack(scores, labels, name: str = "scores") -> tuple[np.ndarray, np.ndarray]:
    """Validates (P, T) scores against (T,) labels; returns (float64 (P, T), bool (T,))."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2:
        raise ValueError(
            f"{name} must be (precisions, trials), got shape {s.shape}; for one precision "
            f"pass {name}[None]"
        )
    y = None
    for p in range(s.shape[0]):  # P is a handful of precisions, never a trial axis
        _, y = metrics._check_trials(s[p], labels, f"{name}[{p}]")
    return s, y


@dataclass(frozen=True)
class Calibration:
    """Affine calibration llr_p = a[p] * s_p + b[p] of P precisions.

    ``p_target`` is the effective prior the logistic regression was weighted with; the
    output is an LLR whatever it is, but the fit is best near that operating point.
    """

    a: tuple[float, ...]
    b: tuple[float, ...]
    p_target: float

    def apply(self, scores) -> np.ndarray:
        """LLRs of (P, T) scores, float64 (P, T)."""
        s = np.asarray(scores, dtype=np.float64)
        if s.ndim != 2 or s.shape[0] != len(self.a):
            raise ValueError(
                f"Calibration.apply: scores must be ({len(self.a)}, trials), one row per "
                f"calibrated precision, got shape {s.shape}"
            )
        return np.asarray(self.a)[:, None] * s + np.asarray(self.b)[:, None]

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate(scores, labels, p_target: float = 0.05) -> Calibration:
    """Fits one affine calibration per precision by prior-weighted logistic regression.

    Each row goes through ``metrics.fit_calibration`` (BOSARIS convention: targets weigh
    ``p_target / n_tar``, non-targets ``(1 - p_target) / n_non``, and the logit of
    ``p_target`` is an offset, so ``a * s + b`` is an LLR). The default 0.05 is our choice:
    the cascade decides near p_target 0.01-0.05, and 0.05 keeps enough weight on the
    (few) calibration targets for a stable fit.

    Args:
      scores: (P, Tc) calibration-trial scores, disjoint from the test trials.
      labels: (Tc,) labels.
    """
    s, y = _check_stack(scores, labels)
    ab = [metrics.fit_calibration(row, y, p_target=p_target) for row in s]
    return Calibration(
        a=tuple(float(a) for a, _ in ab), b=tuple(float(b) for _, b in ab), p_target=p_target
    )


def pav_llrs(scores, labels) -> np.ndarray:
    """LLRs of the optimal monotone calibration of one score array (PAV), shape (T,).

    Trials are sorted by score with targets before non-targets among equal scores, so PAV
    pools every run of tied scores (they share one LLR, the pessimistic choice of BOSARIS
    ``opt_loglr``). The isotonic fit of the labels is a posterior at the empirical prior
    pi = n_tar / T; the LLR is ``logit(posterior) - logit(pi)``, with posteriors clipped to
    [PAV_EPS, 1 - PAV_EPS].
    """
    s, y = metrics._check_trials(scores, labels)
    # lexsort's last key is primary: ascending score, then ~y ascending = targets first.
    order = np.lexsort((~y, s))
    posterior = np.empty_like(s)
    posterior[order] = isotonic_regression(y[order].astype(np.float64)).x
    posterior = np.clip(posterior, PAV_EPS, 1.0 - PAV_EPS)
    return _logit(posterior) - _logit(y.mean())


def min_cllr(scores, labels) -> float:
    """minCllr in bits: the Cllr of the PAV-calibrated LLRs (``pav_llrs``).

    The lowest Cllr any monotone calibration of these scores reaches on these trials;
    ``cllr - min_cllr`` of calibrated LLRs is their calibration loss.
    """
    return metrics.cllr(pav_llrs(scores, labels), labels)


def reliability(llrs, labels, n_bins: int = 10) -> dict:
    """Predicted target posterior against the observed target fraction, in bins.

    The posterior of a trial is ``sigmoid(llr + logit(pi))`` at the empirical prior
    pi = n_tar / T of these trials, which is what the observed fraction measures; for
    calibrated LLRs the two agree. Bins hold equal numbers of trials (by rank of the LLR,
    ties split in input order), so a skewed prior does not leave most bins empty.

    Returns:
      {"predicted": [n_bins] mean posterior, "observed": [n_bins] target fraction,
      "n": [n_bins] trials per bin, "prior": pi}.
    """
    s, y = metrics._check_trials(llrs, labels, "llrs")
    if not 1 <= n_bins <= len(s):
        raise ValueError(f"n_bins must be in [1, {len(s)}] (the number of trials), got {n_bins}")
    prior = float(y.mean())
    posterior = 0.5 * (1.0 + np.tanh(0.5 * (s + _logit(prior))))  # stable sigmoid
    rank = np.empty(len(s), dtype=np.int64)
    rank[np.argsort(s, kind="stable")] = np.arange(len(s))
    bin_of = rank * n_bins // len(s)
    n = np.bincount(bin_of, minlength=n_bins)
    return {
        "predicted": (np.bincount(bin_of, posterior, n_bins) / n).tolist(),
        "observed": (np.bincount(bin_of, y, n_bins) / n).tolist(),
        "n": n.tolist(),
        "prior": prior,
    }
