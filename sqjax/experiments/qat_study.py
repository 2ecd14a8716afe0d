"""``sqjax qat``: FP32 training, then QAT fine-tuning at each bit width, each width its own
run directory (``sqjax.runs``); a study grows by adding widths."""

from __future__ import annotations

import json
from pathlib import Path

import ml_collections

from sqjax import fileio, runs
from sqjax.workdir import write_json


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
