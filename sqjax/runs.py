"""A run as a whole: train then evaluate, restore a finished run, score it on any data,
quantize it after training, and export it as a standalone model file.

Functions here read and write run directories (``sqjax.workdir``); the computations they
call below them take arrays.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sqjax import builders, evaluate, export, fileio, metrics, prepare, train
from sqjax import workdir as workdir_lib
from sqjax.pipeline import CropSampler, WaveSampler

log = logging.getLogger("sqjax")


# ------------------------------------------------------------------------ runs on disk


def restore_run(
    workdir: str | Path, step: int | None = None, overrides=(), *, strict: bool | None = None
):
    """``(config, state, quantizer)`` of a training run's checkpoint (by default the newest
    readable one; ``strict``: the latest or an error, see ``workdir.restore_newest``).

    ``quantizer`` is None for FP32 runs; ``overrides`` are ``--config.key=value`` items.
    """
    from sqjax import config as config_lib

    workdir = fileio.local(workdir)
    config = workdir_lib.load_run_config(workdir)
    config_lib.apply_overrides(config, list(overrides), source=Path(workdir) / "config.json")
    template, quantizer = builders.state_template(config)
    replicated = NamedSharding(train.make_mesh(), P())
    state = workdir_lib.restore_latest(workdir, template, replicated, step, strict=strict)
    return config, state, quantizer


def _fp32_init(init_from: str) -> builders.TrainState:
    config, state, quantizer = restore_run(init_from)
    if quantizer is not None:
        raise ValueError(
            f"config.quant.init_from={init_from} is a {config.quant.bits}-bit QAT run: "
            "give an FP32 run"
        )
    return state


def _inherit_model(config: ml_collections.ConfigDict, init_from: str) -> None:
    """Sets ``config.model`` (but its compute dtype) and ``config.features`` to those of
    the FP32 run ``init_from``: a QAT run fine-tunes that network, on its features."""
    parent = workdir_lib.load_run_config(init_from)
    model = {**parent.model, "dtype": config.model.dtype}
    features = parent.features.to_dict()
    mine = json.loads(config.to_json())  # as saved: tuples become lists
    if model != mine["model"] or features != mine["features"]:
        log.warning(
            "config.quant.init_from=%s: model and features as that run's (%s, %s features)",
            init_from,
            model["name"],
            features["kind"],
        )
    config.model.update(model)
    config.features.update(features)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains (or resumes) the run in ``workdir``, then scores its test trials.

    Returns the test metrics (also written to ``workdir/metrics_test.json``). ``workdir``
    and the config's paths may be ``file://`` URLs (made local paths here).
    """
    from sqjax import config as config_lib

    config = ml_collections.ConfigDict(config.to_dict())  # the caller's config stays as it was
    config_lib.normalise_paths(config)
    workdir = fileio.local(workdir)
    paths = prepare.resolve_paths(config)
    if not (paths.test and paths.test_trials):
        raise ValueError("set config.data.test and config.data.test_trials (scored after training)")
    if config.quant.init_from:
        _inherit_model(config, config.quant.init_from)
    data = prepare.training_input(config)
    config.head.num_classes = data.n_speakers
    init = (lambda: _fp32_init(config.quant.init_from)) if config.quant.init_from else None
    state = train.train(config, workdir, data, init=init)
    quantizer = builders.build_quantizer(config, config.quant.bits) if config.quant.bits else None
    variables = evaluate.encoder_variables(state, quantizer)
    train_split = data if data.raw_feats is not None else None  # the baseline's statistics
    return evaluate_run(config, workdir, variables, step=int(state.step), train_split=train_split)


# -------------------------------------------------------------------------- evaluation


def score_variables(config, variables, split: prepare.Split) -> np.ndarray:
    """Cosine scores of ``split``'s trials under encoder ``variables``, the embeddings
    split over the devices (and processes) of ``train.make_mesh(config.num_devices)``."""
    sharding = NamedSharding(train.make_mesh(config.num_devices), P("data"))
    return evaluate.score_split(
        evaluate.jitted_embed(builders.build_encoder(config)),
        variables,
        split,
        batch_size=config.eval.batch_size,
        max_frames=config.eval.max_frames,
        sharding=sharding,
    )


