"""The calibrated multi-precision cascade: decide a trial at the cheapest precision whose
calibrated LLR is far enough from the decision threshold, escalate the rest.

Stages run in increasing precision (e.g. 2 -> 4 -> 8 -> FP32). Stage p decides trial t
when ``|llr_p(t) - eta| >= tau_p``; the last stage decides every trial that reaches it.
A trial's output LLR is that of the stage that decided it, so the cascade is scored like
any system (EER, minDCF, actDCF, Cllr).

Analysis path: the LLRs of every stage for every trial, ``(P, T)``, and a grid of G tau
vectors ``(G, P - 1)``; decisions, metrics and costs of all G cascades come out of array
operations, never a loop over trials or tau values.

Deployment path (``deploy``): what a service runs. Every trial is scored at the first
stage; only the utterances of escalated trials are embedded at the next precision, once
each (per-precision caches), so it makes the analysis path's decisions while computing
only the embeddings those decisions need.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np

from sqjax import metrics


def _check_llrs(llrs) -> np.ndarray:
    llrs = np.asarray(llrs, np.float64)
    if llrs.ndim != 2 or llrs.shape[0] < 2:
        raise ValueError(f"llrs must be (stages >= 2, trials), got shape {llrs.shape}")
    return llrs


def _check_taus(taus, n_stages: int) -> np.ndarray:
    taus = np.atleast_2d(np.asarray(taus, np.float64))
    if taus.shape[1] != n_stages - 1:
        raise ValueError(
            f"taus must be (grid, {n_stages - 1}): one tau per stage but the last, "
            f"got shape {taus.shape}"
        )
    if (taus < 0).any() or np.isnan(taus).any():
        raise ValueError("taus must be >= 0 (inf escalates every trial of that stage)")
    return taus


def decided_stage(llrs, eta: float, taus) -> np.ndarray:
    """The stage that decides each trial under each tau vector: ``(G, T)`` ints.

    Args:
      llrs: ``(P, T)`` calibrated LLRs, stages in cascade order.
      eta: the LLR decision threshold (accept when ``llr >= eta``).
      taus: ``(G, P - 1)`` (or ``(P - 1,)``) margins; stage p decides a trial when
        ``|llr_p - eta| >= tau_p``.
    """
    llrs = _check_llrs(llrs)
    taus = _check_taus(taus, llrs.shape[0])
    margin = np.abs(llrs[:-1] - eta)  # (P - 1, T)
    decides = margin[None] >= taus[:, :, None]  # (G, P - 1, T)
    # The first deciding stage; argmax gives 0 when none decides, so add the last stage.
    last = np.ones((taus.shape[0], 1, llrs.shape[1]), bool)
    return np.argmax(np.concatenate([decides, last], axis=1), axis=1)


def cascade_llrs(llrs, stage) -> np.ndarray:
    """The output LLR of each trial: ``llrs[stage[g, t], t]``; ``(G, T)``."""
    llrs = _check_llrs(llrs)
    return np.take_along_axis(llrs, np.asarray(stage), axis=0)


def stage_fractions(stage, n_stages: int) -> np.ndarray:
    """Share of trials decided at each stage: ``(G, P)``, rows sum to 1."""
    stage = np.asarray(stage)
    return np.stack([(stage == p).mean(axis=1) for p in range(n_stages)], axis=1)


def reach_fractions(fractions) -> np.ndarray:
    """Share of trials that reach (are scored at) each stage: ``(G, P)``, first column 1."""
    f = np.asarray(fractions)
    return np.flip(np.cumsum(np.flip(f, axis=1), axis=1), axis=1)


def embeddings_needed(stage, enroll, test, n_utts: int, n_stages: int) -> np.ndarray:
    """Distinct utterances each stage must embed for the trials that reach it: ``(G, P)``.

    What the deployment path computes with per-precision caches (every utterance embedded
    at most once per precision).
    """
    stage = np.asarray(stage)
    g = np.arange(stage.shape[0])[:, None]
    out = np.zeros((stage.shape[0], n_stages), np.int64)
    for p in range(n_stages):  # P stages: a handful
        used = np.zeros((stage.shape[0], n_utts), bool)
        reach = stage >= p
        gg = np.broadcast_to(g, stage.shape)[reach]
        used[gg, np.broadcast_to(enroll, stage.shape)[reach]] = True
        used[gg, np.broadcast_to(test, stage.shape)[reach]] = True
        out[:, p] = used.sum(axis=1)
    return out


def system_metrics(llrs, labels, p_targets: Sequence[float] = (0.01, 0.05)) -> dict:
    """EER, minDCF and actDCF at each p_target, and Cllr of each row of ``(G, T)`` LLRs
    (``metrics.*_rows``); ``{name: (G,) array}``."""
    out = metrics.verification_metrics_rows(llrs, labels, p_targets)
    for p in p_targets:
        out[f"act_dcf@{p:g}"] = metrics.act_dcf_rows(llrs, labels, p)
    out["cllr"] = metrics.cllr_rows(llrs, labels)
    return out


def _between(margins: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Taus at quantiles ``q`` of ``margins``, each halfway between two neighbouring
    margins, so no trial sits exactly on a tau (float rounding cannot flip a decision)."""
    m = np.sort(margins)
    k = np.clip(np.round(q * (len(m) - 1)).astype(int), 0, len(m) - 2)
    return (m[k] + m[k + 1]) / 2


