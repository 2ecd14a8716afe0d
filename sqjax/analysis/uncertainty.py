"""Uncertainty of verification results: bootstrap intervals, paired differences, flip
tests, the knee's stability and three-valued verdicts.

Arrays in, plain results out. Every system is scored on the same T trials, so one set of
resamples serves all of them and a difference between two systems is taken resample by
resample (a paired bootstrap).

**Speaker bootstrap (the default).** Trials share speakers, and a speaker's trials rise
and fall together, so resampling trials as if they were independent understates the
spread (a test shows it). Following the "subsets bootstrap" of Bolle, Ratha and Pankanti
(*Error analysis of pattern recognition systems -- the subsets bootstrap*, CVIU 93, 2004),
the speakers are the units: each resample draws S speakers with replacement out of the S
of the trial list, and a speaker drawn c times stands for c distinct speakers. So:

- a target trial of speaker s counts c_s times (each copy has its own target trials);
- a non-target trial of speakers a and b counts c_a * c_b times (every copy of a meets
  every copy of b);
- two copies of one speaker would make pairs of "different" speakers with the same voice;
  no such trial exists in the list, so none is made up.

A trial then enters each statistic with its integer weight; a weight of 2 is exactly the
trial listed twice (tied scores form one operating point, as in ``sqjax.metrics``).

**Trial bootstrap** (``level="trial"``) draws T trials with replacement, the classical
bootstrap of a trial list (what ``scipy.stats.bootstrap`` does); use it only where trials
really are independent.

**Speed.** Each system's scores are sorted once; a resample is then a cumulative sum of
its weights in that order (a weighted DET sweep), computed for blocks of resamples at
once. No resample sorts and no Python loop runs over trials.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numba
import numpy as np
from scipy import special, stats

from sqjax import metrics

LEVELS = ("speaker", "trial")
METHODS = ("percentile", "bca")
_BLOCK = 1 << 21  # resample x trial elements per block: bounds the temporary memory


class Bootstrap(NamedTuple):
    """R resamples of a trial list, as integer weights per trial.

    ``counts`` is ``(R, U)``: how often each unit (speaker, or trial at the trial level)
    was drawn. ``unit_a``/``unit_b`` are ``(T,)``: a trial's weight is
    ``counts[:, unit_a] * counts[:, unit_b]``, where ``unit_b`` points to a column of ones
    (index U) for target trials and at the trial level. Built by ``bootstrap``.
    """

    level: str
    counts: np.ndarray
    unit_a: np.ndarray
    unit_b: np.ndarray

    @property
    def n_resamples(self) -> int:
        return self.counts.shape[0]

    def weighted_sums(self, terms, counts: np.ndarray | None = None) -> np.ndarray:
        """``(R, k)`` weighted sums ``sum_t w_r(t) terms[t]`` of ``(T, k)`` per-trial terms.

        Trials with the same units share a weight, so the terms are summed per pair of
        units first and the resamples are one matrix product over those cells.
        """
        counts = self.counts if counts is None else counts
        terms = np.asarray(terms, np.float64)
        n_units = self.counts.shape[1] + 1
        cells, inv = np.unique(self.unit_a * n_units + self.unit_b, return_inverse=True)
        per_cell = np.stack(
            [np.bincount(inv, col, len(cells)) for col in terms.T], axis=1
        )  # (C, k): k columns, each one bincount over the trials
        ca, cb = cells // n_units, cells % n_units
        ext = _extended(counts)
        out = np.zeros((len(counts), terms.shape[1]))
        step = max(1, _BLOCK // len(counts))
        for i in range(0, len(cells), step):  # blocks of cells bound the (R, cells) weights
            w = ext[:, ca[i : i + step]] * ext[:, cb[i : i + step]]
            out += w.astype(np.float64) @ per_cell[i : i + step]
        return out


def _extended(counts: np.ndarray) -> np.ndarray:
    """Counts with a last column of ones, the unit_b of target (and trial-level) trials."""
    return np.concatenate([counts, np.ones((len(counts), 1), np.int32)], axis=1).astype(np.int32)


def bootstrap(
    labels,
    enroll_speakers=None,
    test_speakers=None,
    *,
    level: str = "speaker",
    n_resamples: int = 1000,
    seed: int = 0,
) -> Bootstrap:
    """Draws the resamples of a trial list.

    Args:
      labels: ``(T,)`` bool or 0/1, 1 = target.
      enroll_speakers, test_speakers: ``(T,)`` speaker of each side of each trial (any
        hashable values); needed at the speaker level. A target trial must have one
        speaker on both sides, a non-target two different ones.
      level: "speaker" (resample speakers; the default) or "trial".
      n_resamples: R.
      seed: NumPy seed; the same seed gives the same resamples.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {list(LEVELS)}, got {level!r}")
    if int(n_resamples) < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    y = np.asarray(labels)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"labels must be a non-empty 1-D array, got shape {y.shape}")
    y = y.astype(bool)
    rng = np.random.default_rng(seed)
    t = y.size
    if level == "trial":
        units = np.arange(t, dtype=np.int32)
        counts = _multinomial(rng, t, t, n_resamples)
        return Bootstrap(level, counts, units, np.full(t, t, np.int32))
    if enroll_speakers is None or test_speakers is None:
        raise ValueError(
            "the speaker bootstrap needs enroll_speakers and test_speakers (one speaker per "
            "trial and side); pass them, or level='trial'"
        )
    enroll, test = np.asarray(enroll_speakers), np.asarray(test_speakers)
    if enroll.shape != (t,) or test.shape != (t,):
        raise ValueError(
            f"enroll_speakers and test_speakers must be 1-D with one speaker per trial "
            f"({t}), got shapes {enroll.shape} and {test.shape}"
        )
    names, codes = np.unique(np.concatenate([enroll, test]), return_inverse=True)
    a, b = codes[:t], codes[t:]
    same = a == b
    bad = np.flatnonzero(same != y)
    if bad.size:
        i = int(bad[0])
        kind = "target" if y[i] else "non-target"
        raise ValueError(
            f"trial {i} is a {kind} trial with speakers {names[a[i]]!r} and {names[b[i]]!r} "
            f"({bad.size} such trials): a target trial needs one speaker on both sides, a "
            f"non-target two; check the trial list against utt2spk"
        )
    s = len(names)
    counts = _multinomial(rng, s, s, n_resamples)
    return Bootstrap(level, counts, a.astype(np.int32), np.where(y, s, b).astype(np.int32))