def evaluate_run(
    config,
    workdir,
    variables,
    *,
    step: int,
    split: prepare.Split | None = None,
    train_split: prepare.Split | None = None,
    tag: str = "test",
) -> dict:
    """Scores ``split`` (default: the config's test trials) with encoder ``variables``;
    writes ``scores_<tag>.npz`` and ``metrics_<tag>.json`` to ``workdir``; returns the
    metrics.

    When ``config.eval.baseline`` is set, the raw-feature baseline's metrics on the same
    trials are added under ``baseline/`` (standardised with ``train_split``'s statistics).
    """
    workdir = fileio.as_path(workdir)
    split = split or prepare.test_data(config)
    scores = score_variables(config, variables, split)
    labels = split.trials.labels
    result = metrics.verification_metrics(scores, labels)
    if config.eval.baseline:
        if train_split is None and config.data.input == "stream":
            log.warning(
                "eval.baseline=True with streamed input: extracting features of the whole "
                "training set for the baseline's statistics (set eval.baseline=False to skip)"
            )
        train_split = train_split or prepare.training_data(config)
        base = evaluate.raw_feature_baseline(train_split.raw_feats, split.raw_feats)
        enroll, test = evaluate.trial_indices(
            split.corpus.utts, split.trials.enroll, split.trials.test
        )
        base_result = metrics.verification_metrics(
            evaluate.cosine_scores(base, enroll, test), labels
        )
        result.update({f"baseline/{k}": v for k, v in base_result.items()})
    result = {k: float(v) for k, v in result.items()}
    result["step"] = step
    if jax.process_index() == 0:
        workdir_lib.atomic_write(
            workdir / f"scores_{tag}.npz",
            lambda f: np.savez(f, scores=scores, labels=labels),
        )
        workdir_lib.write_json(workdir / f"metrics_{tag}.json", result)
    return result


def evaluate_workdir(
    workdir: str | Path,
    *,
    data: str = "",
    trials: str = "",
    step: int | None = None,
    overrides=(),
) -> dict:
    """Scores a trial list with the checkpoint of a training run (QAT runs quantized).

    Without ``data``/``trials`` it uses the run's own test set. Results go to
    ``workdir/metrics_<tag>.json`` with tag ``test`` or the trial file's stem.
    """
    config, state, quantizer = restore_run(workdir, step, overrides)
    tag = "test"
    if data or trials:
        if not (data and trials):
            raise ValueError("give both --data and --trials (or neither, for the run's test set)")
        config.data.test, config.data.test_trials, tag = data, trials, Path(trials).stem
        config.eval.baseline = False
    variables = evaluate.encoder_variables(state, quantizer)
    return evaluate_run(config, workdir, variables, step=int(state.step), tag=tag)


# ---------------------------------------------------- post-training quantization, export


def reestimated_variables(config, variables: dict, data: prepare.Split, n_utts: int) -> dict:
    """``variables`` with BatchNorm statistics re-estimated on ``n_utts`` random training
    crops (``config.train.n_frames`` long), in batches of ``config.eval.batch_size``; of
    streamed ``data`` (``prepare.training_input``), crops of the audio, not augmented."""
    n_frames, bs = config.train.n_frames, config.eval.batch_size
    if data.raw_feats is None:
        plain = ml_collections.ConfigDict(config.to_dict())
        plain.data.augment.p_noise = plain.data.augment.p_reverb = 0.0
        featurize, _, n_samples = train.stream_input(plain, n_frames)
        featurize = jax.jit(featurize)
        sampler = WaveSampler(
            data.corpus.paths, data.labels, n_samples, config.data.sample_rate, config.seed
        )
        draw = lambda step: featurize(0, jnp.asarray(sampler.batch(step, bs)["wave"]), {})
    else:
        sampler = CropSampler(data.feats, data.labels, n_frames, config.seed)
        draw = lambda step: jnp.asarray(sampler.batch(step, bs)["feats"])
    # Steps training never draws.
    batches = (draw(1_000_000 + i) for i in range(max(1, math.ceil(n_utts / bs))))
    stats = train.reestimate_batch_stats(builders.build_encoder(config), variables, batches)
    return {"params": variables["params"], "batch_stats": stats}


def ptq_variables(config, state: builders.TrainState, bits: int) -> dict:
    """Inference variables of an FP32 ``state`` quantized after training at ``bits``."""
    q = builders.build_quantizer(config, bits)
    return evaluate.encoder_variables(state.replace(qstate=q.init(state.params["encoder"])), q)


def ptq_workdir(
    workdir: str | Path, bits_list=(8, 4, 3, 2, 1), bn_utts: int = 256, out: str | Path = ""
) -> dict:
    """Post-training quantization of a trained FP32 run at each width (no fine-tuning).

    Scores the run's test trials at each width as ``<b>bit``; with ``bn_utts > 0`` also
    with BatchNorm statistics re-estimated under the quantized weights on that many
    training crops, as ``<b>bit+bn``. Writes ``metrics_ptq<b>[_bn].json`` and ``ptq.json``
    to ``out`` (default: ``workdir``) and returns the rows, ``fp32`` first.
    """
    workdir = fileio.local_dir(workdir)
    out = fileio.local_dir(out or workdir, "out")
    config, state, quantizer = restore_run(workdir)
    if quantizer is not None:
        raise ValueError(f"{workdir} is a QAT run ({config.quant.bits} bits): give an FP32 run")
    config.eval.baseline = False
    split = prepare.test_data(config)
    data = prepare.training_input(config) if bn_utts > 0 else None
    step = int(state.step)
    fp32 = evaluate.encoder_variables(state)
    rows = {"fp32": evaluate_run(config, out, fp32, step=step, split=split, tag="fp32")}
    for bits in bits_list:
        variables = ptq_variables(config, state, bits)
        rows[f"{bits}bit"] = evaluate_run(
            config, out, variables, step=step, split=split, tag=f"ptq{bits}"
        )
        if data is not None:
            variables = reestimated_variables(config, variables, data, bn_utts)
            rows[f"{bits}bit+bn"] = evaluate_run(
                config, out, variables, step=step, split=split, tag=f"ptq{bits}_bn"
            )
    workdir_lib.write_json(out / "ptq.json", rows)
    return rows


