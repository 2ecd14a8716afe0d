"""The quantization study: FP32 training, QAT fine-tuning at each bit width, and the
score-level analysis of every precision against FP32.

Each width is its own run directory (``sqjax.runs``); a study grows by adding widths.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import ml_collections
import numpy as np

from sqjax import evaluate, fileio, metrics, models, prepare, quant, runs, train, uniform
from sqjax.tables import format_table
from sqjax.workdir import atomic_write, load_run_config, write_json

log = logging.getLogger("sqjax")


def qat_run_config(
    config: ml_collections.ConfigDict, bits: int, init_from: str | Path
) -> ml_collections.ConfigDict:
    """The config of one width's QAT run: the study's ``quant`` training settings become
    its ``train`` settings. Study-level settings (``bits_list``) are not part of it, so a
    study can add widths and its runs still resume."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.quant.bits, c.quant.init_from, c.quant.bits_list = bits, str(init_from), ()
    c.train.num_steps, c.train.learning_rate = c.quant.num_steps, c.quant.learning_rate
    c.train.warmup_steps, c.head.margin_warmup_steps = c.quant.warmup_steps, 0
    c.eval.baseline = False
    return c


def quantization_study(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, dict]:
    """FP32 training (unless ``config.quant.init_from`` names a trained run), then QAT
    fine-tuning from it at each width in ``config.quant.bits_list``, each in its own
    sub-run ``workdir/<b>bit``. Returns ``{"fp32": metrics, "<b>bit": metrics, ...}``,
    also written to ``workdir/study.json``. Finished runs are not trained again. Run
    directories may be on an object store (``gs://``, ``s3://``)."""
    workdir = fileio.as_path(workdir)
    q = config.quant
    rows = {}
    if q.init_from:
        init_from = fileio.as_path(q.init_from)
        metrics_file = init_from / "metrics_test.json"
        if not metrics_file.exists():
            raise FileNotFoundError(
                f"config.quant.init_from={init_from}: no {metrics_file.name}; "
                f"score the run first: sqjax eval --workdir {init_from}"
            )
        rows["fp32"] = json.loads(metrics_file.read_text())
    else:
        init_from = workdir / "fp32"
        fp32 = ml_collections.ConfigDict(config.to_dict())
        fp32.quant.bits, fp32.quant.bits_list = 0, ()
        rows["fp32"] = runs.train_and_evaluate(fp32, init_from)
    for bits in q.bits_list:
        sub = workdir / f"{bits}bit"
        rows[f"{bits}bit"] = runs.train_and_evaluate(qat_run_config(config, bits, init_from), sub)
    write_json(workdir / "study.json", rows)
    return rows


# ------------------------------------------------------------------ score-level analysis


def _bits_of_run(path: Path) -> int:
    return int(path.name.removesuffix("bit"))


def study_precisions(study_dir: str | Path) -> tuple[ml_collections.ConfigDict, dict]:
    """``(config, {name: variables})`` of a ``sqjax qat`` study: its FP32 run (``fp32/`` or
    the runs' ``init_from``) and every ``<b>bit`` QAT run, widest first."""
    study_dir = Path(study_dir)
    subs = sorted(
        (p for p in study_dir.glob("*bit") if (p / "config.json").exists()),
        key=_bits_of_run,
        reverse=True,
    )
    if not subs:
        raise FileNotFoundError(
            f"{study_dir}: no <b>bit run directories; is it a `sqjax qat` study directory?"
        )
    fp32_dir = Path(load_run_config(subs[0]).quant.init_from)
    config, state, _ = runs.restore_run(fp32_dir)
    out = {"fp32": evaluate.encoder_variables(state)}
    for sub in subs:
        _, state, quantizer = runs.restore_run(sub)
        out[sub.name] = evaluate.encoder_variables(state, quantizer)
    return config, out


def ptq_precisions(workdir: str | Path, bits_list) -> tuple[ml_collections.ConfigDict, dict]:
    """``(config, {name: variables})``: a trained FP32 run and its post-training
    quantization at each width of ``bits_list``."""
    config, state, quantizer = runs.restore_run(workdir)
    if quantizer is not None:
        raise ValueError(f"{workdir} is a QAT run ({config.quant.bits} bits): give an FP32 run")
    out = {"fp32": evaluate.encoder_variables(state)}
    for bits in sorted(bits_list, reverse=True):
        out[f"{bits}bit"] = runs.ptq_variables(config, state, bits)
    return config, out


def all_precision_scores(config, variables: dict, split: prepare.Split) -> np.ndarray:
    """Cosine scores ``(P, T)`` of ``split``'s trials under every precision, from one
    batched embedding pass over the stacked models."""
    stacked = quant.stack_precisions(list(variables.values()))
    emb = evaluate.extract_embeddings_all(
        evaluate.precision_embed(train.build_encoder(config)),
        stacked,
        split.feats,
        batch_size=config.eval.batch_size,
        max_frames=config.eval.max_frames,
    )
    enroll, test = evaluate.trial_indices(split.corpus.utts, split.trials.enroll, split.trials.test)
    return np.stack([evaluate.cosine_scores(e, enroll, test) for e in emb]).astype(np.float32)


def _with_data(config, data="", trials="", cal_data="", cal_trials=""):
    """A copy of ``config`` scoring ``data``/``trials`` and calibrating on ``cal_*``."""
    config = ml_collections.ConfigDict(config.to_dict())
    if data or trials:
        if not (data and trials):
            raise ValueError("give both --data and --trials (or neither, for the run's test set)")
        config.data.test, config.data.test_trials = data, trials
    if cal_data or cal_trials:
        if not (cal_data and cal_trials):
            raise ValueError("give both --cal-data and --cal-trials")
        config.data.cal, config.data.cal_trials = cal_data, cal_trials
    return config


