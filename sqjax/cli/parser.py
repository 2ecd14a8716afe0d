"""The ``sqjax`` command line: its subcommands, their arguments and the argument types
that check them (a bad value is a one-line usage error naming it)."""

from __future__ import annotations

import argparse
import os

from sqjax.cli.commands import (
    cmd_analyze,
    cmd_cascade,
    cmd_embed,
    cmd_eval,
    cmd_export,
    cmd_grids,
    cmd_import_wespeaker,
    cmd_layers,
    cmd_ptq,
    cmd_qat,
    cmd_report,
    cmd_study,
    cmd_synth,
    cmd_train,
    cmd_verify,
)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line too (the usage is in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _at_least(low: float, kind=int):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value

    return parse


def _bit(text: str) -> int:
    (bits,) = _bits_list(text)
    return bits


def _stages(text: str) -> tuple[int, ...]:
    try:
        stages = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated ints like 2,4,8,32, got {text!r}"
        )
    if len(stages) < 2 or list(stages) != sorted(set(stages)):
        raise argparse.ArgumentTypeError(f"give 2+ increasing widths like 2,4,8,32, got {text!r}")
    if any(not (1 <= b <= 8 or b == 32) for b in stages):
        raise argparse.ArgumentTypeError(f"widths are 1..8 or 32 (FP32), got {text!r}")
    return stages


def _eta(text: str) -> str | float:
    if text == "eer":
        return text
    try:
        eta = float(text)
    except ValueError:
        eta = -1.0
    if not 0.0 < eta < 1.0:
        raise argparse.ArgumentTypeError(f"'eer' or a p_target in (0, 1) like 0.01, got {text!r}")
    return eta


