"""What the commands on run directories share: a study's or a PTQ's precisions (``{name:
variables}``), the trials they are scored on, and their scores in one batched pass."""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np

from sqjax import builders, evaluate, prepare, quant, runs
from sqjax.workdir import load_run_config


def bits_of_run(path: Path) -> int:
    return int(path.name.removesuffix("bit"))


def study_precisions(study_dir: str | Path) -> tuple[ml_collections.ConfigDict, dict]:
    """``(config, {name: variables})`` of a ``sqjax qat`` study: its FP32 run (``fp32/`` or
    the runs' ``init_from``) and every ``<b>bit`` QAT run, widest first."""
    study_dir = Path(study_dir)
    subs = sorted(
        (p for p in study_dir.glob("*bit") if (p / "config.json").exists()),
        key=bits_of_run,
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
        evaluate.precision_embed(builders.build_encoder(config)),
        stacked,
        split.feats,
        batch_size=config.eval.batch_size,
        max_frames=config.eval.max_frames,
        desc=f"embed x{len(variables)}" if config.progress else None,
    )
    enroll, test = evaluate.trial_indices(split.corpus.utts, split.trials.enroll, split.trials.test)
    return np.stack([evaluate.cosine_scores(e, enroll, test) for e in emb]).astype(np.float32)


def trial_bootstrap(config, split: prepare.Split):
    """The resamples (``uncertainty.bootstrap``) of ``split``'s trials that
    ``config.eval.bootstrap`` asks for: every system scored on them shares them."""
    from sqjax.analysis import uncertainty

    b = config.eval.get("bootstrap") or {}
    unit = b.get("unit", "speaker")
    enroll, test = split.trial_speakers() if unit == "speaker" else (None, None)
    return uncertainty.bootstrap(
        split.trials.labels,
        enroll,
        test,
        level=unit,
        n_resamples=int(b.get("n_resamples", 1000)),
        seed=int(b.get("seed", 0)),
    )


def interval_level(config) -> float:
    return float((config.eval.get("bootstrap") or {}).get("level", 0.95))


def with_data(config, data="", trials="", cal_data="", cal_trials=""):
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