def _model_metadata(config, bits: int, source: Path) -> dict:
    return {
        "kind": "sqjax-encoder",
        "bits": bits,
        "model": config.model.to_dict(),
        "features": {
            "sample_rate": config.data.sample_rate,
            "n_mels": config.model.n_mels,
            "win_ms": 25.0,
            "hop_ms": 10.0,
            "mean_norm": True,
            "kind": config.features.kind,
        },
        "eval": {"batch_size": config.eval.batch_size, "max_frames": config.eval.max_frames},
        "source": str(source),
        "step": None,
    }


def export_workdir(workdir: str | Path, out: str | Path | None = None, bits: int | None = None):
    """Writes a run's encoder as one standalone packed file: b-bit indices + codebooks,
    BatchNorm statistics, and the model and feature settings (``sqjax.export`` format).

    A QAT run exports its own codebooks; an FP32 run needs ``bits`` (post-training
    quantization). Returns ``(path, SizeReport)``; the default path is
    ``workdir/encoder_<b>bit.npz``. ``load_model_file`` reads it back.
    """
    workdir = fileio.local_dir(workdir)
    config, state, quantizer = restore_run(workdir)
    if quantizer is not None:
        if bits and bits != config.quant.bits:
            raise ValueError(
                f"{workdir} is a {config.quant.bits}-bit QAT run: export it without --bits "
                "(its own codebooks), or quantize its FP32 parent run instead"
            )
        bits, qstate = config.quant.bits, state.qstate
    else:
        if not bits:
            raise ValueError(
                f"{workdir} is an FP32 run: give --bits for post-training quantization"
            )
        qstate = None
    path = Path(out) if out else workdir / f"encoder_{bits}bit.npz"
    return path, export_state(config, state, bits, path, workdir.absolute(), qstate)


def export_state(config, state, bits: int, path: str | Path, source: str | Path = "", qstate=None):
    """Writes the encoder of a train ``state`` as a packed file (``export_workdir``'s
    format): quantized with ``qstate``, or post-training at ``bits`` when it is None.
    Returns the ``SizeReport``."""
    if qstate is None:
        qstate = builders.build_quantizer(config, bits).init(state.params["encoder"])
    variables = {"params": state.params["encoder"], "batch_stats": state.batch_stats}
    # Every field of the state (codebooks; a uniform grid's scales and zeros too) over
    # the whole variables tree: BatchNorm statistics stay float.
    floats = jax.tree.map(lambda _: None, state.batch_stats)
    qstate = type(qstate)(*({"params": f, "batch_stats": floats} for f in qstate))
    meta = _model_metadata(config, bits, Path(source))
    meta["step"] = int(state.step)
    return export.export_packed(path, variables, qstate, meta)


def load_model_file(path: str | Path):
    """``(config, variables)`` of a file written by ``export_workdir``: a config holding
    the model, feature and eval settings, and the encoder's inference variables."""
    meta = export.read_metadata(path)
    if meta.get("kind") != "sqjax-encoder":
        raise ValueError(
            f"{path}: not a sqjax model file (a packed file without model settings); "
            "write it with `sqjax export`"
        )
    from sqjax.config import default_config

    config = default_config()
    config.model.update(meta["model"])
    config.data.sample_rate = meta["features"]["sample_rate"]
    config.features.kind = meta["features"].get("kind", "logmel")
    config.eval.update(meta["eval"])
    return config, export.load_packed(path)


def embed_model_file(
    path: str | Path, data: str, *, trials: str = "", cache_dir: str = "", workers: int = 2
):
    """Embeddings of every utterance of ``data`` (or of those ``trials`` use) with a model
    file: ``(split, embeddings (n_utts, dim))``."""
    config, variables = load_model_file(path)
    split = prepare.load_split(
        data,
        trials or None,
        sample_rate=config.data.sample_rate,
        n_mels=config.model.n_mels,
        cache_dir=cache_dir or None,
        min_seconds=0.0,
        workers=workers,
        progress=True,
        kind=config.features.kind,
    )
    emb = evaluate.extract_embeddings(
        evaluate.jitted_embed(builders.build_encoder(config)),
        variables,
        split.feats,
        batch_size=config.eval.batch_size,
        max_frames=config.eval.max_frames,
    )
    return split, emb


def evaluate_model_file(path: str | Path, data: str, trials: str, **kw) -> dict:
    """Metrics of a model file on a trial list (no training run needed)."""
    split, emb = embed_model_file(path, data, trials=trials, **kw)
    enroll, test = evaluate.trial_indices(split.corpus.utts, split.trials.enroll, split.trials.test)
    scores = evaluate.cosine_scores(emb, enroll, test)
    return {
        k: float(v) for k, v in metrics.verification_metrics(scores, split.trials.labels).items()
    }
