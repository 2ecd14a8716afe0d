"""The deploy commands on files and run directories: ONNX export of a run or model file,
embedding and scoring with an ONNX file, the cascade bundle, and claims through it.

These read data directories and runs with sqjax (and so JAX); the models they write run
with ``sqjax.deploy.runtime`` alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from sqjax.deploy import onnx_export, runtime

log = logging.getLogger("sqjax")

__all__ = [
    "embed_onnx_file",
    "evaluate_onnx_file",
    "export_cascade",
    "export_onnx",
    "export_state_onnx",
    "mel_filters",
    "verify_claims",
    "write_bundle",
]


def _fp32_metadata(workdir: Path):
    """``(variables, metadata)`` of an FP32 run, metadata as ``runs.export_workdir`` writes."""
    from sqjax import evaluate, runs

    config, state, quantizer = runs.restore_run(workdir)
    if quantizer is not None:
        raise ValueError(f"{workdir} is a {config.quant.bits}-bit QAT run, not an FP32 run")
    meta = runs._model_metadata(config, 32, workdir.absolute())
    meta["step"] = int(state.step)
    return evaluate.encoder_variables(state), meta


def export_onnx(
    *,
    workdir: str | Path = "",
    model: str | Path = "",
    out: str | Path | None = None,
    bits: int | None = None,
    packing: str = "bits",
    frontend: bool = False,
) -> Path:
    """Writes the ONNX encoder of a run (QAT: its codebooks; FP32: float, or PTQ at
    ``bits``) or of a ``sqjax export`` model file, from features or, with ``frontend``,
    from the waveform. Default path: the model file's with ``.onnx``, or
    ``WORKDIR/encoder_<b>bit.onnx`` (``encoder_fp32.onnx``; ``_wave`` before ``.onnx``
    with the front end)."""
    from sqjax import runs

    if bool(workdir) == bool(model):
        raise ValueError("give --workdir RUN or --model FILE.npz (one of them)")
    if model:
        if bits:
            raise ValueError("--bits goes with --workdir (PTQ of an FP32 run), not --model")
        if not out and frontend:
            out = Path(model).with_suffix("").with_name(Path(model).stem + "_wave.onnx")
        return onnx_export.export_model_file(model, out, packing, frontend)
    workdir = Path(workdir)
    config = runs.workdir_lib.load_run_config(workdir)
    tail = "_wave.onnx" if frontend else ".onnx"
    if not config.quant.bits and not bits:  # FP32, unquantized
        variables, meta = _fp32_metadata(workdir)
        return onnx_export.export_variables(
            variables, meta, out or workdir / f"encoder_fp32{tail}", packing, frontend
        )
    with tempfile.TemporaryDirectory() as tmp:
        npz, _ = runs.export_workdir(workdir, Path(tmp) / "encoder.npz", bits)
        b = onnx_export.leaves_from_model_file(npz)[1]["bits"]
        out = out or workdir / f"encoder_{b}bit{tail}"
        return onnx_export.export_model_file(npz, out, packing, frontend)


def _onnx_split(path, data: str, trials: str = "", workers: int = 2):
    from sqjax import prepare

    encoder = runtime.Encoder(path)
    fe = encoder.metadata["features"]
    split = prepare.load_split(
        data,
        trials or None,
        sample_rate=fe["sample_rate"],
        n_mels=fe["n_mels"],
        cache_dir=None,
        min_seconds=0.0,
        workers=workers,
        progress=True,
        kind=fe.get("kind", "logmel"),
    )
    return encoder, split


def _wave_split(encoder: runtime.Encoder, data: str, trials: str = ""):
    """The utterances (of the trials, if given) as waves, for an encoder with its front end."""
    from sqjax import data as data_lib
    from sqjax import prepare

    corpus = data_lib.read_corpus(data)
    trial_list = data_lib.read_trials(trials, corpus) if trials else None
    if trial_list is not None:
        corpus = corpus.subset(sorted(set(trial_list.enroll) | set(trial_list.test)))
    sr = int(encoder.metadata["features"]["sample_rate"])
    waves = [data_lib.load_audio(p, sr) for p in corpus.paths]
    return prepare.Split(corpus, None, trial_list), waves


def embed_onnx_file(path: str | Path, data: str, *, trials: str = "", workers: int = 2):
    """``(split, embeddings (n_utts, dim))`` of ``data``'s utterances with an ONNX encoder
    run by onnxruntime (features by sqjax, as ``runs.embed_model_file``; an encoder
    exported with its front end gets the waves)."""
    encoder = runtime.Encoder(path)
    if encoder.takes_wave:
        split, waves = _wave_split(encoder, data, trials)
        return split, encoder.embed_waves(waves)
    encoder, split = _onnx_split(path, data, trials, workers)
    return split, encoder.embed(split.feats)


def evaluate_onnx_file(path: str | Path, data: str, trials: str, **kw) -> dict:
    """Metrics of an ONNX encoder on a trial list."""
    from sqjax import evaluate, metrics

    split, emb = embed_onnx_file(path, data, trials=trials, **kw)
    enroll, test = evaluate.trial_indices(split.corpus.utts, split.trials.enroll, split.trials.test)
    scores = evaluate.cosine_scores(emb, enroll, test)
    return {
        k: float(v) for k, v in metrics.verification_metrics(scores, split.trials.labels).items()
    }


# ------------------------------------------------------------------------------ bundle


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_state_onnx(
    config,
    state,
    out: str | Path,
    bits: int | None = None,
    *,
    qstate=None,
    source="",
    packing: str = "bits",
) -> Path:
    """Writes the ONNX encoder of a train ``state`` in memory: float (``bits`` None),
    quantized with ``qstate``, or post-training quantized at ``bits``."""
    from sqjax import evaluate, runs

    if bits is None or bits == 32:
        meta = runs._model_metadata(config, 32, Path(source))
        meta["step"] = int(state.step)
        return onnx_export.export_variables(evaluate.encoder_variables(state), meta, out, packing)
    with tempfile.TemporaryDirectory() as tmp:
        npz = Path(tmp) / "encoder.npz"
        runs.export_state(config, state, bits, npz, source, qstate)
        return onnx_export.export_model_file(npz, out, packing)


def _checked_cascade(cj: Path, stages, source: str) -> dict:
    from sqjax.experiments import cascade as cascade_lib

    names = cascade_lib.stage_names(stages)
    if not cj.is_file():
        raise FileNotFoundError(
            f"{cj}: no cascade result; run `sqjax cascade {source} --stages "
            f"{','.join(map(str, stages))}` first"
        )
    result = json.loads(cj.read_text())
    if result["stages"] != names:
        raise ValueError(
            f"{cj} is the cascade of stages {result['stages']}, not {names}: rerun `sqjax "
            f"cascade` with --stages {','.join(map(str, stages))}, or give those --stages"
        )
    if result.get("chosen") is None:
        raise ValueError(
            f"{cj}: no tau kept {result['metric']} within the tolerance on the calibration "
            "trials; rerun `sqjax cascade` with a larger --tolerance"
        )
    return result


def export_cascade(
    out: str | Path,
    stages,
    *,
    study: str | Path = "",
    workdir: str | Path = "",
    cascade_json: str | Path = "",
    packing: str = "bits",
) -> dict:
    """Writes a cascade bundle: one ONNX encoder per stage, the calibration, eta and taus
    of ``sqjax cascade``'s ``cascade.json``, the front end, a versioned ``manifest.json``,
    and a copy of ``sqjax.deploy.runtime`` (``sqjax_runtime.py``). Returns the manifest.

    Stages come from a ``sqjax qat`` ``study`` (its ``<b>bit`` runs and their FP32 parent)
    or from an FP32 run ``workdir`` quantized after training; ``cascade_json`` defaults to
    ``STUDY_OR_RUN/cascade/cascade.json`` and must be of the same stages.
    """
    from sqjax import workdir as workdir_lib
    from sqjax.experiments import cascade as cascade_lib

    if bool(study) == bool(workdir):
        raise ValueError(
            "give --study DIR (a `sqjax qat` study) or --workdir FP32_RUN (PTQ stages)"
        )
    names = cascade_lib.stage_names(stages)
    source = Path(study or workdir)
    cj = Path(cascade_json or source / "cascade" / "cascade.json")
    _checked_cascade(cj, stages, f"--{'study' if study else 'workdir'} {source}")
    if study:
        sub = next(p for p in sorted(Path(study).glob("*bit")) if (p / "config.json").exists())
        fp32_dir = Path(workdir_lib.load_run_config(sub).quant.init_from)
    else:
        fp32_dir = Path(workdir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for p, (name, bits) in enumerate(zip(names, stages)):
        file = out / f"stage{p}_{name}.onnx"
        if bits == 32:
            export_onnx(workdir=fp32_dir, out=file, packing=packing)
        elif study:
            run = Path(study) / name
            if not (run / "config.json").exists():
                raise FileNotFoundError(f"{run}: no {name} QAT run in the study")
            export_onnx(workdir=run, out=file, packing=packing)
        else:
            export_onnx(workdir=fp32_dir, bits=bits, out=file, packing=packing)
        files.append(file)
    return write_bundle(out, files, stages, cj, source)


def write_bundle(out: str | Path, files, stages, cascade_json: str | Path, source="") -> dict:
    """The bundle around stage ONNX files already written into ``out`` (one per stage,
    cheapest first): ``cascade_json``'s calibration, eta and taus, the front end, the
    manifest and the runtime (``export_cascade`` without the export). Returns the manifest."""
    cj = Path(cascade_json)
    result = _checked_cascade(cj, stages, str(source))
    names = result["stages"]
    out = Path(out)
    rows, meta = [], None
    for p, (name, bits, file) in enumerate(zip(names, stages, map(Path, files), strict=True)):
        if file.parent.absolute() != out.absolute():
            raise ValueError(f"{file}: stage files go in the bundle directory {out}")
        meta = runtime.Encoder(file).metadata
        cal = result["calibration"]
        rows.append({
            "name": name, "bits": bits, "file": file.name, "bytes": file.stat().st_size,
            "sha256": _sha256(file), "a": cal["a"][p], "b": cal["b"][p],
            "tau": result["chosen"]["taus"][p] if p < len(names) - 1 else None,
        })  # fmt: skip
    fe = meta["features"]
    if fe.get("kind", "logmel") == "logmel":
        np.savez(out / "frontend.npz", mel=mel_filters(fe))
    shutil.copyfile(runtime.__file__, out / "sqjax_runtime.py")
    manifest = {
        "format": runtime.BUNDLE_FORMAT,
        "version": runtime.BUNDLE_VERSION,
        "stages": rows,
        "eta": result["eta"]["value"],
        "eta_kind": result["eta"]["kind"],
        "p_target_calibration": result["calibration"]["p_target"],
        "metric": result["metric"],
        "tolerance": result["tolerance"],
        "features": fe,
        "source": {"dir": str(Path(source).absolute()), "cascade_json": str(cj.absolute())},
        "runtime": "sqjax_runtime.py: from sqjax_runtime import Verifier (numpy + onnxruntime)",
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def mel_filters(spec: dict) -> np.ndarray:
    """librosa's ``(n_mels, n_fft // 2 + 1)`` mel filters of a model file's ``features``
    (what ``sqjax.features.logmel`` uses; the runtime's log-mel front end needs them)."""
    import librosa

    n_fft = 1 << (round(spec["sample_rate"] * spec["win_ms"] / 1000) - 1).bit_length()
    mel = librosa.filters.mel(sr=spec["sample_rate"], n_fft=n_fft, n_mels=spec["n_mels"])
    return mel.astype(np.float32)


def _read_enroll(path: str | Path) -> dict[str, list[str]]:
    """``speaker utt [utt ...]`` per line (utterance ids of the data dir)."""
    out: dict[str, list[str]] = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise ValueError(f"{path}:{n}: expected 'speaker utt [utt ...]', got {line!r}")
        out.setdefault(parts[0], []).extend(parts[1:])
    if not out:
        raise ValueError(f"{path}: no enrollments")
    return out


def verify_claims(bundle: str | Path, data: str, enroll: str, claims: str) -> dict:
    """Enrolls each speaker of ``enroll`` and scores each claim of ``claims`` (a trial list
    whose first column is the claimed speaker) with a bundle's ``Verifier``.

    Returns ``{"accept", "llr", "stage" (per claim), "per_stage" (claims decided at each
    stage), "embedded" (embeddings computed per stage), "metrics"}``.
    """
    from sqjax import data as data_lib
    from sqjax import metrics

    verifier = runtime.Verifier(bundle)
    corpus = data_lib.read_corpus(data)
    path_of = dict(zip(corpus.utts, corpus.paths))
    sr = verifier.frontend["sample_rate"]

    def wave(utt):
        if utt not in path_of:
            raise ValueError(f"utterance {utt!r} is not in {data}")
        return data_lib.load_audio(path_of[utt], sr)

    for speaker, utts in _read_enroll(enroll).items():
        verifier.enroll(speaker, [wave(u) for u in utts])
    enrolled = verifier.embedded.copy()
    trials = data_lib.read_trials(claims)
    missing = sorted(set(trials.enroll) - set(verifier.speakers))
    if missing:
        raise ValueError(f"{claims}: claims of speakers not in {enroll}: {missing[:5]}")
    out = [verifier.verify(s, wave(u)) for s, u in zip(trials.enroll, trials.test)]
    accept, llr, stage = (np.array(x) for x in zip(*out))
    result = {
        "stages": verifier.stages,
        "claims": {"speaker": trials.enroll, "utt": trials.test},
        "accept": accept,
        "llr": llr,
        "stage": stage,
        "per_stage": np.bincount(stage, minlength=len(verifier.stages)),
        "embedded_enroll": enrolled,
        "embedded_claims": verifier.embedded - enrolled,
        "labels": trials.labels,
    }
    if trials.labels.any() and not trials.labels.all():
        result["metrics"] = {
            k: float(v) for k, v in metrics.verification_metrics(llr, trials.labels).items()
        }
        result["metrics"]["error_rate"] = float(np.mean(accept != trials.labels))
    return result