def _multinomial(rng, n_units: int, n_draws: int, n_resamples: int) -> np.ndarray:
    """``(R, U)`` int32 counts of ``n_draws`` uniform draws out of ``n_units``."""
    out = np.empty((n_resamples, n_units), np.int32)
    rows = max(1, _BLOCK // max(n_draws, 1))
    for i in range(0, n_resamples, rows):  # blocks of resamples, not trials
        r = min(rows, n_resamples - i)
        draws = rng.integers(0, n_units, (r, n_draws)) + n_units * np.arange(r)[:, None]
        out[i : i + r] = np.bincount(draws.ravel(), minlength=r * n_units).reshape(r, n_units)
    return out


# ----------------------------------------------------------------------------- statistics


@numba.njit(parallel=True, cache=True)
def _class_totals(ext, a, b, y):  # pragma: no cover - compiled
    """Total target and non-target weight of each resample: two ``(R,)`` int64."""
    n_tar = np.zeros(ext.shape[0], np.int64)
    n_non = np.zeros(ext.shape[0], np.int64)
    for r in numba.prange(ext.shape[0]):
        t = 0
        n = 0
        for i in range(a.shape[0]):
            w = ext[r, a[i]] * ext[r, b[i]]
            if y[i]:
                t += w
            else:
                n += w
        n_tar[r] = t
        n_non[r] = n
    return n_tar, n_non


_RB = 8  # resamples per pass over the trials: each trial is read once for all of them


@numba.njit(parallel=True, cache=True)
def _weighted_sweeps(ext, a, b, y, end, n_tar, n_non, p_targets, out):  # pragma: no cover
    """EER and minDCF of every resample's weighted DET sweep of one system, into
    ``out`` ``(R, 1 + len(p_targets))``. ``a, b, y, end`` are the trials in decreasing
    score order; ``end`` marks the last trial of each run of tied scores (the operating
    points). Conventions as ``metrics.eer`` and ``metrics.min_dcf``."""
    n_r, n_p = ext.shape[0], p_targets.shape[0]
    for blk in numba.prange((n_r + _RB - 1) // _RB):
        r0 = blk * _RB
        m = min(_RB, n_r - r0)
        tar = np.zeros(_RB, np.int64)
        tot = np.zeros(_RB, np.int64)
        fa0 = np.zeros(_RB)  # the +inf point: p_fa 0, p_miss - p_fa = 1
        d0 = np.ones(_RB)
        eer = np.full(_RB, np.nan)
        best = np.empty((_RB, n_p))  # the +inf point: reject all, DCF = p_target
        for k in range(_RB):
            best[k] = p_targets
        for i in range(a.shape[0]):
            ai, bi, yi = a[i], b[i], y[i]
            for k in range(m):
                w = ext[r0 + k, ai] * ext[r0 + k, bi]
                tot[k] += w
                if yi:
                    tar[k] += w
            if not end[i]:
                continue
            for k in range(m):
                nt, nn = n_tar[r0 + k], n_non[r0 + k]
                p_miss = 1.0 - tar[k] / nt
                p_fa = (tot[k] - tar[k]) / nn
                d = p_miss - p_fa  # falls along the sweep; the EER is where it crosses 0
                if np.isnan(eer[k]):
                    if d < 0:
                        eer[k] = fa0[k] + d0[k] / (d0[k] - d) * (p_fa - fa0[k])
                    else:
                        fa0[k], d0[k] = p_fa, d
                for j in range(n_p):
                    c = p_targets[j] * p_miss + (1.0 - p_targets[j]) * p_fa
                    best[k, j] = min(best[k, j], c)
        for k in range(m):
            r = r0 + k
            if n_tar[r] == 0 or n_non[r] == 0:
                out[r, :] = np.nan
                continue
            out[r, 0] = eer[k]
            for j in range(n_p):
                out[r, 1 + j] = best[k, j] / min(p_targets[j], 1.0 - p_targets[j])


def _llr_columns(llrs: np.ndarray, y: np.ndarray, p_targets) -> np.ndarray:
    """``(T, P, 2 + 2 len(p_targets) + 2)`` per-trial terms whose weighted sums give
    actDCF and Cllr: class indicators, misses and false alarms at each Bayes threshold,
    and the two Cllr losses."""
    lt = llrs.T
    yt, yn = y[:, None].astype(np.float64), (~y)[:, None].astype(np.float64)
    cols = [np.broadcast_to(yt, lt.shape), np.broadcast_to(yn, lt.shape)]
    for p in p_targets:
        theta = metrics.bayes_threshold(p)
        cols += [yt * (lt < theta), yn * (lt >= theta)]
    cols += [yt * np.logaddexp(0.0, -lt), yn * np.logaddexp(0.0, lt)]
    return np.stack(cols, axis=2)


def _llr_metrics(sums: np.ndarray, p_targets) -> np.ndarray:
    """actDCF at each p_target and Cllr from the weighted sums of ``_llr_columns``:
    ``(r, P, len(p_targets) + 1)``."""
    n_tar, n_non = sums[..., 0], sums[..., 1]
    out = []
    with np.errstate(invalid="ignore", divide="ignore"):
        for i, p in enumerate(p_targets):
            miss, fa = sums[..., 2 + 2 * i] / n_tar, sums[..., 3 + 2 * i] / n_non
            out.append((p * miss + (1.0 - p) * fa) / min(p, 1.0 - p))
        out.append(0.5 * (sums[..., -2] / n_tar + sums[..., -1] / n_non) / math.log(2.0))
    return np.stack(out, axis=-1)


def metric_names(p_targets: Sequence[float] = (0.01, 0.05), llrs: bool = True) -> list[str]:
    """The metrics ``resample_metrics`` computes, in its column order."""
    names = ["eer", *(f"min_dcf@{p:g}" for p in p_targets)]
    if llrs:
        names += [*(f"act_dcf@{p:g}" for p in p_targets), "cllr"]
    return names


def resample_metrics(
    boot: Bootstrap,
    scores,
    labels,
    llrs=None,
    p_targets: Sequence[float] = (0.01, 0.05),
    counts: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Every metric of every system on every resample.

    Args:
      boot: resamples from ``bootstrap`` over the same trials.
      scores: ``(P, T)`` raw scores of P systems.
      llrs: ``(P, T)`` calibrated LLRs of the same systems, or None (then no actDCF, Cllr).
      counts: resample counts to use instead of ``boot.counts`` (the jackknife's).

    Returns:
      ``{name: (R, P)}`` for the names of ``metric_names``; NaN for a resample that drew
      no target or no non-target trial.
    """
    s, y = _check(scores, labels, "scores")
    lr = None if llrs is None else _check(llrs, labels, "llrs")[0]
    if lr is not None and lr.shape != s.shape:
        raise ValueError(f"llrs must have the shape of scores {s.shape}, got {lr.shape}")
    if len(boot.unit_a) != s.shape[1]:
        raise ValueError(
            f"the bootstrap was drawn for {len(boot.unit_a)} trials, the scores have "
            f"{s.shape[1]}; draw it from these trials' labels"
        )
    for p in p_targets:
        metrics._check_costs(p, 1.0, 1.0)
    counts = boot.counts if counts is None else np.asarray(counts, np.int32)
    ext = _extended(counts)
    n_tar, n_non = _class_totals(ext, boot.unit_a, boot.unit_b, y)
    pt = np.asarray(p_targets, np.float64)
    sweeps = np.empty((len(counts), s.shape[0], 1 + len(pt)))
    for p, row in enumerate(s):  # P sorts, once each; the resamples are one compiled loop
        order = np.argsort(-row, kind="stable")
        srow = row[order]
        end = np.append(srow[1:] != srow[:-1], True)
        a, b = boot.unit_a[order], boot.unit_b[order]
        _weighted_sweeps(ext, a, b, y[order], end, n_tar, n_non, pt, sweeps[:, p])
    parts = [sweeps]
    if lr is not None:
        terms = _llr_columns(lr, y, p_targets).reshape(s.shape[1], -1)
        sums = boot.weighted_sums(terms, counts).reshape(len(counts), s.shape[0], -1)
        parts.append(_llr_metrics(sums, p_targets))
    out = np.concatenate(parts, axis=2)
    return {name: out[:, :, j] for j, name in enumerate(metric_names(p_targets, lr is not None))}


def point_metrics(scores, labels, llrs=None, p_targets=(0.01, 0.05)) -> dict[str, np.ndarray]:
    """The metrics of ``resample_metrics`` on the trial list itself: ``{name: (P,)}``."""
    s, y = _check(scores, labels, "scores")
    out = dict(metrics.verification_metrics_rows(s, y, p_targets))
    if llrs is not None:
        lr = _check(llrs, labels, "llrs")[0]
        for p in p_targets:
            out[f"act_dcf@{p:g}"] = metrics.act_dcf_rows(lr, y, p)
        out["cllr"] = metrics.cllr_rows(lr, y)
    return {k: np.asarray(out[k], np.float64) for k in metric_names(p_targets, llrs is not None)}


def _check(scores, labels, name) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, np.float64)
    if s.ndim == 1:
        s = s[None]
    return metrics._check_rows(s, labels, name)


# ----------------------------------------------------------------------------- intervals


def interval(
    samples,
    estimate: float,
    level: float = 0.95,
    method: str = "percentile",
    jackknife=None,
) -> tuple[float | None, float | None]:
    """Two-sided interval of one statistic from its bootstrap samples.

    Args:
      samples: ``(R,)`` bootstrap values (NaN resamples are dropped).
      estimate: the statistic on the data themselves.
      method: "percentile", or "bca" (bias-corrected and accelerated, Efron 1987), which
        needs ``jackknife``: the ``(U,)`` leave-one-unit-out values.

    Returns:
      (lo, hi); (None, None) when no resample is finite.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    x = np.asarray(samples, np.float64)
    x = x[np.isfinite(x)]
    if not x.size:
        return None, None
    alpha = (1.0 - level) / 2.0
    q = np.array([alpha, 1.0 - alpha])
    if method == "bca":
        if jackknife is None:
            raise ValueError("method='bca' needs the jackknife values (leave one unit out)")
        q = _bca_quantiles(x, float(estimate), np.asarray(jackknife, np.float64), q)
    lo, hi = np.quantile(x, q)
    return float(lo), float(hi)


def _bca_quantiles(x, estimate, jack, q) -> np.ndarray:
    # scipy.stats.bootstrap's conventions: ties count half in the bias correction, the
    # acceleration from the jackknife's skewness.
    z0 = special.ndtri(((x < estimate).sum() + (x <= estimate).sum()) / (2.0 * x.size))
    jack = jack[np.isfinite(jack)]
    d = jack.mean() - jack
    den = 6.0 * (d**2).sum() ** 1.5
    acc = (d**3).sum() / den if den > 0 else 0.0
    z = special.ndtri(q)
    if not np.isfinite(z0):  # every resample on one side of the estimate
        return q
    return special.ndtr(z0 + (z0 + z) / (1.0 - acc * (z0 + z)))


MAX_JACKKNIFE_UNITS = 20_000


def _jackknife(boot: Bootstrap, scores, labels, llrs, p_targets) -> dict[str, np.ndarray]:
    """The metrics with each unit left out once (the counts 1 - I): ``{name: (U, P)}``."""
    u = boot.counts.shape[1]
    if u > MAX_JACKKNIFE_UNITS:
        raise ValueError(
            f"BCa needs one jackknife pass per {boot.level} ({u}); above "
            f"{MAX_JACKKNIFE_UNITS} use method='percentile'"
        )
    counts = 1 - np.eye(u, dtype=np.int32)
    return resample_metrics(boot, scores, labels, llrs, p_targets, counts=counts)


def compare(
    scores,
    labels,
    names: Sequence[str],
    boot: Bootstrap,
    *,
    llrs=None,
    reference: str | int = 0,
    p_targets: Sequence[float] = (0.01, 0.05),
    level: float = 0.95,
    method: str = "percentile",
) -> dict:
    """Each system's metrics with intervals, and its paired difference to a reference.

    Args:
      scores: ``(P, T)`` scores of P systems on the same trials (LLRs are scores too).
      names: P system names.
      boot: the resamples (``bootstrap``) of these trials.
      llrs: ``(P, T)`` calibrated LLRs for actDCF and Cllr, or None.
      reference: the name or row of the system every other is compared with (FP32).

    Returns:
      {"level", "method", "bootstrap" ("level", "n_resamples", "n_units", "n_failed"),
      "reference", "systems": {name: {m: value, m + "_ci": [lo, hi], "delta_" + m:
      value - reference's, "delta_" + m + "_ci", "rel_delta_" + m (delta / reference's),
      "rel_delta_" + m + "_ci"} for each metric m}}; ``samples`` (R, P) arrays are under
      "samples" (not JSON: drop before writing).
    """
    names = list(names)
    s = np.asarray(scores, np.float64)
    if s.ndim != 2 or s.shape[0] != len(names):
        raise ValueError(f"scores must be ({len(names)} systems, trials), got shape {s.shape}")
    ref = names.index(reference) if isinstance(reference, str) else int(reference)
    if not 0 <= ref < len(names):
        raise ValueError(f"reference {reference!r} is not one of the systems {names}")
    point = point_metrics(s, labels, llrs, p_targets)
    samples = resample_metrics(boot, s, labels, llrs, p_targets)
    jack = _jackknife(boot, s, labels, llrs, p_targets) if method == "bca" else None
    systems = {}
    for p, name in enumerate(names):
        row = {}
        for m, v in point.items():
            js = None if jack is None else jack[m]
            row[m] = float(v[p])
            row[m + "_ci"] = _pair(
                interval(samples[m][:, p], v[p], level, method, None if js is None else js[:, p])
            )
            d, dref = samples[m][:, p] - samples[m][:, ref], v[p] - v[ref]
            jd = None if js is None else js[:, p] - js[:, ref]
            row["delta_" + m] = float(dref)
            row["delta_" + m + "_ci"] = _pair(interval(d, dref, level, method, jd))
            with np.errstate(invalid="ignore", divide="ignore"):
                rel = d / samples[m][:, ref]
                jr = None if jd is None else jd / js[:, ref]
            rv = dref / v[ref] if v[ref] else float("nan")
            row["rel_delta_" + m] = _num(rv)
            row["rel_delta_" + m + "_ci"] = _pair(interval(rel, rv, level, method, jr))
        systems[name] = row
    failed = int(np.isnan(samples["eer"]).any(axis=1).sum())
    return {
        "level": level,
        "method": method,
        "bootstrap": {
            "level": boot.level,
            "n_resamples": boot.n_resamples,
            "n_units": int(boot.counts.shape[1]),
            "n_failed": failed,
        },
        "reference": names[ref],
        "systems": systems,
        "samples": samples,
    }


def _num(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _pair(ci) -> list:
    return [_num(v) if v is not None else None for v in ci]


# ----------------------------------------------------------------------------- verdicts

SUPPORTED, CONTRADICTED, UNDETERMINED = "supported", "contradicted", "undetermined"


def verdict_below(ci, bound: float = 0.0) -> str:
    """Claim "the quantity is below ``bound``" (e.g. a difference below 0: better).

    Supported when the whole interval lies below the bound, contradicted when it lies
    above it, undetermined when it contains it.
    """
    lo, hi = ci
    if lo is None or hi is None:
        return UNDETERMINED
    if hi < bound:
        return SUPPORTED
    if lo > bound:
        return CONTRADICTED
    return UNDETERMINED


def verdict_above(ci, bound: float) -> str:
    """Claim "the quantity is above ``bound``": supported when the whole interval lies
    above it, contradicted when below it, undetermined when it contains it."""
    lo, hi = ci
    if lo is None or hi is None:
        return UNDETERMINED
    return verdict_below([-hi, -lo], -bound)


def verdict_at_most(ci, tolerance: float) -> str:
    """Claim "at most ``tolerance`` worse" (non-inferiority): a relative increase of a
    metric whose 95% interval ends at or below the tolerance is supported; one whose
    interval starts above it is contradicted; anything else is undetermined."""
    lo, hi = ci
    if lo is None or hi is None:
        return UNDETERMINED
    if hi <= tolerance:
        return SUPPORTED
    if lo > tolerance:
        return CONTRADICTED
    return UNDETERMINED


def verdict_share(share: float, support: float = 0.8, contradict: float = 0.2) -> str:
    """Claim about a bootstrap share (e.g. resamples whose knee is at 2 bits): supported
    at ``share >= support``, contradicted at ``share <= contradict``."""
    if share >= support:
        return SUPPORTED
    if share <= contradict:
        return CONTRADICTED
    return UNDETERMINED


def format_ci(value, ci, spec: str = ".4f") -> str:
    """``0.0455 [0.0410, 0.0500]``; "n/a" parts where a value is missing."""

    def f(v):
        return "n/a" if v is None or not np.isfinite(v) else format(v, spec)

    lo, hi = ci if ci is not None else (None, None)
    return f"{f(value)} [{f(lo)}, {f(hi)}]"


# ----------------------------------------------------------------------------- flips


def mcnemar(harmful: int, beneficial: int) -> dict:
    """Exact McNemar test of harmful against beneficial flips.

    Under "quantization changes decisions without changing the error rate", each of the
    n = harmful + beneficial discordant trials is harmful with probability 1/2; the
    two-sided p-value is that of the binomial test. It treats trials as independent,
    which shared speakers make optimistic: read it beside the bootstrap interval of the
    error-rate change.

    Returns:
      {"harmful", "beneficial", "n_discordant", "p_value" (1.0 when n is 0)}.
    """
    h, b = int(harmful), int(beneficial)
    if h < 0 or b < 0:
        raise ValueError(f"flip counts must be >= 0, got harmful={h}, beneficial={b}")
    n = h + b
    p = 1.0 if n == 0 else float(stats.binomtest(h, n, 0.5).pvalue)
    return {"harmful": h, "beneficial": b, "n_discordant": n, "p_value": p}


def _nearest_mask(dist: np.ndarray, frac: float) -> np.ndarray:
    k = int(np.ceil(frac * dist.size))
    near = np.zeros(dist.size, bool)
    near[np.argsort(dist, kind="stable")[:k]] = True
    return near


def flip_tests(
    s_b,
    s_32,
    labels,
    theta: float,
    boot: Bootstrap,
    *,
    frac: float = 0.1,
    n_null: int = 20,
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Decision flips at the FP32 threshold with their uncertainty.

    - McNemar's exact test of harmful against beneficial flips (``mcnemar``).
    - The error-rate change at theta (harmful - beneficial flips, per trial) with its
      bootstrap interval.
    - The share of harmful flips among the ``frac`` of trials nearest theta (by
      |s_32 - theta|), with its bootstrap interval, beside the same share for a null:
      FP32 scores plus independent Gaussian noise with the drift's standard deviation
      (``n_null`` draws). Any small perturbation flips mostly trials near theta; the
      null says how much of the observed concentration that alone explains.

    Returns:
      {"mcnemar", "net_harmful_rate", "net_harmful_rate_ci", "share_nearest",
      "share_nearest_ci", "null_share_nearest" (mean over draws), "null_share_nearest_range"
      ([2.5%, 97.5%] of the draws), "frac"}.
    """
    b, y = metrics._check_trials(s_b, labels, "s_b")
    s, _ = metrics._check_trials(s_32, labels, "s_32")
    if not 0.0 < frac <= 1.0:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    acc_b, acc_32 = b >= theta, s >= theta
    flip = acc_b != acc_32
    harmful = flip & (acc_32 == y)
    beneficial = flip & (acc_32 != y)
    near = _nearest_mask(np.abs(s - theta), frac)
    cols = np.stack(
        [harmful - beneficial.astype(float), harmful * near, harmful, np.ones_like(s)], 1
    )
    alpha = (1.0 - level) / 2.0
    sums = boot.weighted_sums(cols)
    net = sums[:, 0] / sums[:, 3]
    with np.errstate(invalid="ignore", divide="ignore"):
        share_near = sums[:, 1] / sums[:, 2]
    total = int(harmful.sum())
    share = float(harmful[near].sum() / total) if total else None

    rng = np.random.default_rng(seed)
    sd = float(np.std(b - s))
    null = []
    for _ in range(n_null):  # a few noise draws; each is vectorised over trials
        noisy = s + rng.normal(0.0, sd, s.size)
        f = (noisy >= theta) != acc_32
        h = f & (acc_32 == y)
        if h.sum():
            null.append(h[near].sum() / h.sum())
    null = np.asarray(null)
    return {
        "mcnemar": mcnemar(harmful.sum(), beneficial.sum()),
        "net_harmful_rate": float((harmful.sum() - beneficial.sum()) / s.size),
        "net_harmful_rate_ci": _pair(interval(net, 0.0, level)),
        "frac": frac,
        "share_nearest": share,
        "share_nearest_ci": _pair(interval(share_near, 0.0, level)) if total else [None, None],
        "null_share_nearest": float(null.mean()) if null.size else None,
        "null_share_nearest_range": (
            [float(v) for v in np.quantile(null, [alpha, 1 - alpha])] if null.size else [None, None]
        ),
    }


# ----------------------------------------------------------------------------- the knee


def knee_stability(bits: Sequence[int], curves: Mapping[str, np.ndarray], knee_fn=None) -> dict:
    """How often each bit width is the knee across bootstrap resamples.

    Args:
      bits: the P bit widths (FP32 as 32) of the columns of each curve.
      curves: ``{name: (R, P)}`` degradation metrics (EER, mean |drift|) per resample;
        resamples where any curve is NaN are dropped.
      knee_fn: ``(bits, values) -> {"knee": ...}``; ``analysis.scores.knee`` by default.

    Returns:
      {name: {"share": {str(width) or "none": fraction of the resamples}}, "joint":
      {str(width): fraction of resamples where every curve's knee is at that width},
      "n": resamples used}.
    """
    if knee_fn is None:
        from sqjax.analysis.scores import knee as knee_fn
    xs = {k: np.asarray(v, np.float64) for k, v in curves.items()}
    for k, x in xs.items():
        if x.ndim != 2 or x.shape[1] != len(bits):
            raise ValueError(
                f"curves[{k!r}] must be (resamples, {len(bits)} widths), got {x.shape}"
            )
    keep = np.logical_and.reduce([np.isfinite(x).all(axis=1) for x in xs.values()])
    knees = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, x in xs.items():  # Kneedle on 5-6 points per resample
            knees[k] = [
                "none"
                if np.ptp(row) == 0 or (kn := knee_fn(bits, row)["knee"]) is None
                else str(int(kn))
                for row in x[keep]
            ]
    n = int(keep.sum())

    def shares(labels) -> dict:
        found = {}
        for lab in labels:
            found[lab] = found.get(lab, 0) + 1
        order = sorted(found, key=lambda w: (w == "none", -int(w) if w != "none" else 0))
        return {w: found[w] / n for w in order}

    out = {k: {"share": shares(v)} for k, v in knees.items()}
    agree = [ks[0] for ks in zip(*knees.values()) if len(set(ks)) == 1 and ks[0] != "none"]
    joint = {w: c * len(agree) / n for w, c in shares(agree).items()} if agree else {}
    return {**out, "joint": joint, "n": n}


def drift_samples(boot: Bootstrap, scores, reference: int = 0) -> np.ndarray:
    """Mean |s_p - s_ref| of every system on every resample: ``(R, P)``."""
    s = np.asarray(scores, np.float64)
    d = np.abs(s - s[reference]).T  # (T, P)
    sums = boot.weighted_sums(np.concatenate([d, np.ones((len(d), 1))], axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums[:, :-1] / sums[:, -1:]


def strip_samples(result: Mapping) -> dict:
    """``compare``'s result without its (R, P) arrays, for JSON."""
    return {k: v for k, v in result.items() if k != "samples"}