def tau_grid(llrs, eta: float, n: int = 10, max_points: int = 20_000) -> np.ndarray:
    """Candidate tau vectors: per stage but the last, 0 (decide every trial), ``n - 2``
    quantiles of that stage's margins ``|llr_p - eta|`` and inf (escalate every trial);
    all combinations, ``(n ** (P - 1), P - 1)``. ``n`` shrinks so that at most
    ``max_points`` combinations are made."""
    llrs = _check_llrs(llrs)
    k = llrs.shape[0] - 1
    n = max(2, min(n, int(round(max_points ** (1 / k), 6))))
    q = np.linspace(0, 1, n)[1:-1]
    axes = [np.concatenate([[0.0], _between(np.abs(llrs[p] - eta), q), [np.inf]]) for p in range(k)]
    return np.array(list(itertools.product(*axes)))


def line_taus(llrs, eta: float, n: int = 50) -> np.ndarray:
    """One tau shared by every stage: 0, ``n - 2`` quantiles of the first stage's margins,
    inf -- a one-parameter family from "all decided at the first stage" to "all
    escalated", for trade-off curves; ``(n, P - 1)``."""
    llrs = _check_llrs(llrs)
    q = np.linspace(0, 1, n)[1:-1]
    t = np.concatenate([[0.0], _between(np.abs(llrs[0] - eta), q), [np.inf]])
    return np.repeat(t[:, None], llrs.shape[0] - 1, axis=1)