def analyze(
    config: ml_collections.ConfigDict,
    variables: dict,
    out: str | Path,
    *,
    data: str = "",
    trials: str = "",
    cal_data: str = "",
    cal_trials: str = "",
    threshold: str = "eer",
    p_cal: float = 0.05,
) -> dict:
    """The score-level analysis of the precisions in ``variables`` (``{"fp32": ...,
    "<b>bit": ...}``) on the config's test trials (or ``data``/``trials``).

    Scores are calibrated per precision on the calibration trials (the config's, or
    ``cal_data``/``cal_trials``; skipped when there are none). Writes to ``out``:
    ``scores.npz`` (precisions, scores (P, T), llrs (P, T), labels, enroll, test),
    ``score_analysis.json`` and ``figures/*.png``; returns the analysis.
    """
    from sqjax.analysis import calibration, plots, scores

    config = _with_data(config, data, trials, cal_data, cal_trials)
    names = list(variables)
    split = prepare.test_data(config)
    labels = split.trials.labels
    log.info("scoring %d trials under %s", len(labels), ", ".join(names))
    s = all_precision_scores(config, variables, split)
    cal_split = prepare.calibration_data(config)
    llrs, cal = None, None
    if cal_split is None:
        log.warning("no calibration trials (config.data.cal): actDCF and Cllr are skipped")
    else:
        cal = calibration.calibrate(
            all_precision_scores(config, variables, cal_split), cal_split.trials.labels, p_cal
        )
        llrs = cal.apply(s).astype(np.float32)
    result = scores.score_analysis(s, llrs, labels, names, threshold=threshold)
    result["calibration"] = None if cal is None else cal.to_dict()
    result["trials"] = {"data": config.data.test, "trials": config.data.test_trials}

    out = fileio.local_dir(out, "out")
    if jax.process_index() == 0:
        arrays = {
            "precisions": np.array(names),
            "scores": s,
            "llrs": llrs if llrs is not None else np.full_like(s, np.nan),
            "labels": labels,
            "enroll": np.array(split.trials.enroll),
            "test": np.array(split.trials.test),
        }
        atomic_write(out / "scores.npz", lambda f: np.savez(f, **arrays))
        fig = out / "figures"
        fig.mkdir(parents=True, exist_ok=True)
        plots.plot_degradation(result, fig / "degradation.png")
        plots.plot_drift_histograms(s, labels, names, fig / "drift.png")
        plots.plot_flip_concentration(result, fig / "flips.png")
        plots.plot_det(s, labels, names, fig / "det.png")
        if llrs is not None:
            rel = {n: calibration.reliability(llrs[p], labels) for p, n in enumerate(names)}
            plots.plot_reliability(rel, fig / "reliability.png")
        write_json(out / "score_analysis.json", result)  # last: marks the output complete
    return result


def format_analysis(result: dict) -> str:
    """One table: per precision its metrics, mean |drift| and flips at the FP32 theta."""
    f = lambda v, spec: "-" if v is None else format(v, spec)
    rows = [("precision", "EER", "minDCF.01", "minDCF.05", "actDCF.01", "Cllr", "|drift|")]
    rows[0] += ("harmful", "benefit")
    for name in result["precisions"]:
        r = result["per_precision"][name]
        m = r["metrics"]
        rows.append(
            (
                name,
                f(m["eer"], ".4f"),
                f(m["min_dcf@0.01"], ".4f"),
                f(m["min_dcf@0.05"], ".4f"),
                f(m.get("act_dcf@0.01"), ".4f"),
                f(m.get("cllr"), ".3f"),
                f(r["drift"]["all"]["mean_abs"], ".4f"),
                str(r["flips"]["harmful"]),
                str(r["flips"]["beneficial"]),
            )
        )
    theta = result["theta"]
    lines = [format_table(rows)]
    lines.append(f"theta = FP32 {theta['kind']} threshold {f(theta['value'], '.4f')}")
    lines += [f"knee of {key}: {k['statement']}" for key, k in result["knee"].items()]
    return "\n".join(lines)


# -------------------------------------------------------------------- layer-wise analysis


class LayerJob(NamedTuple):
    """One width of a layer-wise analysis.

    ``reference``: the float model (FP32 for PTQ; a QAT run's latent float weights);
    ``quantized``: it at ``bits``; ``protect``: it at higher widths, for the
    mixed-precision suggestion (empty: none); ``base_rules``: the quantizer's rules at
    ``bits``; ``start``: the FP32 model a QAT run started from (None for PTQ).
    """

    bits: int
    reference: dict
    quantized: dict
    protect: dict
    base_rules: tuple
    start: dict | None = None


def ptq_layer_jobs(workdir: str | Path, bits_list, protect_bits=(4, 8), overrides=()):
    """``(config, jobs)``: a trained FP32 run quantized after training at each width."""
    config, state, quantizer = runs.restore_run(workdir, overrides=overrides)
    if quantizer is not None:
        raise ValueError(f"{workdir} is a QAT run ({config.quant.bits} bits): give an FP32 run")
    reference = evaluate.encoder_variables(state)
    cache = {}

    def ptq(b):
        if b not in cache:
            cache[b] = runs.ptq_variables(config, state, b)
        return cache[b]

    jobs = [
        LayerJob(
            b,
            reference,
            ptq(b),
            {h: ptq(h) for h in protect_bits if h > b},
            train.build_quantizer(config, b).rules,
        )
        for b in bits_list
    ]
    return config, jobs