def _bits_list(text: str) -> tuple[int, ...]:
    try:
        bits = tuple(int(b) for b in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints like 8,4,2, got {text!r}")
    if not all(1 <= b <= 8 for b in bits):
        raise argparse.ArgumentTypeError(f"bit widths must be in 1..8, got {text!r}")
    return bits


def _trial_args(p: argparse.ArgumentParser, cal: str | None = "the calibration trials") -> None:
    """--data/--trials, and --cal-data/--cal-trials unless ``cal`` is None."""
    p.add_argument("--data", default="", help="data dir of other test trials")
    p.add_argument("--trials", default="", help="trial list in --data")
    if cal is not None:
        p.add_argument("--cal-data", default="", help=f"data dir of {cal}")
        p.add_argument("--cal-trials", default="", help="trial list in --cal-data")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="sqjax",
        description="Low-bit K-means quantization of speaker-verification ResNets (JAX/Flax).",
        epilog="Config overrides: --config.<key>=<value>, e.g. --config.train.num_steps=100",
    )
    p.add_argument(
        "--cpu-devices",
        type=_at_least(1),
        default=int(os.environ.get("SQJAX_CPU_DEVICES", "1")),
        help="simulated CPU devices for data parallelism on a CPU host (default 1; 2 is "
        "faster for width-16 and wider models on 2 cores, slower for the width-8 demo: "
        "docs/speed.md, Data parallelism); no effect on GPUs and TPUs",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks of expected errors")
    p.add_argument(
        "--strict-restore",
        action="store_true",
        help="refuse a run whose latest checkpoint cannot be read (default: use the newest "
        "readable one, saying which)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train an FP32 encoder, then score the test trials")
    t.add_argument("--config", required=True, help="config file, e.g. configs/demo.py")
    t.add_argument("--workdir", required=True, help="run directory (resumes if it has checkpoints)")
    t.set_defaults(fn=cmd_train)

    q = sub.add_parser(
        "qat", help="quantization-aware fine-tuning at each of config.quant.bits_list"
    )
    q.add_argument("--config", required=True, help="config file, e.g. configs/qat_demo.py")
    q.add_argument("--workdir", required=True, help="study directory: one sub-run per bit width")
    q.set_defaults(fn=cmd_qat)

    pt = sub.add_parser("ptq", help="post-training quantization of an FP32 run, scored per width")
    pt.add_argument("--workdir", required=True, help="FP32 run directory")
    pt.add_argument("--bits", type=_bits_list, default=(8, 4, 3, 2, 1), help="e.g. 8,4,2")
    pt.add_argument(
        "--bn-utts",
        type=_at_least(0),
        default=256,
        help="also score with BatchNorm statistics re-estimated on this many training crops "
        "(0: skip)",
    )
    pt.set_defaults(fn=cmd_ptq)

    x = sub.add_parser("export", help="write a run's encoder as packed b-bit indices + codebooks")
    x.add_argument("--workdir", default="", help="QAT run (or FP32 run with --bits)")
    x.add_argument("--out", default=None, help="output file (default: WORKDIR/encoder_<b>bit.npz)")
    x.add_argument("--bits", type=_bit, default=None, help="PTQ width (1..8) for an FP32 run")
    x.add_argument("--format", choices=("npz", "onnx"), default="npz", help="npz: sqjax's file")
    x.add_argument("--model", default="", help="--format onnx of a `sqjax export` .npz file")
    x.add_argument(
        "--packing", choices=("bits", "uint8"), default="bits", help="ONNX index storage"
    )
    x.add_argument(
        "--with-frontend",
        action="store_true",
        help="--format onnx from the waveform (the features computed in the graph)",
    )
    x.add_argument("--cascade", action="store_true", help="a cascade bundle into --out DIR")
    x.add_argument("--study", default="", help="--cascade: a `sqjax qat` study directory")
    x.add_argument(
        "--stages",
        type=_stages,
        default=(2, 4, 8, 32),
        help="--cascade: the stages of its cascade.json (default 2,4,8,32)",
    )
    x.set_defaults(fn=cmd_export)

    e = sub.add_parser("eval", help="score a trial list with a trained run or a model file")
    e.add_argument("--workdir", default="", help="run directory written by train or qat")
    e.add_argument("--model", default="", help="model file written by `sqjax export`")
    e.add_argument("--data", default="", help="data dir holding the trial utterances")
    e.add_argument("--trials", default="", help="trial list (VoxCeleb or Kaldi format)")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    e.set_defaults(fn=cmd_eval)

    a = sub.add_parser(
        "analyze", help="score-level analysis of every precision against FP32 (drift, flips, knee)"
    )
    a.add_argument("--study", default="", help="a `sqjax qat` study directory")
    a.add_argument("--workdir", default="", help="an FP32 run, quantized after training")
    a.add_argument("--ptq", type=_bits_list, default=None, help="widths for --workdir (8,4,3,2,1)")
    _trial_args(a)
    a.add_argument("--threshold", choices=("eer", "min_dcf"), default="eer", help="FP32 theta")
    a.add_argument("--out", default="", help="output dir (default: STUDY_OR_RUN/analysis)")
    a.set_defaults(fn=cmd_analyze)

    ly = sub.add_parser(
        "layers", help="layer-wise analysis: distortion vs sensitivity, protection, mixed precision"
    )
    ly.add_argument("--workdir", default="", help="an FP32 run, quantized after training")
    ly.add_argument("--study", default="", help="a `sqjax qat` study: each run at its own width")
    ly.add_argument(
        "--bits", type=_bits_list, default=None, help="widths (default: 2; a study's: all)"
    )
    ly.add_argument(
        "--protect",
        type=_bits_list,
        default=(4, 8),
        help="higher widths the mixed-precision suggestion may keep layers at (--workdir)",
    )
    ly.add_argument(
        "--per-channel",
        action="store_true",
        help="PTQ with one codebook per output channel (default: per tensor)",
    )
    ly.add_argument(
        "--tolerance",
        type=_at_least(0.0, float),
        default=0.10,
        help="mixed-precision target: EER at most (1 + tolerance) x the float model's",
    )
    _trial_args(ly, cal="the trials the mix is chosen on")
    ly.add_argument("--threshold", choices=("eer", "min_dcf"), default="eer", help="flips' theta")
    ly.add_argument(
        "--speakers",
        type=_at_least(0),
        default=0,
        help="only the trials among the first N speakers of each split (0: all); a layer-"
        "wise analysis embeds every utterance once per variant",
    )
    ly.add_argument(
        "--top", type=_at_least(1), default=10, help="layers shown in the printed table"
    )
    ly.add_argument("--out", default="", help="output dir (default: STUDY_OR_RUN/layers)")
    ly.set_defaults(fn=cmd_layers)

    g = sub.add_parser(
        "grids", help="K-means against uniform integer grids, per tensor and per channel"
    )
    g.add_argument("--workdir", required=True, help="an FP32 run (PTQ of it with each method)")
    g.add_argument(
        "--bits", type=_bits_list, default=(1, 2, 3, 4, 8), help="PTQ widths (default 1,2,3,4,8)"
    )
    g.add_argument(
        "--qat",
        action="append",
        default=[],
        help="a `sqjax qat` study to add as QAT rows (repeatable; its config names the method)",
    )
    g.add_argument(
        "--qat-bits",
        type=_bits_list,
        default=(),
        help="also run QAT at these widths with each method (into OUT/qat/)",
    )
    g.add_argument(
        "--qat-config",
        default="",
        help="config of those QAT runs' settings, e.g. configs/qat_demo.py (default: the run's)",
    )
    g.add_argument("--symmetric", action="store_true", help="uniform grid symmetric about 0")
    g.add_argument("--scale", choices=("mse", "minmax"), default="mse", help="uniform scale")
    _trial_args(g, cal=None)
    g.add_argument("--out", default="", help="output dir (default: RUN/grids)")
    g.set_defaults(fn=cmd_grids)

    c = sub.add_parser(
        "cascade", help="calibrated multi-precision cascade: tau on calibration, cost account"
    )
    c.add_argument("--study", default="", help="a `sqjax qat` study directory")
    c.add_argument("--workdir", default="", help="an FP32 run, quantized after training")
    c.add_argument("--ptq", type=_bits_list, default=None, help="widths for --workdir")
    c.add_argument(
        "--stages",
        type=_stages,
        default=(2, 4, 8, 32),
        help="widths in cascade order, 32 = FP32 (default 2,4,8,32)",
    )
    c.add_argument(
        "--metric",
        default="eer",
        help="kept within --tolerance of FP32: eer, min_dcf@0.01, min_dcf@0.05, act_dcf@0.01, cllr",
    )
    c.add_argument(
        "--tolerance", type=_at_least(0.0, float), default=0.05, help="relative (default 0.05)"
    )
    c.add_argument(
        "--eta",
        type=_eta,
        default="eer",
        help="decision threshold: 'eer' (FP32's calibrated EER point) or a p_target like 0.01",
    )
    c.add_argument(
        "--cost", choices=("bitops", "macs", "bytes"), default="bitops", help="what tau minimises"
    )
    _trial_args(c)
    c.add_argument("--out", default="", help="output dir (default: STUDY_OR_RUN/cascade)")
    c.set_defaults(fn=cmd_cascade)

    st = sub.add_parser(
        "study", help="the whole study: FP32, QAT and PTQ at each width, analyses, cascade, report"
    )
    st.add_argument("--config", required=True, help="e.g. configs/study_demo.py")
    st.add_argument("--workdir", required=True, help="study directory (resumes what is there)")
    st.set_defaults(fn=cmd_study)

    rp = sub.add_parser("report", help="regenerate a study's report from its files")
    rp.add_argument("dir", help="a `sqjax study` directory")
    rp.set_defaults(fn=cmd_report)

    m = sub.add_parser("embed", help="embed every utterance of a data dir with a model file")
    m.add_argument("--model", required=True, help="model file written by `sqjax export`")
    m.add_argument("--data", required=True, help="Kaldi data dir or VoxCeleb tree")
    m.add_argument("--out", required=True, help="embeddings .npy (n_utts, dim)")
    m.set_defaults(fn=cmd_embed)

    v = sub.add_parser("verify", help="score claims with a cascade bundle (onnxruntime)")
    v.add_argument("--bundle", required=True, help="written by `sqjax export --cascade`")
    v.add_argument("--data", required=True, help="data dir of the enrollment and claim audio")
    v.add_argument("--enroll", required=True, help="lines 'speaker utt [utt ...]'")
    v.add_argument("--claims", required=True, help="trial list: claimed speaker, test utt, label")
    v.set_defaults(fn=cmd_verify)

    w = sub.add_parser("import-wespeaker", help="a pretrained WeSpeaker ResNet as a run directory")
    w.add_argument("checkpoint", help="WeSpeaker state dict: avg_model.pt, .safetensors or .npz")
    w.add_argument("--out", required=True, help="new run directory")
    w.add_argument("--model", default=None, help="expected preset, e.g. resnet34 (checked)")
    w.add_argument("--data", default="", help="test data dir, scored after the import")
    w.add_argument("--trials", default="", help="trial list in --data")
    w.set_defaults(fn=cmd_import_wespeaker)

    s = sub.add_parser("synth", help="generate the built-in synthetic speaker corpus")
    s.add_argument("--out", required=True)
    s.add_argument("--speakers", type=_at_least(2), default=100, help="training speakers")
    s.add_argument("--dev-speakers", type=_at_least(2), default=100, help="calibration speakers")
    s.add_argument("--test-speakers", type=_at_least(2), default=500)
    s.add_argument("--utts", type=_at_least(1), default=16, help="utterances per training speaker")
    s.add_argument(
        "--test-utts", type=_at_least(2), default=16, help="utterances per dev/test speaker"
    )
    s.add_argument("--trials", type=_at_least(2), default=120_000, help="trials per dev/test list")
    s.add_argument("--difficulty", type=_at_least(0.0, float), default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=_at_least(1), default=os.cpu_count() or 1)
    s.set_defaults(fn=cmd_synth)
    return p
