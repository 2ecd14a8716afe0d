"""``sqjax study``: the paper's whole study in one resumable command -- FP32, QAT and PTQ at
each width, the score-level, layer-wise and cascade analyses, then the report."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import ml_collections

from sqjax import builders, evaluate, fileio, models, runs
from sqjax.experiments import analyze, cascade, layers, precisions, report
from sqjax.experiments.qat_study import qat_run_config
from sqjax.workdir import write_json

log = logging.getLogger("sqjax")


def _finished(run_dir: Path, steps: int) -> bool:
    """A run trained to ``steps`` and scored (its metrics file is written last)."""
    f = run_dir / "metrics_test.json"
    return f.exists() and json.loads(f.read_text()).get("step") == steps


def _done(path: Path, key: str, expected) -> bool:
    """An analysis output exists (its JSON is written last) and covers ``expected``."""
    return path.exists() and json.loads(path.read_text()).get(key) == expected


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
                cfg, variables = precisions.study_precisions(workdir)
            else:
                cfg, variables = precisions.ptq_precisions(fp32_dir, bits_list)
            analyze.analyze(cfg, variables, out)

    widths = [f"{b}bit" for b in st.layer_bits]
    layer_jobs = {
        "ptq": lambda: layers.ptq_layer_jobs(
            fp32_dir, tuple(st.layer_bits), tuple(st.protect_bits)
        ),
        "qat": lambda: layers.study_layer_jobs(
            workdir, [b for b in st.layer_bits if b in bits_list]
        ),
    }
    for kind, jobs_fn in layer_jobs.items():
        want = widths if kind == "ptq" else [f"{b}bit" for b in st.layer_bits if b in bits_list]
        path = workdir / "layers" / kind / "layer_analysis.json"
        if want and not (path.exists() and list(json.loads(path.read_text())["widths"]) == want):
            stage(f"layer-wise analysis ({kind})")
            cfg, jobs = jobs_fn()
            layers.analyze_layers(
                cfg,
                jobs,
                path.parent,
                tolerance=st.layer_tolerance,
                speakers=st.get("layer_speakers", 0),
            )

    stages = tuple(st.cascade_stages)
    names_c = cascade.stage_names(stages)
    if all(b == 32 or b in bits_list for b in stages):
        if not _done(workdir / "cascade" / "cascade.json", "stages", names_c):
            stage("cascade")
            cfg, variables = precisions.study_precisions(workdir)
            cascade.run_cascade(
                cfg, variables, stages, workdir / "cascade", tolerance=st.cascade_tolerance
            )
    else:
        log.warning(
            "study: cascade stages %s are not all QAT widths %s; skipped", stages, bits_list
        )

    info = _study_info(config, fp32_dir, bits_list)
    write_json(workdir / "study_info.json", info)
    return report.write_report(workdir)


def _study_info(config, fp32_dir: Path, bits_list) -> dict:
    """What the report needs besides the analyses' files: setup facts and model sizes."""
    _, state, _ = runs.restore_run(fp32_dir)
    variables = evaluate.encoder_variables(state)
    encoder = builders.build_encoder(config)
    sizes = {"fp32": cascade.model_bytes(config, variables, None)}
    sizes.update({f"{b}bit": cascade.model_bytes(config, variables, b) for b in bits_list})
    return {
        "config": json.loads(config.to_json()),
        "fp32_run": str(fp32_dir),
        "params": models.count_params(encoder),
        "macs_2s": models.encoder_macs(encoder, 200),
        "sizes": sizes,
    }