def study_layer_jobs(study_dir: str | Path, bits_list=None):
    """``(config, jobs)``: each QAT run of a study at its own width (all, or
    ``bits_list``), against its own float weights, with the FP32 start model."""
    study_dir = Path(study_dir)
    subs = {_bits_of_run(p): p for p in study_dir.glob("*bit") if (p / "config.json").exists()}
    if not subs:
        raise FileNotFoundError(
            f"{study_dir}: no <b>bit run directories; is it a `sqjax qat` study directory?"
        )
    missing = sorted(set(bits_list or ()) - set(subs))
    if missing:
        raise FileNotFoundError(f"{study_dir}: no run for --bits {missing}; it has {sorted(subs)}")
    jobs, config = [], None
    for b in sorted(bits_list or subs, reverse=True):
        run_config, state, quantizer = runs.restore_run(subs[b])
        if config is None:
            config, fp32, _ = runs.restore_run(run_config.quant.init_from)
            start = evaluate.encoder_variables(fp32)
        reference = evaluate.encoder_variables(state)  # the latent float weights
        quantized = evaluate.encoder_variables(state, quantizer)
        jobs.append(LayerJob(b, reference, quantized, {}, quantizer.rules, start))
    return config, jobs


def _variant_scores(config, bank, choices, split, label) -> np.ndarray:
    """Cosine scores ``(P, T)`` of ``split``'s trials under each variant of ``choices``;
    variants share the work of their common front (``layers.embed_variants`` with the
    encoder's segments)."""
    from sqjax.analysis import layers

    emb = layers.embed_variants(
        None,
        bank,
        choices,
        split.feats,
        batch_size=config.eval.batch_size,
        max_frames=config.eval.max_frames,
        segments=models.encoder_segments(train.build_encoder(config)),
        label=label,
    )
    enroll, test = evaluate.trial_indices(split.corpus.utts, split.trials.enroll, split.trials.test)
    return np.stack([evaluate.cosine_scores(e, enroll, test) for e in emb])


def suggest_mix(config, job: LayerJob, bank, analysis: dict, split, sel_split, tolerance):
    """The mixed-precision suggestion of one width: the smallest mix of layers kept at a
    higher width (4 or 8 bits) whose EER on ``sel_split`` (the calibration trials, else the
    test trials) is within ``tolerance`` (relative) of the reference's; then checked on the
    test trials with a fresh quantizer built from its ``Rule``s."""
    from sqjax.analysis import layers

    b, highs = job.bits, sorted(job.protect)
    n_layers = len(bank.paths)
    rows = analysis["layers"]
    labels = sel_split.trials.labels

    def score(choices):
        s = _variant_scores(config, bank, choices, sel_split, f"mixes {b}bit")
        return np.array([metrics.eer(x, labels)[0] for x in s])

    orders = [layers.protection_order(rows, b, h) for h in highs]
    ref_eer, found = layers.prefix_search(score, orders, tolerance)
    target = (1 + tolerance) * ref_eer
    pairs = sorted(found)
    choices = np.stack(
        [np.zeros(n_layers, np.int32)]
        + [layers.prefix_choices(orders[i], n_layers, 1, 2 + i)[k] for i, k in pairs]
    )
    eers = np.array([ref_eer] + [found[p] for p in pairs])
    in_bank = set(bank.paths)
    float_bits = 32 * sum(
        int(np.prod(np.shape(leaf)))
        for kp, leaf in jax.tree_util.tree_flatten_with_path(job.reference["params"])[0]
        if quant.path_str(kp) not in in_bank
    )
    bits_of = [None, b, *highs]  # choice 0 keeps the float weights
    sizes = np.array(
        [
            layers.mix_size_bits(
                bank, [bits_of[c] for c in row], float_bits, config.quant.per_channel
            )
            for row in choices
        ]
    )
    ok = np.flatnonzero(eers[1:] <= target) + 1
    base = {
        "bits": b,
        "tolerance": tolerance,
        "selected_on": "calibration" if sel_split is not split else "test",
        "select_reference_eer": ref_eer,
        "select_target_eer": float(target),
        "size_bytes": {
            "fp32": int(sizes[0]) // 8,
            f"{b}bit": int(sizes[pairs.index((0, 0)) + 1]) // 8,
        },
        "curve": [
            {
                "high_bits": highs[i],
                "protected": k,
                "eer": float(e),
                "size_bytes": int(z) // 8,
            }
            for (i, k), e, z in zip(pairs, eers[1:], sizes[1:])
        ],
    }
    if not len(ok):
        return {**base, "reached": False, "rules": None}
    best = min(ok, key=lambda i: (sizes[i], eers[i]))
    row = choices[best]
    high = bits_of[int(row.max())] if row.max() > 1 else b
    keep = [p for p, c in zip(bank.paths, row) if c > 1]
    rules = layers.mixed_rules(keep, high, job.base_rules, config.quant.per_channel)
    q = quant.kmeans_quantizer(rules, iters=config.quant.iters)
    params = job.reference["params"]
    variables = {**job.reference, "params": q.apply(params, q.init(params))}
    test_eer = metrics.eer(runs.score_variables(config, variables, split), split.trials.labels)[0]
    ref_test = analysis["reference"]["eer"]
    return {
        **base,
        "reached": True,
        "high_bits": high,
        "keep": keep,
        "select_eer": float(eers[best]),
        "mix_size_bytes": int(sizes[best]) // 8,
        "rules": [dataclasses.asdict(r) for r in rules],
        "test_eer": float(test_eer),
        "test_reference_eer": ref_test,
        "test_target_eer": (1 + tolerance) * ref_test,
        "test_reached": bool(test_eer <= (1 + tolerance) * ref_test),
        "test_quantized_eer": analysis["quantized"]["eer"],
    }


