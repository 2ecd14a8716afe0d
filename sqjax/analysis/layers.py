"""Layer-wise analysis: the weight distortion of each quantized tensor against the score
sensitivity of quantizing it alone, and the recovery from keeping it alone in float.

A *variant* of a model takes each *layer* (a params leaf that quantization changes) from
one of several versions: choice 0 is the reference (float) weights, choice k >= 1 the
weights of option k (e.g. PTQ at 2, 4 and 8 bits). A ``(P, L)`` integer array of choices
describes P variants. They are built on a leading axis, a fixed number at a time, and
embedded by one ``evaluate.precision_embed`` function -- the all-precision scorer's -- so
nothing recompiles per layer. Only ``params`` vary; the other collections (BatchNorm
statistics) are the reference's in every variant.

Scores in, plain results out: nothing here reads run directories or writes files.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from sqjax import evaluate, metrics, quant
from sqjax.analysis.scores import flips, fp32_threshold

log = logging.getLogger("sqjax")


class VariantBank(NamedTuple):
    """The versions of each layer that variants choose from.

    Attributes:
      reference: the reference variables (``{"params": ..., <other collections>}``).
      paths: the L layers, "/"-joined paths inside ``params`` ("layer2_0/conv1/kernel").
      index: each layer's position among the flattened ``params`` leaves.
      stacks: per layer, ``(1 + K, *shape)``: the reference weights, then option 1..K's.
    """

    reference: dict
    paths: tuple[str, ...]
    index: tuple[int, ...]
    stacks: tuple[jax.Array, ...]

    @property
    def n_options(self) -> int:
        return self.stacks[0].shape[0] - 1 if self.stacks else 0


def variant_bank(reference: Mapping, options: Sequence[Mapping]) -> VariantBank:
    """The layers where any of ``options`` (variables of the same structure, e.g. the
    reference quantized at several widths) differs from ``reference``, with every version.

    Only ``params`` are compared and stacked; the options' other collections are ignored.
    """
    if not options:
        raise ValueError("variant_bank: give at least one option (e.g. the quantized model)")
    flat, treedef = jax.tree_util.tree_flatten_with_path(reference["params"])
    alts = []
    for k, option in enumerate(options):
        try:
            alts.append(treedef.flatten_up_to(option["params"]))
        except (ValueError, TypeError) as e:
            raise ValueError(f"variant_bank: option {k} has other params than the reference: {e}")
    paths, index, stacks = [], [], []
    for i, (keypath, w) in enumerate(flat):
        versions = [np.asarray(w)] + [np.asarray(a[i]) for a in alts]
        if any(v.shape != versions[0].shape for v in versions):
            raise ValueError(f"variant_bank: {quant.path_str(keypath)!r} differs in shape")
        if all(np.array_equal(versions[0], v) for v in versions[1:]):
            continue
        paths.append(quant.path_str(keypath))
        index.append(i)
        stacks.append(jnp.asarray(np.stack(versions)))
    if not paths:
        raise ValueError("variant_bank: no option differs from the reference; nothing varies")
    return VariantBank(dict(reference), tuple(paths), tuple(index), tuple(stacks))


@functools.partial(jax.jit, static_argnums=0)
def _build(index: tuple[int, ...], reference, stacks, choices):
    p = choices.shape[0]
    leaves, treedef = jax.tree_util.tree_flatten(reference["params"])
    out = [jnp.broadcast_to(leaf, (p, *jnp.shape(leaf))) for leaf in leaves]
    for j, i in enumerate(index):
        out[i] = stacks[j][choices[:, j]]
    rest = {
        k: jax.tree.map(lambda x: jnp.broadcast_to(x, (p, *jnp.shape(x))), v)
        for k, v in reference.items()
        if k != "params"
    }
    return {"params": treedef.unflatten(out), **rest}


def build_variants(bank: VariantBank, choices) -> dict:
    """The variants of ``choices`` (``(P, L)`` ints in 0..K) stacked on a leading axis,
    as ``quant.stack_precisions`` would stack them (for ``evaluate.precision_embed``)."""
    choices = np.asarray(choices)
    if choices.ndim != 2 or choices.shape[1] != len(bank.paths):
        raise ValueError(f"choices must be (variants, {len(bank.paths)}), got {choices.shape}")
    if choices.size and not (0 <= choices.min() and choices.max() <= bank.n_options):
        raise ValueError(f"choices must be in 0..{bank.n_options} (0: reference, k: option k)")
    return _build(bank.index, bank.reference, bank.stacks, jnp.asarray(choices, jnp.int32))


def free_memory_bytes(device=None) -> int:
    """Free memory of ``device`` (default: the first): the allocator's limit minus its use
    on GPU/TPU; on CPU the host's available memory (Linux ``MemAvailable``)."""
    device = device or jax.devices()[0]
    stats_ = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats_ and "bytes_limit" in stats_:
        return int(stats_["bytes_limit"] - stats_.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def variant_chunk(bank: VariantBank, fraction: float = 0.25, cap: int | None = None) -> int:
    """How many variants to stack at once: as many as fit in ``fraction`` of free memory,
    at most ``cap`` (8 on CPU, where a larger stack is no faster; 32 elsewhere)."""
    cap = cap or (8 if jax.default_backend() == "cpu" else 32)
    model = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(bank.reference))
    return int(max(1, min(cap, fraction * free_memory_bytes() // max(model, 1))))


def embed_variants(
    embed_all: Callable,
    bank: VariantBank,
    choices,
    feats: Sequence[np.ndarray],
    *,
    batch_size: int = 32,
    max_frames: int = 3000,
    chunk: int | None = None,
    segments: Sequence | None = None,
    label: str = "variants",
) -> np.ndarray:
    """Embeddings ``(P, n, dim)`` of ``feats`` under each variant of ``choices``.

    With ``segments`` (the model as a chain, e.g. ``models.encoder_segments(encoder)``),
    variants share the work of their common front: per batch, each segment runs once per
    distinct choice of its own layers and everything before it (see ``shared_runs``), so a
    variant that changes one late layer costs only the segments from there on. Otherwise
    ``embed_all``, an ``evaluate.precision_embed`` function, embeds the variants ``chunk``
    at a time (``variant_chunk`` by default; the last chunk padded, so every call has the
    same shapes). Both log progress with an ETA.
    """
    choices = np.asarray(choices)
    if segments is not None:
        return _embed_shared(segments, bank, choices, feats, batch_size, max_frames, label)
    chunk = chunk or variant_chunk(bank)
    n = len(choices)
    out, t0 = [], time.perf_counter()
    for lo in range(0, n, chunk):
        rows = choices[lo : lo + chunk]
        padded = np.concatenate([rows, np.repeat(rows[-1:], chunk - len(rows), 0)])
        stacked = build_variants(bank, padded)
        emb = evaluate.extract_embeddings_all(
            embed_all, stacked, feats, batch_size=batch_size, max_frames=max_frames
        )
        out.append(emb[: len(rows)])
        done, dt = lo + len(rows), time.perf_counter() - t0
        log.info(
            "%s: %d/%d embedded (%d utterances each), %.2f s/variant, ETA %.0f s",
            label,
            done,
            n,
            len(feats),
            dt / done,
            dt / done * (n - done),
        )
    return np.concatenate(out)


def segment_keys(bank: VariantBank, segments: Sequence, choices) -> np.ndarray:
    """``(P, S)``: per variant and segment, an id of the choices of that segment's layers
    (equal ids: equal weights). A layer belongs to the segment whose ``keys`` hold its
    path's first part."""
    owner = {k: s for s, seg in enumerate(segments) for k in seg.keys}
    seg_of = []
    for path in bank.paths:
        if path.split("/")[0] not in owner:
            raise ValueError(f"segments: layer {path!r} is in no segment's keys")
        seg_of.append(owner[path.split("/")[0]])
    seg_of = np.asarray(seg_of)
    keys = np.zeros((len(choices), len(segments)), np.int64)
    for s in range(len(segments)):
        cols = np.asarray(choices)[:, seg_of == s]
        keys[:, s] = np.unique(cols, axis=0, return_inverse=True)[1].reshape(-1)
    return keys


def shared_runs(keys) -> tuple[np.ndarray, np.ndarray]:
    """The order to run variants in and, per variant in that order, the first segment it
    must run: lexicographic order of ``keys`` (``segment_keys``), so each variant reuses
    the longest front it shares with any other -- the one run just before it. The total
    ``sum(S - start)`` is the number of segment runs per batch (``P * S`` without sharing).
    """
    keys = np.asarray(keys)
    order = np.lexsort(keys.T[::-1])
    start = np.zeros(len(order), np.int64)
    for i in range(1, len(order)):
        same = keys[order[i]] == keys[order[i - 1]]
        start[i] = len(same) if same.all() else int(np.argmin(same))
    return order, start


def _segment_variables(bank: VariantBank, seg, choice_of: Mapping[str, int]) -> dict:
    """The variables of one segment, its bank layers taken at ``choice_of[path]``."""
    sub = {c: {k: t[k] for k in seg.keys if k in t} for c, t in bank.reference.items()}
    stack = dict(zip(bank.paths, bank.stacks))

    def pick(keypath, leaf):
        path = quant.path_str(keypath)
        return stack[path][choice_of[path]] if path in choice_of else leaf

    sub["params"] = jax.tree_util.tree_map_with_path(pick, sub["params"])
    return sub


def _embed_shared(segments, bank, choices, feats, batch_size, max_frames, label) -> np.ndarray:
    keys = segment_keys(bank, segments, choices)
    order, start = shared_runs(keys)
    n_seg = len(segments)
    # The variables of each (segment, key) that some variant uses, built once.
    seg_vars: dict[tuple[int, int], dict] = {}
    for p in order:
        for s in range(n_seg):
            if (s, keys[p, s]) not in seg_vars:
                owned = [
                    j for j, path in enumerate(bank.paths) if path.split("/")[0] in segments[s].keys
                ]
                choice_of = {bank.paths[j]: int(choices[p, j]) for j in owned}
                seg_vars[s, keys[p, s]] = _segment_variables(bank, segments[s], choice_of)
    runs = int(np.sum(n_seg - start))
    log.info(
        "%s: %d variants, %d segment runs per batch (%.0f%% of %d without sharing)",
        label,
        len(choices),
        runs,
        100 * runs / max(len(choices) * n_seg, 1),
        len(choices) * n_seg,
    )
    total = sum(max(f.shape[0], 1) for f in feats)
    done, t0, last = [0], time.perf_counter(), [time.perf_counter()]

    def embed(_, x):
        acts: list = []
        out = [None] * len(order)
        for p, s0 in zip(order, start):
            del acts[s0:]
            h = acts[-1] if acts else x
            for s in range(s0, n_seg):
                h = segments[s].apply(seg_vars[s, keys[p, s]], h)
                acts.append(h)
            out[p] = h
        emb = np.stack([np.asarray(o) for o in out], 1)  # (batch, P, dim)
        done[0] += x.shape[0] * x.shape[1]
        now = time.perf_counter()
        if now - last[0] > 10:
            last[0], frac = now, min(done[0] / total, 1.0)
            eta = (now - t0) * (1 - frac) / max(frac, 1e-9)
            log.info(
                "%s: %.0f%% of the frames, %.0f s, ETA %.0f s", label, 100 * frac, now - t0, eta
            )
        return emb.reshape(emb.shape[0], -1)

    flat = evaluate.extract_embeddings(
        embed, None, feats, batch_size=batch_size, max_frames=max_frames
    )
    log.info("%s: %d variants embedded in %.1f s", label, len(choices), time.perf_counter() - t0)
    return flat.reshape(len(feats), len(choices), -1).transpose(1, 0, 2)


# ------------------------------------------------------------------------- per variant


def variant_metrics(scores, reference, labels, theta: float) -> list[dict]:
    """Per variant (row of ``scores``, ``(P, T)``): EER, minDCF@0.01, mean |s - s_ref| and
    the harmful / beneficial decision flips against ``reference`` scores at ``theta``."""
    out = []
    for s in np.asarray(scores):
        f = flips(s, reference, labels, theta)
        out.append(
            {
                "eer": metrics.eer(s, labels)[0],
                "min_dcf": metrics.min_dcf(s, labels, p_target=0.01)[0],
                "drift": float(np.mean(np.abs(s - reference))),
                "harmful": f["harmful"],
                "beneficial": f["beneficial"],
            }
        )
    return out


def layer_group(path: str, shape: Sequence[int]) -> tuple[str, str]:
    """``(stage, kind)`` of a layer from its path and kernel shape.

    stage: the path's first part without a trailing block number ("layer2_0/conv1/kernel"
    -> "layer2", "stem_conv/kernel" -> "stem_conv"); kind: "conv3x3", "conv1x1" (the
    spatial kernel size), "dense" (2-D) or "other".
    """
    stage = re.sub(r"_\d+$", "", path.split("/")[0])
    if len(shape) >= 3:
        kind = "conv" + "x".join(map(str, shape[:-2]))
    else:
        kind = "dense" if len(shape) == 2 else "other"
    return stage, kind


def correlations(distortion, sensitivity) -> dict:
    """How well distortion predicts sensitivity across layers: Spearman's rho (and its
    p-value) and R^2 of the least-squares line sensitivity ~ distortion (scipy), the share
    of the sensitivity's variance that distortion explains linearly. None below 3 layers
    or when either is constant."""
    x, y = np.asarray(distortion, float), np.asarray(sensitivity, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"n": len(x), "spearman": None, "spearman_p": None, "r2": None, "slope": None}
    rho = stats.spearmanr(x, y)
    fit = stats.linregress(x, y)
    return {
        "n": len(x),
        "spearman": float(rho.statistic),
        "spearman_p": float(rho.pvalue),
        "r2": float(fit.rvalue**2),
        "slope": float(fit.slope),
    }


# ------------------------------------------------------------------------ the analysis


def layer_choices(n_layers: int, groups: Sequence[Sequence[int]] = ()) -> np.ndarray:
    """The analysis' variants against option 1: reference (all 0), all quantized (all 1),
    each layer alone quantized (L rows), each layer alone kept in float (L rows), each
    group of layers alone quantized (one row per group). ``(2 + 2L + G, L)``."""
    eye = np.eye(n_layers, dtype=np.int32)
    group_rows = np.zeros((len(groups), n_layers), np.int32)
    for g, members in enumerate(groups):
        group_rows[g, list(members)] = 1
    return np.concatenate(
        [
            np.zeros((1, n_layers), np.int32),
            np.ones((1, n_layers), np.int32),
            eye,
            1 - eye,
            group_rows,
        ]
    )


def layer_analysis(
    scores,
    labels,
    bank: VariantBank,
    *,
    bits: int,
    macs: Mapping[str, int] | None = None,
    start: Mapping | None = None,
    threshold: str = "eer",
    boot=None,
    level: float = 0.95,
) -> dict:
    """The layer-wise analysis of one width from the scores of ``layer_choices``' variants.

    Args:
      scores: ``(2 + 2L + G, T)`` cosine scores in ``layer_choices(L, groups)`` order, with
        the groups of ``layer_groups(bank)``.
      labels: ``(T,)`` target (1) / non-target (0).
      bank: the ``VariantBank`` whose option 1 is the model quantized at ``bits``.
      macs: multiply-accumulates per layer path without its leaf name (optional).
      start: for a QAT model, the FP32 variables it was fine-tuned from: the distortion of
        its quantized and float weights against them is added.
      threshold: "eer" or "min_dcf": the reference's decision threshold for flips.
      boot: resamples of the trials (``uncertainty.bootstrap``), or None. With it, each
        layer row gets "drift_ci" and "d_eer_ci", and each correlation "spearman_ci" and
        "r2_ci", from the same resamples for every layer.

    Returns:
      {"bits", "reference", "quantized" (variant metrics), "theta", "layers" (one row per
      layer: path, stage, kind, shape, size, macs, rel_err, sqnr_db, the single-layer
      metrics and their changes, the protection metrics and gains), "groups",
      "correlation" (distortion vs sensitivity), "ranking" (paths, most sensitive
      first)}. Sensitivity is "drift": mean |s_variant - s_reference| over all trials;
      "d_eer"/"d_min_dcf" are the changes against the reference; "gain_*" the recovery
      from keeping one layer in float: quantized metric - protected metric.
    """
    scores = np.asarray(scores)
    n_layers = len(bank.paths)
    groups = layer_groups(bank)
    if scores.shape[0] != 2 + 2 * n_layers + len(groups):
        raise ValueError(
            f"scores: expected {2 + 2 * n_layers + len(groups)} variants (layer_choices "
            f"order), got {scores.shape[0]}"
        )
    theta = fp32_threshold(scores[0], labels, kind=threshold)
    m = variant_metrics(scores, scores[0], labels, theta)
    ref, full = m[0], m[1]
    single, prot, group_m = (
        m[2 : 2 + n_layers],
        m[2 + n_layers : 2 + 2 * n_layers],
        m[2 + 2 * n_layers :],
    )
    macs = macs or {}
    rows = []
    for j, path in enumerate(bank.paths):
        w, q = np.asarray(bank.stacks[j][0], np.float64), np.asarray(bank.stacks[j][1], np.float64)
        stage, kind = layer_group(path, w.shape)
        row = {
            "path": path,
            "stage": stage,
            "kind": kind,
            "shape": list(w.shape),
            "size": int(w.size),
            "macs": macs.get(path.rsplit("/", 1)[0]),
            "depth": j,
            "bits": bits,
            **_distortion(w, q),
            **{k: single[j][k] for k in ("eer", "min_dcf", "drift", "harmful")},
            "d_eer": single[j]["eer"] - ref["eer"],
            "d_min_dcf": single[j]["min_dcf"] - ref["min_dcf"],
            "prot_eer": prot[j]["eer"],
            "prot_min_dcf": prot[j]["min_dcf"],
            "prot_drift": prot[j]["drift"],
            "prot_harmful": prot[j]["harmful"],
            "gain_eer": full["eer"] - prot[j]["eer"],
            "gain_min_dcf": full["min_dcf"] - prot[j]["min_dcf"],
            "gain_drift": full["drift"] - prot[j]["drift"],
        }
        if start is not None:
            row.update(_start_distortion(start, path, w, q))
        rows.append(row)
    group_rows = []
    for (kind, name, members), gm in zip(groups, group_m):
        size = sum(rows[j]["size"] for j in members)
        err = sum(rows[j]["rel_err"] * _energy(bank, j) for j in members)
        group_rows.append(
            {
                "group": kind,
                "name": name,
                "layers": len(members),
                "size": size,
                "macs": sum(rows[j]["macs"] or 0 for j in members) if macs else None,
                "rel_err": err / max(sum(_energy(bank, j) for j in members), 1e-30),
                "sum_drift": sum(rows[j]["drift"] for j in members),
                **{k: gm[k] for k in ("eer", "min_dcf", "drift", "harmful")},
                "d_eer": gm["eer"] - ref["eer"],
            }
        )
    correlation = {
        "drift": correlations([r["rel_err"] for r in rows], [r["drift"] for r in rows]),
        "d_eer": correlations([r["rel_err"] for r in rows], [r["d_eer"] for r in rows]),
    }
    extra = {}
    if boot is not None:
        extra["uncertainty"] = _layer_intervals(
            scores[: 2 + n_layers], labels, rows, correlation, boot, level
        )
    return {
        "bits": bits,
        "reference": ref,
        "quantized": full,
        "theta": {"kind": threshold, "value": theta},
        "layers": rows,
        "groups": group_rows,
        "correlation": correlation,
        **extra,
        "ranking": [r["path"] for r in sorted(rows, key=lambda r: -r["drift"])],
        "sum_single_drift": sum(r["drift"] for r in rows),
    }


def _layer_intervals(scores, labels, rows, correlation, boot, level) -> dict:
    """Intervals of each layer's sensitivity and of the distortion-sensitivity
    correlations over resamples of the trials (rows: reference, quantized, single layers)."""
    from sqjax.analysis import uncertainty

    single = np.concatenate([scores[:1], scores[2:]])  # reference, then one per layer
    drift = uncertainty.drift_samples(boot, single)[:, 1:]  # (R, L)
    eer = uncertainty.resample_metrics(boot, single, labels, p_targets=())["eer"]
    d_eer = eer[:, 1:] - eer[:, :1]
    x = np.array([r["rel_err"] for r in rows], np.float64)
    for key, samples in (("drift", drift), ("d_eer", d_eer)):
        for j, r in enumerate(rows):
            r[key + "_ci"] = list(uncertainty.interval(samples[:, j], r[key], level))
        c = correlation[key]
        if c["r2"] is None:
            c["spearman_ci"] = c["r2_ci"] = [None, None]
            continue
        ok = np.isfinite(samples).all(axis=1)
        rx = stats.rankdata(x)
        rho = _row_corr(rx, stats.rankdata(samples[ok], axis=1))
        r2 = _row_corr(x, samples[ok]) ** 2
        c["spearman_ci"] = list(uncertainty.interval(rho, c["spearman"], level))
        c["r2_ci"] = list(uncertainty.interval(r2, c["r2"], level))
    return {"level": level, "bootstrap": {"level": boot.level, "n_resamples": boot.n_resamples}}


def _row_corr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of ``x`` (L,) with each row of ``y`` (R, L); NaN for a flat row."""
    xc = x - x.mean()
    yc = y - y.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (yc @ xc) / np.sqrt((yc**2).sum(axis=1) * (xc**2).sum())


def _energy(bank: VariantBank, j: int) -> float:
    return float(jnp.sum(jnp.square(bank.stacks[j][0].astype(jnp.float32))))


def _distortion(w: np.ndarray, q: np.ndarray) -> dict:
    err, sig = float(np.sum((w - q) ** 2)), float(np.sum(w**2))
    rel = err / sig if sig > 0 else (0.0 if err == 0 else math.inf)
    sqnr = math.inf if err == 0 else (10 * math.log10(sig / err) if sig > 0 else -math.inf)
    return {"rel_err": rel, "sqnr_db": sqnr}


def _start_distortion(start: Mapping, path: str, w: np.ndarray, q: np.ndarray) -> dict:
    s = start["params"]
    for part in path.split("/"):
        s = s[part]
    s = np.asarray(s, np.float64)
    return {
        "rel_err_vs_start": _distortion(s, q)["rel_err"],
        "float_drift_vs_start": _distortion(s, w)["rel_err"],
    }


def layer_groups(bank: VariantBank) -> list[tuple[str, str, list[int]]]:
    """``(group kind, name, member layer indices)``: by stage, then by kind (``layer_group``);
    a group holding every layer is left out (it is the quantized model)."""
    by: dict[tuple[str, str], list[int]] = {}
    for j, path in enumerate(bank.paths):
        stage, kind = layer_group(path, bank.stacks[j].shape[1:])
        by.setdefault(("stage", stage), []).append(j)
        by.setdefault(("kind", kind), []).append(j)
    n = len(bank.paths)
    return [(k, name, m) for (k, name), m in by.items() if len(m) < n]


# ------------------------------------------------------------ mixed-precision suggestion


def protection_order(rows: Sequence[Mapping], base_bits: int, high_bits: int) -> list[int]:
    """Layer indices in the order to raise them from ``base_bits`` to ``high_bits``: most
    drift recovered by protecting the layer (``gain_drift``) per extra stored bit first;
    layers whose protection recovers nothing come last, smallest first."""
    extra = max(high_bits - base_bits, 1)

    def key(j):
        gain, size = rows[j]["gain_drift"], rows[j]["size"] * extra
        return (0, -gain / size) if gain > 0 else (1, size)

    return sorted(range(len(rows)), key=key)


def prefix_choices(order: Sequence[int], n_layers: int, base: int, high: int) -> np.ndarray:
    """``(L + 1, L)``: row k raises the first k layers of ``order`` to option ``high``, the
    rest at option ``base``."""
    out = np.full((n_layers + 1, n_layers), base, np.int32)
    for k in range(1, n_layers + 1):
        out[k:, order[k - 1]] = high
    return out


def prefix_search(
    score: Callable[[np.ndarray], np.ndarray],
    orders: Sequence[Sequence[int]],
    tolerance: float,
    base: int = 1,
) -> tuple[float, dict[tuple[int, int], float]]:
    """EERs of protection prefixes, searched instead of all ``L + 1`` per high width.

    ``orders[i]`` is the protection order towards option ``base + 1 + i``; the row of
    ``(i, k)`` is ``prefix_choices(orders[i], L, base, base + 1 + i)[k]``. ``score(rows)``
    returns the EER of each row. The target is ``(1 + tolerance)`` x the EER of the
    reference (all choices 0). Evaluated: the reference and k on the grid 0, 1, 2, 4, ...,
    L; then, per high width, a bisection inside the first grid step where the EER falls
    to the target or below, until the k reaching it has k - 1 not reaching it. Each round
    scores every width's rows in one call. Returns ``(reference EER, {(i, k): eer})``.
    """
    n = len(orders[0]) if orders else 0
    grid = sorted({0, n, *(2**e for e in range(max(n, 1).bit_length()) if 2**e < n)})
    rows_of = [prefix_choices(o, n, base, base + 1 + i) for i, o in enumerate(orders)]
    eers: dict[tuple[int, int], float] = {}

    def run(pairs, extra=()):
        vals = score(np.stack([*extra, *(rows_of[i][k] for i, k in pairs)]))
        eers.update({pk: float(e) for pk, e in zip(pairs, vals[len(extra) :])})
        return vals

    first = [(i, k) for i in range(len(orders)) for k in grid]
    ref = float(run(first, [np.zeros(n, np.int32)])[0])
    target = (1 + tolerance) * ref
    while True:
        mids = []
        for i in range(len(orders)):
            ks = sorted(k for j, k in eers if j == i)
            ok = [k for k in ks if eers[i, k] <= target]
            if not ok or ok[0] == 0:
                continue
            lo = max(k for k in ks if k < ok[0])
            if ok[0] - lo > 1:
                mids.append((i, (lo + ok[0]) // 2))
        if not mids:
            return ref, eers
        run(mids)


def mix_size_bits(
    bank: VariantBank, layer_bits: Sequence[int | None], float_bits: int, per_channel=False
) -> int:
    """Packed storage in bits of a mix: each layer at its width (``quant.packed_bits``: one
    codebook per tensor, or per output channel; None: float) plus ``float_bits`` for the
    params outside the bank."""
    return float_bits + sum(
        quant.packed_bits(int(np.prod(s.shape[1:])), b, s.shape[-1] if per_channel else 1)
        for s, b in zip(bank.stacks, layer_bits)
    )


def mixed_rules(
    paths: Sequence[str], high_bits: int, base_rules: Sequence[quant.Rule], per_channel=False
) -> tuple[quant.Rule, ...]:
    """``Rule``s keeping ``paths`` at ``high_bits``, then ``base_rules`` (first match wins)."""
    keep = tuple(quant.Rule(f"^{re.escape(p)}$", high_bits, per_channel) for p in paths)
    return keep + tuple(base_rules)
