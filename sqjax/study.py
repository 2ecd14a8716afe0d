"""Run-level quantization workflows: the QAT study, post-training quantization, export.

Each reads and writes training work directories (see ``sqjax.train``).
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections

from sqjax import evaluate, export, prepare
from sqjax.train import (
    build_quantizer,
    restore_run,
    train_and_evaluate,
    write_json,
)


def quantization_study(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, dict]:
    """FP32 training (unless ``config.quant.init_from`` names a trained run), then QAT
    fine-tuning from it at each width in ``config.quant.bits_list``, each in its own
    sub-run ``workdir/<b>bit``. Returns ``{"fp32": metrics, "<b>bit": metrics, ...}``,
    also written to ``workdir/study.json``."""
    workdir = Path(workdir)
    q = config.quant
    rows = {}
    if q.init_from:
        init_from = Path(q.init_from)
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
        fp32.quant.bits = 0
        rows["fp32"] = train_and_evaluate(fp32, init_from)
    for bits in q.bits_list:
        c = ml_collections.ConfigDict(config.to_dict())
        c.quant.bits, c.quant.init_from = bits, str(init_from)
        c.train.num_steps, c.train.learning_rate = q.num_steps, q.learning_rate
        c.train.warmup_steps, c.head.margin_warmup_steps = q.warmup_steps, 0
        c.eval.baseline = False
        rows[f"{bits}bit"] = train_and_evaluate(c, workdir / f"{bits}bit")
    write_json(workdir / "study.json", rows)
    return rows


def ptq_workdir(workdir: str | Path, bits_list=(8, 4, 3, 2, 1)) -> dict[str, dict]:
    """Post-training quantization of a trained FP32 run at each width (no fine-tuning).

    Scores the run's test trials at each width; writes ``metrics_ptq<b>.json`` and
    ``ptq.json`` to ``workdir`` and returns ``{"fp32": ..., "<b>bit": ...}``.
    """
    workdir = Path(workdir)
    config, state, quantizer = restore_run(workdir)
    if quantizer is not None:
        raise ValueError(f"{workdir} is a QAT run ({config.quant.bits} bits): give an FP32 run")
    config.eval.baseline = False
    split = prepare.test_data(config)
    rows = {"fp32": evaluate.evaluate_run(config, workdir, state=state, split=split, tag="fp32")}
    for bits in bits_list:
        q = build_quantizer(config, bits)
        s = state.replace(qstate=q.init(state.params["encoder"]))
        rows[f"{bits}bit"] = evaluate.evaluate_run(
            config, workdir, state=s, quantizer=q, split=split, tag=f"ptq{bits}"
        )
    write_json(workdir / "ptq.json", rows)
    return rows


def export_workdir(workdir: str | Path, out: str | Path | None = None, bits: int | None = None):
    """Writes a run's encoder as a packed file (``sqjax.export`` format).

    A QAT run exports its own codebooks; an FP32 run needs ``bits`` (post-training
    quantization). Returns ``(path, SizeReport)``; the default path is
    ``workdir/encoder_<b>bit.npz``. BatchNorm statistics are not part of the file.
    """
    workdir = Path(workdir)
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
        quantizer = build_quantizer(config, bits)
        qstate = quantizer.init(state.params["encoder"])
    path = Path(out) if out else workdir / f"encoder_{bits}bit.npz"
    return path, export.export_packed(path, state.params["encoder"], qstate)