LAYER_CSV_COLUMNS = (
    "bits",
    "depth",
    "path",
    "stage",
    "kind",
    "shape",
    "size",
    "macs",
    "rel_err",
    "sqnr_db",
    "eer",
    "d_eer",
    "min_dcf",
    "d_min_dcf",
    "drift",
    "harmful",
    "prot_eer",
    "prot_min_dcf",
    "prot_drift",
    "prot_harmful",
    "gain_eer",
    "gain_min_dcf",
    "gain_drift",
    "rel_err_vs_start",
    "float_drift_vs_start",
)


def analyze_layers(
    config: ml_collections.ConfigDict,
    jobs: Sequence[LayerJob],
    out: str | Path,
    *,
    data: str = "",
    trials: str = "",
    cal_data: str = "",
    cal_trials: str = "",
    tolerance: float = 0.10,
    threshold: str = "eer",
) -> dict:
    """The layer-wise analysis of each width in ``jobs`` on the config's test trials (or
    ``data``/``trials``): every layer alone quantized, every layer alone kept float, every
    stage and kind of layer alone quantized, all scored in batched variant passes; then,
    where a job has higher widths to protect with, the mixed-precision suggestion (chosen
    on the calibration trials when there are any).

    Writes ``layers.csv`` (one row per layer and width), ``layer_analysis.json`` and
    ``figures/layers_*_<b>bit.png`` to ``out``; returns ``{"widths": {"<b>bit": analysis},
    "suggestions": {"<b>bit": suggestion}}``.
    """
    from sqjax.analysis import layers, plots

    if not 0 <= tolerance:
        raise ValueError(f"tolerance must be >= 0 (a relative EER increase), got {tolerance}")
    config = _with_data(config, data, trials, cal_data, cal_trials)
    split = prepare.test_data(config)
    cal_split = None
    encoder = train.build_encoder(config)
    macs = models.encoder_macs_by_layer(encoder, config.train.n_frames)
    result = {"widths": {}, "suggestions": {}, "macs_frames": config.train.n_frames}
    for job in jobs:
        name = f"{job.bits}bit"
        options = [job.quantized, *(job.protect[h] for h in sorted(job.protect))]
        bank = layers.variant_bank(job.reference, options)
        groups = [m for _, _, m in layers.layer_groups(bank)]
        choices = layers.layer_choices(len(bank.paths), groups)
        log.info("layers %s: %d layers, %d variants", name, len(bank.paths), len(choices))
        s = _variant_scores(config, bank, choices, split, f"layers {name}")
        a = layers.layer_analysis(
            s,
            split.trials.labels,
            bank,
            bits=job.bits,
            macs=macs,
            start=job.start,
            threshold=threshold,
        )
        result["widths"][name] = a
        if job.protect:
            if cal_split is None:
                cal_split = prepare.calibration_data(config) or split
            result["suggestions"][name] = suggest_mix(
                config, job, bank, a, split, cal_split, tolerance
            )
    result["trials"] = {"data": config.data.test, "trials": config.data.test_trials}

    out = fileio.local_dir(out, "out")
    if jax.process_index() == 0:
        rows = [r for a in result["widths"].values() for r in a["layers"]]
        atomic_write(out / "layers.csv", _csv(rows, LAYER_CSV_COLUMNS))
        fig = out / "figures"
        for name, a in result["widths"].items():
            plots.plot_layer_scatter(a, fig / f"layers_scatter_{name}.png")
            plots.plot_layer_groups(a, fig / f"layers_stages_{name}.png")
            plots.plot_layer_depth(a, fig / f"layers_depth_{name}.png")
            plots.plot_layer_protection(a, fig / f"layers_protection_{name}.png")
        write_json(out / "layer_analysis.json", result)  # last: marks the output complete
    return result


