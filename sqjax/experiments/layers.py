"""``sqjax layers``: the layer-wise analysis of a PTQ or of a study's QAT runs (every layer
alone quantized or kept float, stages and kinds), and the mixed-precision suggestion."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import jax
import ml_collections
import numpy as np

from sqjax import builders, evaluate, fileio, metrics, models, prepare, quant, runs
from sqjax.experiments.precisions import bits_of_run, interval_level, trial_bootstrap, with_data
from sqjax.tables import csv_text, format_table
from sqjax.workdir import atomic_write, write_json

log = logging.getLogger("sqjax")


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
            builders.build_quantizer(config, b).rules,
        )
        for b in bits_list
    ]
    return config, jobs


def study_layer_jobs(study_dir: str | Path, bits_list=None):
    """``(config, jobs)``: each QAT run of a study at its own width (all, or
    ``bits_list``), against its own float weights, with the FP32 start model."""
    study_dir = Path(study_dir)
    subs = {bits_of_run(p): p for p in study_dir.glob("*bit") if (p / "config.json").exists()}
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
        segments=models.encoder_segments(builders.build_encoder(config)),
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
    speakers: int = 0,
) -> dict:
    """The layer-wise analysis of each width in ``jobs`` on the config's test trials (or
    ``data``/``trials``): every layer alone quantized, every layer alone kept float, every
    stage and kind of layer alone quantized, all scored in batched variant passes; then,
    where a job has higher widths to protect with, the mixed-precision suggestion (chosen
    on the calibration trials when there are any). ``speakers`` > 0: only the trials among
    the first ``speakers`` speakers of each split (the variant passes embed every
    utterance once per variant; the score-level analysis keeps the whole split).

    Writes ``layers.csv`` (one row per layer and width), ``layer_analysis.json`` and
    ``figures/layers_*_<b>bit.png`` to ``out``; returns ``{"widths": {"<b>bit": analysis},
    "suggestions": {"<b>bit": suggestion}}``.
    """
    from sqjax.analysis import layers, plots

    if not 0 <= tolerance:
        raise ValueError(f"tolerance must be >= 0 (a relative EER increase), got {tolerance}")
    config = with_data(config, data, trials, cal_data, cal_trials)
    split = prepare.test_data(config).first_speakers(speakers)
    cal_split = None
    encoder = builders.build_encoder(config)
    macs = models.encoder_macs_by_layer(encoder, config.train.n_frames)
    result = {"widths": {}, "suggestions": {}, "macs_frames": config.train.n_frames}
    boot = trial_bootstrap(config, split)
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
            boot=boot,
            level=interval_level(config),
        )
        result["widths"][name] = a
        if job.protect:
            if cal_split is None:
                cal = prepare.calibration_data(config)
                cal_split = split if cal is None else cal.first_speakers(speakers)
            result["suggestions"][name] = suggest_mix(
                config, job, bank, a, split, cal_split, tolerance
            )
    result["trials"] = {
        "data": config.data.test,
        "trials": config.data.test_trials,
        "speakers": split.n_speakers,
        "n_trials": len(split.trials),
    }

    out = fileio.local_dir(out, "out")
    if jax.process_index() == 0:
        rows = [r for a in result["widths"].values() for r in a["layers"]]
        atomic_write(out / "layers.csv", csv_text(rows, LAYER_CSV_COLUMNS))
        fig = out / "figures"
        for name, a in result["widths"].items():
            plots.plot_layer_scatter(a, fig / f"layers_scatter_{name}.png")
            plots.plot_layer_groups(a, fig / f"layers_stages_{name}.png")
            plots.plot_layer_depth(a, fig / f"layers_depth_{name}.png")
            plots.plot_layer_protection(a, fig / f"layers_protection_{name}.png")
        write_json(out / "layer_analysis.json", result)  # last: marks the output complete
    return result


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