def evaluate_cascades(llrs, labels, eta: float, taus, stage_cost) -> dict:
    """Decisions, metrics and expected cost of every tau vector.

    Args:
      stage_cost: ``(P,)`` cost of scoring one trial at each stage (e.g. MACs x weight
        bits); a trial that reaches stage p pays the cost of stages 0..p.

    Returns:
      {"taus" (G, P-1), "stage" (G, T), "fractions" (G, P), "cost" (G,) expected cost per
      trial, and the ``system_metrics`` arrays}.
    """
    llrs = _check_llrs(llrs)
    taus = _check_taus(taus, llrs.shape[0])
    # Blocks of tau vectors bound the (block, T) LLRs scored at once; the stages are
    # kept, one byte per trial and tau vector.
    rows = max(1, _GRID_BLOCK // llrs.shape[1])
    stages, parts = [], []
    for i in range(0, len(taus), rows):
        st = decided_stage(llrs, eta, taus[i : i + rows]).astype(np.int8)
        stages.append(st)
        parts.append(system_metrics(cascade_llrs(llrs, st), labels))
    stage = np.concatenate(stages)
    fractions = stage_fractions(stage, llrs.shape[0])
    cost = reach_fractions(fractions) @ np.asarray(stage_cost, np.float64)
    return {
        "taus": taus,
        "stage": stage,
        "fractions": fractions,
        "cost": cost,
        **{k: np.concatenate([p[k] for p in parts]) for k in parts[0]},
    }


_GRID_BLOCK = 1 << 22  # tau vectors x trials scored per block


def choose_taus(result: dict, reference: float, metric: str = "eer", tolerance: float = 0.05):
    """The cheapest tau vector of ``evaluate_cascades``' result whose ``metric`` is at most
    ``(1 + tolerance) x reference`` (ties: the better metric); None when none is.
    Returns the index into the grid."""
    ok = np.flatnonzero(result[metric] <= (1 + tolerance) * reference + 1e-12)
    if not len(ok):
        return None
    return int(ok[np.lexsort((result[metric][ok], result["cost"][ok]))[0]])


METRIC_KEYS = ("eer", "min_dcf@0.01", "act_dcf@0.01", "min_dcf@0.05", "act_dcf@0.05", "cllr")
COSTS = ("bitops", "macs", "bytes")


def check_options(metric: str, tolerance: float, cost: str) -> None:
    if metric not in METRIC_KEYS:
        raise ValueError(f"metric {metric!r}: choose one of {list(METRIC_KEYS)}")
    if cost not in COSTS:
        raise ValueError(f"cost {cost!r}: choose one of {list(COSTS)}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0 (a relative increase), got {tolerance}")


def cascade_analysis(
    scores_cal,
    labels_cal,
    scores,
    labels,
    names: Sequence[str],
    per_embedding: dict,
    *,
    enroll,
    test,
    metric: str = "eer",
    tolerance: float = 0.05,
    eta: str | float = "eer",
    cost: str = "bitops",
    p_cal: float = 0.05,
    grid: int = 10,
    boot=None,
    curve_resamples: int = 200,
    level: float = 0.95,
) -> tuple[dict, dict]:
    """The cascade study from raw scores, stages in cascade order (last: the reference).

    Calibrates each stage on the calibration trials, sets eta ("eer": the last stage's
    calibrated EER point on them; a float: the Bayes threshold of that p_target), picks
    on them the cheapest tau vector of ``tau_grid`` whose ``metric`` is within
    ``tolerance`` (relative) of the last stage alone, and scores it on the test trials --
    the test labels play no part in the choice -- beside the test-optimal choice, every
    stage alone and the ``line_taus`` curve.

    Args:
      scores_cal, scores: ``(P, Tc)`` / ``(P, T)`` cosine scores; labels_*: their labels.
      per_embedding: ``{"macs" | "bitops" | "bytes": (P,)}`` cost of one embedding per
        stage; a trial at stage p embeds both sides (``*_per_trial``) or only the test side
        when enrollment embeddings are cached (``*_per_trial_cached``).
      enroll, test: ``(T,)`` utterance indices of the test trials, to count the distinct
        embeddings each stage needs.
      boot: resamples of the test trials (``uncertainty.bootstrap``), or None. With it,
        each system and the chosen cascades carry ``m + "_ci"``, ``"delta_" + m`` (minus
        the last stage alone), ``"delta_" + m + "_ci"``, ``"rel_delta_" + m`` and its
        ``_ci`` for every metric m, on paired resamples; the curve gets "eer_ci" (its
        first ``curve_resamples`` resamples) and the result "uncertainty".

    Returns:
      ``(result, arrays)``: the JSON-ready result (systems, chosen, test_optimal, ...) and
      arrays for plots: "curve" and "grid_test" (``evaluate_cascades`` dicts plus
      "rel_cost"), "chosen_stage" (T,) or None, "llr" (P, T).
    """
    from sqjax.analysis.calibration import calibrate

    check_options(metric, tolerance, cost)
    y_cal, y = np.asarray(labels_cal).astype(bool), np.asarray(labels).astype(bool)
    cal = calibrate(scores_cal, y_cal, p_cal)
    llr_cal, llr = cal.apply(scores_cal), cal.apply(scores)
    if eta == "eer":
        eta_value = metrics.eer(llr_cal[-1], y_cal)[1]
    else:
        eta_value = metrics.bayes_threshold(float(eta))
    unit = {k: np.asarray(v, np.float64) for k, v in per_embedding.items()}
    stage_cost = 2 * unit[cost]
    taus = tau_grid(llr_cal, eta_value, n=grid)
    on_cal = evaluate_cascades(llr_cal, y_cal, eta_value, taus, stage_cost)
    ref_cal = float(system_metrics(llr_cal[-1:], y_cal)[metric][0])
    chosen = choose_taus(on_cal, ref_cal, metric, tolerance)
    on_test = evaluate_cascades(llr, y, eta_value, taus, stage_cost)
    ref_test = float(system_metrics(llr[-1:], y)[metric][0])
    best = choose_taus(on_test, ref_test, metric, tolerance)
    curve = evaluate_cascades(llr, y, eta_value, line_taus(llr_cal, eta_value), stage_cost)
    for res in (on_test, curve):
        res["rel_cost"] = res["cost"] / stage_cost[-1]
    alone = system_metrics(llr, y)
    n_stages = len(names)
    enroll, test = np.asarray(enroll), np.asarray(test)
    n_utts = int(max(enroll.max(), test.max())) + 1
    n_distinct = len(np.unique(np.concatenate([enroll, test])))

    def account(reach: np.ndarray, embedded: np.ndarray) -> dict:
        row = {}
        for k, v in unit.items():
            row[f"{k}_per_trial"] = float(2 * reach @ v)
            row[f"{k}_per_trial_cached"] = float(reach @ v)
            row[f"rel_{k}"] = float(reach @ v / v[-1])
        row["embeddings_per_claim"] = float(reach.sum())
        row["embedded"] = [int(e) for e in embedded]
        row["rel_embedded_bitops"] = float(
            embedded @ unit["bitops"] / (n_distinct * unit["bitops"][-1])
        )
        return row

    systems = {}
    for p, n in enumerate(names):
        only = np.eye(n_stages)[p]  # alone: scored at stage p only, not at those before
        systems[n] = {
            **{k: float(v[p]) for k, v in alone.items()},
            "fractions": only.tolist(),
            **account(only, (only * n_distinct).astype(np.int64)),
        }

    def row(res, i, with_embeddings=True):
        r = {
            **{k: float(res[k][i]) for k in alone},
            "taus": [float(t) for t in res["taus"][i]],
            "fractions": res["fractions"][i].tolist(),
        }
        if with_embeddings:
            needed = embeddings_needed(res["stage"][i : i + 1], enroll, test, n_utts, n_stages)
            r.update(account(reach_fractions(res["fractions"][i : i + 1])[0], needed[0]))
        return r

    result = {
        "stages": list(names),
        "eta": {"kind": str(eta), "value": float(eta_value)},
        "calibration": cal.to_dict(),
        "metric": metric,
        "tolerance": tolerance,
        "cost": cost,
        "cost_notes": {
            "bitops": "MACs x weight bits: a proxy for low-bit hardware (activations float)",
            "bytes": "packed model bytes read per embedding (weights read once per utterance)",
            "per_trial": "both sides embedded at every stage a trial reaches",
            "per_trial_cached": "test side only: enrollment embeddings computed once, reused",
            "rel": "expected per trial, against the last stage alone",
            "embeddings_per_claim": "a verification service's regime (speakers enrolled once "
            "at every stage, one test utterance per claim): embeddings per claim, one per "
            "stage reached (the last stage alone: 1); rel_* are that regime's costs",
            "embedded": "distinct utterances embedded per stage on this trial list (what the "
            "deployment path computes)",
            "storage": "packed sizes of every stage model together (bytes)",
        },
        "systems": systems,
        "reference_cal": ref_cal,
        "chosen": None if chosen is None else row(on_test, chosen),
        "chosen_cal": None if chosen is None else row(on_cal, chosen, with_embeddings=False),
        "test_optimal": None if best is None else row(on_test, best),
        "grid_points": len(taus),
    }
    if boot is not None:
        _add_intervals(result, llr, y, on_test, chosen, best, curve, boot, curve_resamples, level)
    arrays = {
        "curve": curve,
        "grid_test": on_test,
        "chosen_stage": None if chosen is None else on_test["stage"][chosen],
        "llr": llr,
    }
    return result, arrays


def _add_intervals(result, llr, y, on_test, chosen, best, curve, boot, curve_resamples, level):
    """Paired intervals of every stage alone and the chosen cascades against the last
    stage, on the same resamples of the test trials."""
    from sqjax.analysis import uncertainty

    names = list(result["stages"])
    rows, keys = [llr], []
    for key, i in (("chosen", chosen), ("test_optimal", best)):
        if i is not None:
            rows.append(cascade_llrs(llr, on_test["stage"][i : i + 1]))
            keys.append(key)
    systems = np.concatenate(rows)
    cmp = uncertainty.compare(
        systems, y, names + keys, boot, llrs=systems, reference=len(names) - 1, level=level
    )
    for n in names:
        result["systems"][n].update(cmp["systems"][n])
    for key in keys:
        result[key].update(cmp["systems"][key])
    few = boot._replace(counts=boot.counts[:curve_resamples])
    eer = uncertainty.resample_metrics(few, cascade_llrs(llr, curve["stage"]), y, p_targets=())
    curve["eer_ci"] = np.array([uncertainty.interval(col, 0.0, level) for col in eer["eer"].T])
    result["uncertainty"] = {k: cmp[k] for k in ("level", "method", "bootstrap")}


def deploy(
    embed: Sequence[Callable[[np.ndarray], np.ndarray]],
    calibration: Sequence[tuple[float, float]],
    eta: float,
    taus,
    enroll: np.ndarray,
    test: np.ndarray,
    caches: list[dict] | None = None,
) -> dict:
    """The cascade as a service runs it, on trials ``(enroll[t], test[t])`` (utterance ids).

    Args:
      embed: per stage, a function from utterance ids ``(m,)`` to embeddings ``(m, dim)``.
      calibration: per stage ``(a, b)``: llr = a * cosine + b.
      eta, taus: the decision threshold and the ``(P - 1,)`` margins.
      caches: per stage ``{utterance id: embedding}``, kept across calls (a service
        passes the same list every time, so an enrollment is embedded once per precision);
        default: fresh ones.

    Stage p embeds only the utterances of still-undecided trials that its cache lacks.

    Returns:
      {"llr" (T,), "stage" (T,), "embedded" (P,) embeddings computed by this call}.
    """
    from sqjax.evaluate import cosine_scores

    n_stages = len(embed)
    taus = _check_taus(taus, n_stages)[0]
    caches = caches if caches is not None else [{} for _ in range(n_stages)]
    if len(caches) != n_stages or len(calibration) != n_stages:
        raise ValueError(f"give {n_stages} caches and calibrations, one per stage")
    enroll, test = np.asarray(enroll), np.asarray(test)
    llr = np.zeros(len(enroll))
    stage = np.full(len(enroll), -1)
    embedded = np.zeros(n_stages, np.int64)
    todo = np.arange(len(enroll))
    for p in range(n_stages):
        if not len(todo):
            break
        utts = np.unique(np.concatenate([enroll[todo], test[todo]]))
        new = np.array([u for u in utts.tolist() if u not in caches[p]], dtype=utts.dtype)
        if len(new):
            caches[p].update(zip(new.tolist(), embed[p](new)))
        embedded[p] = len(new)
        emb = np.stack([caches[p][u] for u in utts.tolist()])
        pos = np.searchsorted(utts, enroll[todo]), np.searchsorted(utts, test[todo])
        a, b = calibration[p]
        x = a * cosine_scores(emb, *pos).astype(np.float64) + b
        done = np.ones(len(todo), bool) if p == n_stages - 1 else np.abs(x - eta) >= taus[p]
        llr[todo[done]], stage[todo[done]] = x[done], p
        todo = todo[~done]
    return {"llr": llr, "stage": stage, "embedded": embedded}