def _csv(rows: Sequence[dict], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in rows:
        cells = []
        for c in columns:
            v = r.get(c)
            cells.append("" if v is None else "x".join(map(str, v)) if c == "shape" else v)
        w.writerow(cells)
    return buf.getvalue()


def format_layers(result: dict, top: int = 10) -> str:
    """Per width: the ``top`` most sensitive layers, the stage/kind totals, how much of
    the sensitivity distortion explains, and the mixed-precision suggestion."""
    f = lambda v, spec: "-" if v is None else format(v, spec)
    lines = []
    for name, a in result["widths"].items():
        ref, full = a["reference"], a["quantized"]
        lines.append(
            f"\n{name}: reference EER {ref['eer']:.4f}, all layers at {a['bits']} bits "
            f"{full['eer']:.4f} (mean |drift| {full['drift']:.4f}, {full['harmful']} harmful "
            f"flips); {len(a['layers'])} layers, most sensitive first:"
        )
        rows = [("layer", "kind", "weights", "MMACs", "rel err", "SQNR dB", "|drift|", "dEER")]
        rows[0] += ("harmful", "protect: dEER")
        by_path = {r["path"]: r for r in a["layers"]}
        for path in a["ranking"][:top]:
            r = by_path[path]
            rows.append(
                (
                    path.removesuffix("/kernel"),
                    r["kind"],
                    f"{r['size']:,}",
                    f((r["macs"] or 0) / 1e6 if r["macs"] is not None else None, ".1f"),
                    f(r["rel_err"], ".4f"),
                    f(r["sqnr_db"], ".1f"),
                    f(r["drift"], ".4f"),
                    f(r["d_eer"], "+.4f"),
                    str(r["harmful"]),
                    f(-r["gain_eer"], "+.4f"),
                )
            )
        lines.append(format_table(rows))
        rows = [("group", "layers", "weights", "rel err", "|drift| alone", "sum of singles")]
        rows[0] += ("dEER alone",)
        for g in a["groups"]:
            rows.append(
                (
                    f"{g['group']} {g['name']}",
                    str(g["layers"]),
                    f"{g['size']:,}",
                    f(g["rel_err"], ".4f"),
                    f(g["drift"], ".4f"),
                    f(g["sum_drift"], ".4f"),
                    f(g["d_eer"], "+.4f"),
                )
            )
        lines.append(format_table(rows))
        c = a["correlation"]["drift"]
        lines.append(
            f"distortion vs |drift| over layers: Spearman rho {f(c['spearman'], '.2f')} "
            f"(p {f(c['spearman_p'], '.2g')}), R^2 {f(c['r2'], '.2f')} (the share of the "
            f"sensitivity's variance a line in distortion explains)"
        )
        sug = result["suggestions"].get(name)
        if sug is None:
            continue
        if not sug["reached"]:
            lines.append(
                f"mixed precision: no mix reaches EER <= {sug['select_target_eer']:.4f} on the "
                f"{sug['selected_on']} trials, even with every layer at the higher width"
            )
            continue
        keep = ", ".join(p.removesuffix("/kernel") for p in sug["keep"])
        what = (
            f"keep {len(sug['keep'])} layer(s) at {sug['high_bits']} bits: {keep}"
            if sug["keep"]
            else f"every layer at {a['bits']} bits already meets it"
        )
        lines.append(
            f"mixed precision (chosen on the {sug['selected_on']} trials, EER within "
            f"{sug['tolerance']:.0%} of float): {what}; "
            f"size {sug['mix_size_bytes']:,} B (all {a['bits']}-bit "
            f"{sug['size_bytes'][name]:,} B, FP32 {sug['size_bytes']['fp32']:,} B); test EER "
            f"{sug['test_eer']:.4f} against target {sug['test_target_eer']:.4f} "
            f"({'reached' if sug['test_reached'] else 'NOT reached'})"
        )
    return "\n".join(lines)


# --------------------------------------------------------------- K-means vs uniform grid

GRID_METHODS = (("kmeans", False), ("kmeans", True), ("uniform", False), ("uniform", True))


def grid_label(method: str, per_channel: bool) -> str:
    return f"{method} per {'channel' if per_channel else 'tensor'}"


def _deployed_distortion(rules_config, bits: int, fp32: dict, deployed: dict) -> float:
    """sum ||W - Q||^2 / sum ||W||^2 over the kernels ``train.build_quantizer`` quantizes:
    W the FP32 weights, Q the deployed (quantized) ones."""
    plans = train.build_quantizer(rules_config, bits).plan(fp32["params"])
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
    config = _with_data(config, data, trials)
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
        quantization_study(c, qat_studies[-1])
    models_, rows = {"fp32": fp32}, []
    for method, per_channel in GRID_METHODS:
        c = ml_collections.ConfigDict(config.to_dict())
        c.quant.method, c.quant.per_channel = method, per_channel
        c.quant.symmetric, c.quant.scale, c.quant.learn_scale = symmetric, scale, False
        for b in sorted(bits_list):
            q = train.build_quantizer(c, b)
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
    values = [
        (metrics.eer(s, labels)[0], metrics.min_dcf(s, labels, p_target=0.01)[0]) for s in scores
    ]
    for row, (e, d) in zip(rows, values[1:], strict=True):
        row["eer"], row["min_dcf"] = float(e), float(d)
    fp32_bytes = 4 * sum(int(np.size(x)) for x in jax.tree.leaves(params))
    result = {
        "fp32": {"eer": float(values[0][0]), "min_dcf": float(values[0][1]), "bytes": fp32_bytes},
        "rows": rows,
        "uniform": {"symmetric": symmetric, "scale": scale},
        "trials": {"data": config.data.test, "trials": config.data.test_trials},
    }
    if jax.process_index() == 0:
        atomic_write(out / "grids.csv", _csv(rows, GRID_CSV_COLUMNS))
        plots.plot_grids(result, out / "figures" / "grids.png")
        write_json(out / "grids.json", result)  # last: marks the output complete
    return result


GRID_CSV_COLUMNS = (
    "mode", "method", "per_channel", "bits", "eer", "min_dcf", "distortion", "bytes",
)  # fmt: skip


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
        for pc in (False, True):
            gran = "per channel" if pc else "per tensor"
            diffs = [
                (b, by[("uniform", pc, b)]["eer"] - by[("kmeans", pc, b)]["eer"])
                for b in sorted({r["bits"] for r in rows})
                if ("uniform", pc, b) in by and ("kmeans", pc, b) in by
            ]
            if diffs:
                lines.append(f"{mode.upper()} {gran}: {_grid_verdict(diffs)}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ cascade


def stage_names(stages: Sequence[int]) -> list[str]:
    """``--stages 2,4,8,32`` as precision names: ["2bit", "4bit", "8bit", "fp32"]."""
    if len(stages) < 2 or list(stages) != sorted(set(stages)):
        raise ValueError(f"--stages: give 2+ increasing widths like 2,4,8,32, got {stages}")
    if any(not (1 <= b <= 8 or b == 32) for b in stages):
        raise ValueError(f"--stages: widths are 1..8 or 32 (FP32), got {stages}")
    return ["fp32" if b == 32 else f"{b}bit" for b in stages]


def model_bytes(config, variables: dict, bits: int | None) -> int:
    """Packed storage of one model: quantized leaves as indices + codebooks, or a uniform
    grid's scales and zero points (the rules and method of ``train.build_quantizer`` at
    ``bits``), everything else (BatchNorm too) float32."""
    total = 32 * sum(np.size(x) for x in jax.tree.leaves(variables.get("batch_stats", {})))
    if bits is None:
        total += 32 * sum(np.size(x) for x in jax.tree.leaves(variables["params"]))
    else:
        rules = train.build_quantizer(config, bits).rules
        q = config.quant
        group = uniform.group_bits(q.symmetric) if q.get("method") == "uniform" else None
        for p in quant.plan(variables["params"], rules):
            total += quant.packed_bits(p.size, p.bits, p.n_codebooks, group)
    return total // 8


def run_cascade(
    config: ml_collections.ConfigDict,
    variables: dict,
    stages: Sequence[int],
    out: str | Path,
    *,
    data: str = "",
    trials: str = "",
    cal_data: str = "",
    cal_trials: str = "",
    metric: str = "eer",
    tolerance: float = 0.05,
    eta: str | float = "eer",
    cost: str = "bitops",
    p_cal: float = 0.05,
    grid: int = 10,
) -> dict:
    """The calibrated multi-precision cascade over ``stages`` (widths, 32 = FP32) of the
    precisions in ``variables`` (``{"fp32": ..., "<b>bit": ...}``).

    Scores every stage on the calibration and test trials in one batched pass each,
    calibrates each stage on the calibration trials, picks the cheapest tau vector (in
    ``cost`` per trial) whose ``metric`` on the calibration trials is within
    ``tolerance`` (relative) of FP32's -- the test labels are never used for it -- and
    reports it on the test trials, beside the test-optimal choice, each precision alone
    and a curve of one shared tau. Then runs the deployment path on the test trials with
    the chosen taus and checks it makes the same decisions.

    Writes ``cascade.json``, ``cascade_curve.csv`` and ``figures/cascade_*.png`` to
    ``out``; returns the result.
    """
    from sqjax.analysis import calibration, cascade, plots

    cascade.check_options(metric, tolerance, cost)
    names = stage_names(stages)
    missing = [n for n in names if n not in variables]
    if missing:
        raise ValueError(f"--stages: no model for {missing}; there are {list(variables)}")
    stage_vars = {n: variables[n] for n in names}
    config = _with_data(config, data, trials, cal_data, cal_trials)
    split, cal_split = prepare.test_data(config), prepare.calibration_data(config)
    if cal_split is None:
        raise ValueError(
            "the cascade needs calibration trials: set config.data.cal/cal_trials or give "
            "--cal-data and --cal-trials (disjoint from the test trials)"
        )
    log.info("cascade: scoring %s on calibration and test trials", ", ".join(names))
    s_cal = all_precision_scores(config, stage_vars, cal_split)
    s = all_precision_scores(config, stage_vars, split)

    # Cost of one embedding at each stage.
    encoder = train.build_encoder(config)
    frames = int(np.clip(np.mean([len(f) for f in split.raw_feats]), 1, config.eval.max_frames))
    macs = models.encoder_macs(encoder, frames)
    wbits = np.array([32 if n == "fp32" else int(n.removesuffix("bit")) for n in names])
    mbytes = np.array(
        [model_bytes(config, stage_vars[n], None if b == 32 else b) for n, b in zip(names, wbits)]
    )
    per_embedding = {
        "macs": np.full(len(names), float(macs)),
        "bitops": macs * wbits * 1.0,
        "bytes": mbytes * 1.0,
    }
    enroll, test = evaluate.trial_indices(split.corpus.utts, split.trials.enroll, split.trials.test)
    result, arrays = cascade.cascade_analysis(
        s_cal,
        cal_split.trials.labels,
        s,
        split.trials.labels,
        names,
        per_embedding,
        enroll=enroll,
        test=test,
        metric=metric,
        tolerance=tolerance,
        eta=eta,
        cost=cost,
        p_cal=p_cal,
        grid=grid,
    )
    result["cost_notes"]["macs"] = (
        f"multiply-accumulates of the conv/dense layers per embedding of a {frames}-frame "
        "utterance (the test utterances' mean); the same at every precision"
    )
    result["macs_per_embedding"] = int(macs)
    result["model_bytes"] = dict(zip(names, (int(b) for b in mbytes)))
    result["storage_bytes"] = int(mbytes.sum())
    result["trials"] = {"data": config.data.test, "trials": config.data.test_trials}
    if result["chosen"] is not None:
        cal = calibration.Calibration(**result["calibration"])
        result["deployment"] = _deploy_check(
            config,
            stage_vars,
            split,
            cal,
            result["eta"]["value"],
            result["chosen"]["taus"],
            arrays["chosen_stage"],
        )

    out = fileio.local_dir(out, "out")
    if jax.process_index() == 0:
        curve, on_test = arrays["curve"], arrays["grid_test"]
        keys = list(cascade.METRIC_KEYS)
        cols = ["tau", *[f"frac_{n}" for n in names], f"rel_{cost}", *keys]
        lines = [",".join(cols)]
        for i in range(len(curve["cost"])):
            vals = [curve["taus"][i][0], *curve["fractions"][i], curve["rel_cost"][i]]
            vals += [curve[k][i] for k in keys]
            lines.append(",".join(f"{v:.6g}" for v in vals))
        atomic_write(out / "cascade_curve.csv", "\n".join(lines) + "\n")
        fig = out / "figures"
        plots.plot_cascade_tradeoff(
            result,
            curve["rel_cost"],
            curve[metric],
            on_test["rel_cost"],
            on_test[metric],
            fig / "cascade_tradeoff.png",
        )
        if result["chosen"] is not None:
            y = split.trials.labels
            plots.plot_cascade_escalations(
                np.abs(s[-1] - metrics.eer(s[-1], y)[1]),
                arrays["chosen_stage"],
                names,
                fig / "cascade_escalations.png",
            )
        write_json(out / "cascade.json", result)  # last: marks the output complete
    return result


def _deploy_check(config, stage_vars, split, cal, eta_value, taus, analysis_stage) -> dict:
    """The deployment path on the test trials: embeddings computed per stage, its wall
    time against embedding every utterance in FP32, and whether it decides as the
    analysis path did."""
    import time

    from sqjax.analysis import cascade

    embed = evaluate.jitted_embed(train.build_encoder(config))
    feats = split.feats
    kw = {"batch_size": config.eval.batch_size, "max_frames": config.eval.max_frames}

    def stage_fn(variables):
        return lambda ids: evaluate.extract_embeddings(
            embed, variables, [feats[i] for i in ids], **kw
        )

    fns = [stage_fn(v) for v in stage_vars.values()]
    enroll, test = evaluate.trial_indices(split.corpus.utts, split.trials.enroll, split.trials.test)
    ab = list(zip(cal.a, cal.b))
    everyone = np.unique(np.concatenate([enroll, test]))
    fns[-1](everyone)  # compiles every length rung once, so neither timing below does
    t0 = time.perf_counter()
    dep = cascade.deploy(fns, ab, eta_value, taus, enroll, test)
    t_dep = time.perf_counter() - t0
    t0 = time.perf_counter()
    fns[-1](everyone)
    t_last = time.perf_counter() - t0
    same = bool(np.array_equal(dep["stage"], analysis_stage))
    if not same:
        log.warning(
            "cascade: the deployment path decided %d trials at another stage than the "
            "analysis path",
            int(np.sum(dep["stage"] != analysis_stage)),
        )
    return {
        "same_decisions": same,
        "embedded": [int(e) for e in dep["embedded"]],
        "utterances": len(everyone),
        "wall_s": t_dep,
        "wall_s_last_stage_alone": t_last,
    }


def format_cascade(result: dict) -> str:
    """The cascade table: each precision alone and the cascade (calibration-chosen and
    test-optimal): metrics, share decided per stage, relative costs; then the notes."""
    f = lambda v, spec: "-" if v is None else format(v, spec)
    names = result["stages"]
    head = ("system", "EER", "minDCF.01", "actDCF.01", "Cllr")
    head += tuple(f"@{n}" for n in names) + ("rel bitops", "rel MACs", "rel bytes")
    rows = [head]

    def row(label, r):
        return (
            label,
            f(r["eer"], ".4f"),
            f(r["min_dcf@0.01"], ".4f"),
            f(r["act_dcf@0.01"], ".4f"),
            f(r["cllr"], ".3f"),
            *(f"{100 * x:.1f}%" for x in r["fractions"]),
            f(r["rel_bitops"], ".3f"),
            f(r["rel_macs"], ".3f"),
            f(r["rel_bytes"], ".3f"),
        )

    for n in names:
        rows.append(row(f"{n} alone", result["systems"][n]))
    for key, label in (
        ("chosen", "cascade (tau from cal)"),
        ("test_optimal", "cascade (test-best)"),
    ):
        if result[key] is not None:
            rows.append(row(label, result[key]))
    lines = [format_table(rows, rules=(1, len(names) + 1))]
    tol = f"{result['metric']} within {result['tolerance']:.0%} of FP32"
    c = result["chosen"]
    if c is None:
        lines.append(f"no tau vector keeps {tol} on the calibration trials")
        return "\n".join(lines)
    lines.append(
        f"tau (cal, {tol}, cheapest in {result['cost']}): "
        + ", ".join(f"{n} {t:.3g}" for n, t in zip(names, c["taus"]))
        + f"; eta = {result['eta']['value']:.3f} ({result['eta']['kind']})"
    )
    t = result["test_optimal"]
    if t is not None:
        lines.append(
            f"test-optimal under the same rule: rel {result['cost']} "
            f"{t['rel_' + result['cost']]:.3f} vs {c['rel_' + result['cost']]:.3f} chosen on cal"
        )
    d = result.get("deployment")
    if d:
        lines.append(
            f"deployment path: {'same' if d['same_decisions'] else 'DIFFERENT'} decisions; "
            f"embedded {', '.join(f'{n} {e}' for n, e in zip(names, d['embedded']))} of "
            f"{d['utterances']} utterances; wall {d['wall_s']:.1f} s vs "
            f"{d['wall_s_last_stage_alone']:.1f} s for {names[-1]} alone"
        )
    lines.append(
        f"storage of all stage models: {result['storage_bytes']:,} B "
        f"({', '.join(f'{n} {b:,}' for n, b in result['model_bytes'].items())})"
    )
    lines.append(
        "rel bitops/MACs/bytes: expected per trial against FP32 alone, both sides embedded "
        "at each stage reached; MACs are equal at every precision (no low-bit kernels)"
    )
    return "\n".join(lines)


# ------------------------------------------------------------- the one-command study


def _finished(run_dir: Path, steps: int) -> bool:
    """A run trained to ``steps`` and scored (its metrics file is written last)."""
    f = run_dir / "metrics_test.json"
    return f.exists() and json.loads(f.read_text()).get("step") == steps


def _done(path: Path, key: str, expected) -> bool:
    """An analysis output exists (its JSON is written last) and covers ``expected``."""
    return path.exists() and json.loads(path.read_text()).get(key) == expected


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


def run_study(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """The paper's whole study in ``workdir``: FP32 training (or ``config.quant.init_from``),
    QAT at every width of ``config.quant.bits_list``, PTQ of the FP32 model at the same
    widths, the score-level analyses of both, the layer-wise analyses at
    ``config.study.layer_bits``, the cascade over ``config.study.cascade_stages`` (QAT
    models), and the report.

    Every stage is skipped when its outputs exist and cover what the config asks (a run
    trained to its steps; an analysis of the same precisions), so an interrupted study
    resumes where it stopped -- training runs from their last checkpoint -- and adding a
    width trains only that width (the analyses that list widths are redone).
    Returns the report's summary (``report.json``).
    """
    workdir = fileio.local_dir(workdir)
    q, st = config.quant, config.study
    bits_list = tuple(sorted(q.bits_list, reverse=True))

    def stage(name):
        log.info("study: %s", name)

    if q.init_from:
        fp32_dir = Path(q.init_from)
        if not (fp32_dir / "metrics_test.json").exists():
            raise FileNotFoundError(
                f"config.quant.init_from={fp32_dir}: not a finished run (no metrics_test.json)"
            )
    else:
        fp32_dir = workdir / "fp32"
        if not _finished(fp32_dir, config.train.num_steps):
            stage("FP32 training")
            fp32 = ml_collections.ConfigDict(config.to_dict())
            fp32.quant.bits, fp32.quant.bits_list = 0, ()
            runs.train_and_evaluate(fp32, fp32_dir)
    for b in bits_list:
        if not _finished(workdir / f"{b}bit", q.num_steps):
            stage(f"QAT at {b} bits")
            runs.train_and_evaluate(qat_run_config(config, b, fp32_dir), workdir / f"{b}bit")

    ptq_file = workdir / "ptq" / "ptq.json"
    ptq_names = ["fp32", *(f"{b}bit" for b in bits_list)]
    if st.ptq_bn_utts:
        ptq_names += [f"{b}bit+bn" for b in bits_list]
    if not (ptq_file.exists() and set(ptq_names) <= set(json.loads(ptq_file.read_text()))):
        stage("PTQ")
        runs.ptq_workdir(fp32_dir, bits_list, bn_utts=st.ptq_bn_utts, out=ptq_file.parent)

    names = ["fp32", *(f"{b}bit" for b in bits_list)]
    for kind in ("qat", "ptq"):
        out = workdir / "analysis" / kind
        if not _done(out / "score_analysis.json", "precisions", names):
            stage(f"score-level analysis ({kind})")
            if kind == "qat":
                cfg, variables = study_precisions(workdir)
            else:
                cfg, variables = ptq_precisions(fp32_dir, bits_list)
            analyze(cfg, variables, out)

    widths = [f"{b}bit" for b in st.layer_bits]
    layer_jobs = {
        "ptq": lambda: ptq_layer_jobs(fp32_dir, tuple(st.layer_bits), tuple(st.protect_bits)),
        "qat": lambda: study_layer_jobs(workdir, [b for b in st.layer_bits if b in bits_list]),
    }
    for kind, jobs_fn in layer_jobs.items():
        want = widths if kind == "ptq" else [f"{b}bit" for b in st.layer_bits if b in bits_list]
        path = workdir / "layers" / kind / "layer_analysis.json"
        if want and not (path.exists() and list(json.loads(path.read_text())["widths"]) == want):
            stage(f"layer-wise analysis ({kind})")
            cfg, jobs = jobs_fn()
            analyze_layers(cfg, jobs, path.parent, tolerance=st.layer_tolerance)

    stages = tuple(st.cascade_stages)
    names_c = stage_names(stages)
    if all(b == 32 or b in bits_list for b in stages):
        if not _done(workdir / "cascade" / "cascade.json", "stages", names_c):
            stage("cascade")
            cfg, variables = study_precisions(workdir)
            run_cascade(cfg, variables, stages, workdir / "cascade", tolerance=st.cascade_tolerance)
    else:
        log.warning(
            "study: cascade stages %s are not all QAT widths %s; skipped", stages, bits_list
        )

    info = _study_info(config, fp32_dir, bits_list)
    write_json(workdir / "study_info.json", info)
    return write_report(workdir)


def _study_info(config, fp32_dir: Path, bits_list) -> dict:
    """What the report needs besides the analyses' files: setup facts and model sizes."""
    _, state, _ = runs.restore_run(fp32_dir)
    variables = evaluate.encoder_variables(state)
    encoder = train.build_encoder(config)
    sizes = {"fp32": model_bytes(config, variables, None)}
    sizes.update({f"{b}bit": model_bytes(config, variables, b) for b in bits_list})
    return {
        "config": json.loads(config.to_json()),
        "fp32_run": str(fp32_dir),
        "params": models.count_params(encoder),
        "macs_2s": models.encoder_macs(encoder, 200),
        "sizes": sizes,
    }


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
