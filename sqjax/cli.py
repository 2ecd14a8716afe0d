"""The ``sqjax`` command: synth, train, qat, ptq, export, eval, analyze, layers, grids,
cascade, study, report, embed, verify, import-wespeaker.

sqjax train --config configs/demo.py --workdir runs/demo [--config.train.num_steps=100]
sqjax qat   --config configs/qat_demo.py --workdir runs/demo_qat
sqjax ptq   --workdir runs/demo --bits 8,4,2
sqjax export --workdir runs/demo_qat/2bit
sqjax export --workdir runs/demo_qat/2bit --format onnx   # or --model FILE.npz; [--with-frontend]
sqjax export --cascade --study runs/qat_demo --stages 2,4,32 --out bundle/
sqjax verify --bundle bundle/ --data DIR --enroll LIST --claims FILE
sqjax eval  --workdir runs/r34 --data /data/vox1 --trials /data/vox1/veri_test2.txt
sqjax eval  --model runs/demo_qat/2bit/encoder_2bit.npz --data DIR --trials FILE
sqjax analyze --study runs/qat_demo          # or --workdir runs/demo --ptq 8,4,3,2,1
sqjax layers --workdir runs/demo --bits 2     # or --study runs/qat_demo
sqjax cascade --study runs/qat_demo --stages 2,4,8,32
sqjax study --config configs/study_demo.py --workdir runs/study_demo
sqjax report runs/study_demo
sqjax embed --model runs/demo_qat/2bit/encoder_2bit.npz --data DIR --out emb.npy
sqjax synth --out data/synth --speakers 100
sqjax import-wespeaker avg_model.pt --model resnet34 --out runs/ws_r34 [--data DIR --trials FILE]

Expected errors (bad data, trials, run dirs, config values, a run directory in use, no
readable checkpoint, a full or read-only disk) print one line,
``sqjax <command>: error: <message>``, and exit with status 2; ``--debug`` shows the
traceback. Any other exception is a bug and shows its traceback.

Commands that write a directory hold its lock (``sqjax.workdir.lock``) while they run:
train, qat, study (the run or study directory), ptq and export (the run directory; export
to an ``--out`` file elsewhere takes none), analyze, layers, grids and cascade (their
output directory), import-wespeaker and synth (``--out``), report (``DIR/report``). eval
and embed only read (their outputs are whole files, written atomically).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import sys
from pathlib import Path

# Errors a user can fix (bad data, trial list, run directory, config value): one line.
# DataError and ConfigError are ValueErrors.
EXPECTED_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)
# OSErrors of the machine, not of sqjax: the disk is full or the directory not writable.
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "free some space, or write elsewhere",
    errno.EDQUOT: "free some space, or write elsewhere",
    errno.EROFS: "write elsewhere (a read-only file system)",
    errno.EACCES: "make it writable, or write elsewhere",
    errno.EPERM: "make it writable, or write elsewhere",
}


def _writing(path, args) -> contextlib.AbstractContextManager:
    """The lock of the directory ``path`` this command writes, held by process 0 alone in
    a multi-host run (``sqjax.workdir.lock``); call after ``_init_distributed``."""
    import jax

    from sqjax import workdir as workdir_lib

    if jax.process_index() != 0:
        return contextlib.nullcontext()
    return workdir_lib.lock(path, command=" ".join(["sqjax", *args.argv]))


def _set_cpu_devices(n: int) -> None:
    # Must happen before jax initialises its backends. On CPU, N simulated devices run N
    # data-parallel shards, each on its own core: small convs use one core each otherwise.
    flags = os.environ.get("XLA_FLAGS", "")
    if n > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


# XLA:CPU maps each program's buffers afresh on every call (hundreds of MB at the demo's
# batch 32), and glibc's malloc backs them with 4 KiB pages, each faulted in on first touch:
# some 220k page faults per demo training step. With transparent huge pages in "madvise"
# mode, glibc >= 2.35 asks for 2 MiB pages when told to (GLIBC_TUNABLES, read only when a
# process starts), so with SQJAX_HUGEPAGES=1 the command re-runs itself once with it. README
# "Speed on a CPU": the demo's training ran 1.26x faster; a step right after seconds of idle
# can run slower (up to 2x on a VM with a memory balloon). Opt-in: a command that replaces
# its own process (os.execve) surprises debuggers, profilers and wrappers.
_HUGEPAGES = "glibc.malloc.hugetlb=1"
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _hugepage_env(
    environ: dict, thp_mode: str | None = None, libc: str | None = None
) -> dict | None:
    """The environment to run a command with huge pages in, or None: not asked for
    (``SQJAX_HUGEPAGES=1``), already set up (``glibc.malloc.hugetlb`` in ``GLIBC_TUNABLES``,
    also what stops a second re-run), not glibc 2.35 or later (``libc``, as
    ``os.confstr("CS_GNU_LIBC_VERSION")``), or THP not in madvise mode (``thp_mode``, the
    kernel's ``transparent_hugepage/enabled``: in "always" mode large buffers get them
    anyway, in "never" not at all). ``thp_mode`` and ``libc`` default to this machine's."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables or environ.get("SQJAX_HUGEPAGES") != "1":
        return None
    try:
        libc = (os.confstr("CS_GNU_LIBC_VERSION") or "") if libc is None else libc
        thp_mode = _THP_MODE.read_text() if thp_mode is None else thp_mode
    except (ValueError, OSError):  # not Linux, or no THP
        return None
    name, _, version = libc.partition(" ")
    try:
        glibc = name == "glibc" and tuple(map(int, version.split(".")[:2])) >= (2, 35)
    except ValueError:
        glibc = False
    if not glibc or "[madvise]" not in thp_mode:
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{_HUGEPAGES}".lstrip(":")}


def _rerun_with_hugepages() -> None:
    """Replace this process by the same command in ``_hugepage_env``, where it applies
    (only with ``SQJAX_HUGEPAGES=1``; otherwise a no-op)."""
    env = _hugepage_env(dict(os.environ))
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def _print_metrics(result: dict, title: str) -> None:
    print(f"\n{title}")
    for key in ("eer", "min_dcf@0.01", "min_dcf@0.05"):
        line = f"  {key:<14} {result[key]:8.4f}"
        if f"baseline/{key}" in result:
            line += f"   (raw-feature baseline {result[f'baseline/{key}']:.4f})"
        print(line)
    if "baseline/eer" in result:
        print(f"  EER / baseline EER = {result['eer'] / result['baseline/eer']:.3f}")


def _init_distributed(config) -> None:
    if config.distributed:  # once per process, before any computation
        import jax

        # CPU processes exchange gradients through gloo (GPUs and TPUs ignore this).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize()


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


def cmd_train(args, overrides) -> None:
    from sqjax import config as config_lib
    from sqjax import runs

    config = config_lib.load_config(args.config, overrides)
    _init_distributed(config)
    with _writing(args.workdir, args):
        result = runs.train_and_evaluate(config, args.workdir)
    _print_metrics(result, f"test metrics ({args.workdir})")


def cmd_qat(args, overrides) -> None:
    from sqjax import config as config_lib
    from sqjax.experiments import qat_study

    config = config_lib.load_config(args.config, overrides)
    _init_distributed(config)
    with _writing(args.workdir, args):
        _print_table(qat_study.quantization_study(config, args.workdir))


def _print_table(rows: dict) -> None:
    from sqjax.tables import format_table

    cells = [("precision", "EER", "minDCF@0.01", "minDCF@0.05")]
    for name, r in rows.items():
        cells.append((name, *(f"{r[k]:.4f}" for k in ("eer", "min_dcf@0.01", "min_dcf@0.05"))))
    print("\n" + format_table(cells))


def cmd_ptq(args, overrides) -> None:
    from sqjax import runs

    with _writing(args.workdir, args):
        _print_table(runs.ptq_workdir(args.workdir, args.bits, bn_utts=args.bn_utts))


def cmd_export(args, overrides) -> None:
    from sqjax import runs

    if args.cascade or args.format == "onnx" or args.model or args.with_frontend:
        return _export_deploy(args)
    if not args.workdir:
        raise ValueError("give --workdir RUN (--model FILE.npz goes with --format onnx)")
    with _writing(args.workdir, args) if not args.out else contextlib.nullcontext():
        path, report = runs.export_workdir(args.workdir, args.out, args.bits)
    print(report.format())
    print(f"\nwrote {path} ({path.stat().st_size:,} bytes)")


def _export_deploy(args) -> None:
    from sqjax.deploy import commands

    if args.with_frontend and (args.cascade or args.format != "onnx"):
        raise ValueError(
            "--with-frontend goes with --format onnx (a bundle's stages take features; "
            "its runtime computes them)"
        )
    if args.cascade:
        if not args.out:
            raise ValueError("--cascade needs --out BUNDLE_DIR")
        m = commands.export_cascade(
            args.out, args.stages, study=args.study, workdir=args.workdir, packing=args.packing
        )
        for s in m["stages"]:
            tau = "decides all" if s["tau"] is None else f"tau {s['tau']:.4f}"
            print(f"  {s['name']:>6}  {s['file']:<22} {s['bytes']:>10,} B  a {s['a']:+.4f} "
                  f"b {s['b']:+.4f}  {tau}")  # fmt: skip
        print(f"\nwrote cascade bundle {args.out} (eta {m['eta']:+.4f}; manifest.json)")
        return
    if args.format != "onnx":
        raise ValueError("--model FILE.npz is already a model file: add --format onnx")
    path = commands.export_onnx(
        workdir=args.workdir, model=args.model, out=args.out, bits=args.bits,
        packing=args.packing, frontend=args.with_frontend,
    )  # fmt: skip
    start = "the waveform" if args.with_frontend else "features"
    print(f"wrote {path} ({path.stat().st_size:,} bytes, ONNX from {start}, "
          f"{args.packing} indices)")  # fmt: skip


def cmd_verify(args, overrides) -> None:
    from sqjax.deploy import commands

    r = commands.verify_claims(args.bundle, args.data, args.enroll, args.claims)
    for speaker, utt, accept, llr, stage in zip(
        *(r["claims"][k] for k in ("speaker", "utt")), r["accept"], r["llr"], r["stage"]
    ):
        print(f"{speaker} {utt} {'accept' if accept else 'reject'} {llr:+.4f} {r['stages'][stage]}")
    print("\nclaims decided per stage: " + ", ".join(
        f"{n} {c}" for n, c in zip(r["stages"], r["per_stage"])))  # fmt: skip
    if "metrics" in r:
        _print_metrics(r["metrics"], f"metrics of the cascade's LLRs ({args.claims})")
        print(f"  {'error rate':<14} {r['metrics']['error_rate']:8.4f}   (decisions at eta)")


def cmd_eval(args, overrides) -> None:
    from sqjax import runs

    if args.model:
        if args.workdir or not (args.data and args.trials) or overrides:
            raise ValueError("--model takes --data and --trials, and no --workdir or --config.*")
        if args.model.endswith(".onnx"):
            from sqjax.deploy import commands

            result = commands.evaluate_onnx_file(args.model, args.data, args.trials)
            _print_metrics(result, f"metrics ({args.model}, onnxruntime, {args.trials})")
            return
        result = runs.evaluate_model_file(args.model, args.data, args.trials)
        _print_metrics(result, f"metrics ({args.model}, {args.trials})")
        return
    if not args.workdir:
        raise ValueError("give --workdir RUN (a training run) or --model FILE (sqjax export)")
    result = runs.evaluate_workdir(
        args.workdir, data=args.data, trials=args.trials, step=args.step, overrides=overrides
    )
    trials = args.trials or "config test trials"
    _print_metrics(result, f"metrics ({args.workdir} at step {result['step']}, {trials})")


def cmd_embed(args, overrides) -> None:
    import numpy as np

    from sqjax import runs
    from sqjax.workdir import atomic_write

    if args.model.endswith(".onnx"):
        from sqjax.deploy import commands

        split, emb = commands.embed_onnx_file(args.model, args.data)
    else:
        split, emb = runs.embed_model_file(args.model, args.data)
    out = Path(args.out)
    atomic_write(out, lambda f: np.save(f, emb))
    utts = out.with_suffix(".utts.txt")
    atomic_write(utts, "".join(u + "\n" for u in split.corpus.utts))
    print(f"wrote {out} ({emb.shape[0]} x {emb.shape[1]} float32) and {utts} (row order)")


def _precisions(args, default_bits):
    """``(config, {name: variables})`` of ``--study DIR`` or ``--workdir RUN --ptq BITS``."""
    from sqjax.experiments import precisions

    if bool(args.study) == bool(args.workdir):
        raise ValueError("give --study DIR (a `sqjax qat` study) or --workdir FP32_RUN --ptq BITS")
    if args.study:
        if args.ptq:
            raise ValueError("--ptq goes with --workdir (an FP32 run), not with --study")
        return precisions.study_precisions(args.study)
    return precisions.ptq_precisions(args.workdir, args.ptq or default_bits)


def cmd_analyze(args, overrides) -> None:
    from sqjax.experiments import analyze

    config, variables = _precisions(args, (8, 4, 3, 2, 1))
    out = Path(args.out or Path(args.study or args.workdir) / "analysis")
    with _writing(out, args):
        result = analyze.analyze(
            config,
            variables,
            out,
            **_trials(args),
            threshold=args.threshold,
        )
    print("\n" + analyze.format_analysis(result))
    print(f"\nwrote {out}/scores.npz, score_analysis.json, figures/")


def cmd_layers(args, overrides) -> None:
    from sqjax.experiments import layers

    if bool(args.study) == bool(args.workdir):
        raise ValueError("give --study DIR (a `sqjax qat` study) or --workdir FP32_RUN")
    if args.study:
        if args.per_channel:
            raise ValueError("--per-channel goes with --workdir: QAT runs keep their codebooks")
        config, jobs = layers.study_layer_jobs(args.study, args.bits)
    else:
        pc = ("--config.quant.per_channel=True",) if args.per_channel else ()
        config, jobs = layers.ptq_layer_jobs(args.workdir, args.bits or (2,), args.protect, pc)
    out = Path(args.out or Path(args.study or args.workdir) / "layers")
    with _writing(out, args):
        result = layers.analyze_layers(
            config,
            jobs,
            out,
            **_trials(args),
            tolerance=args.tolerance,
            threshold=args.threshold,
            speakers=args.speakers,
        )
    print(layers.format_layers(result, top=args.top))
    print(f"\nwrote {out}/layers.csv, layer_analysis.json, figures/")


def cmd_grids(args, overrides) -> None:
    from sqjax import config as config_lib
    from sqjax.experiments import grids

    if args.qat_config and not args.qat_bits:
        raise ValueError("--qat-config sets the QAT runs of --qat-bits: give --qat-bits too")

    qat_config = config_lib.load_config(args.qat_config, overrides) if args.qat_config else None
    out = Path(args.out or Path(args.workdir) / "grids")
    with _writing(out, args):
        result = grids.compare_grids(
            args.workdir,
            args.bits,
            args.out or None,
            qat_studies=args.qat,
            qat_bits=args.qat_bits,
            qat_config=qat_config,
            symmetric=args.symmetric,
            scale=args.scale,
            **_trials(args, cal=False),
        )
    print(grids.format_grids(result))
    print(f"\nwrote {out}/grids.csv, grids.json, figures/grids.png")


def cmd_cascade(args, overrides) -> None:
    from sqjax.experiments import cascade

    config, variables = _precisions(args, tuple(b for b in args.stages if b != 32))
    eta = args.eta
    out = Path(args.out or Path(args.study or args.workdir) / "cascade")
    with _writing(out, args):
        result = cascade.run_cascade(
            config,
            variables,
            args.stages,
            out,
            **_trials(args),
            metric=args.metric,
            tolerance=args.tolerance,
            eta=eta,
            cost=args.cost,
        )
    print(cascade.format_cascade(result))
    print(f"\nwrote {out}/cascade.json, cascade_curve.csv, figures/")


def cmd_study(args, overrides) -> None:
    from sqjax import config as config_lib
    from sqjax.experiments import report, study

    config = config_lib.load_config(args.config, overrides)
    _init_distributed(config)
    with _writing(args.workdir, args):
        summary = study.run_study(config, args.workdir)
    print("\n" + report.format_study(summary))
    print(f"\nreport: {Path(args.workdir) / 'report' / 'index.html'} (and report.md)")


def cmd_report(args, overrides) -> None:
    from sqjax.experiments import report

    with _writing(Path(args.dir) / "report", args):
        summary = report.write_report(args.dir)
    print(report.format_study(summary))
    print(f"\nwrote {Path(args.dir) / 'report'}/index.html, report.md, report.json")


def cmd_import_wespeaker(args, overrides) -> None:
    from sqjax import runs, wespeaker

    if bool(args.data) != bool(args.trials):
        raise ValueError("give both --data and --trials (the run's test set), or neither")
    with _writing(args.out, args):
        config = wespeaker.import_wespeaker(
            args.checkpoint, args.out, model=args.model, data=args.data, trials=args.trials
        )
    m = config.model
    print(
        f"wrote {args.out}: {m.name} {tuple(m.stage_sizes)} x{m.width}, {m.n_mels} Kaldi fbank "
        f"bins, {m.embed_dim}-dim embedding"
    )
    if args.data:
        _print_metrics(runs.evaluate_workdir(args.out), f"test metrics ({args.out})")


def cmd_synth(args, overrides) -> None:
    from sqjax import synth

    with _writing(args.out, args):
        root = synth.generate_corpus(
            args.out,
            n_train_speakers=args.speakers,
            n_dev_speakers=args.dev_speakers,
            n_test_speakers=args.test_speakers,
            utts_per_speaker=args.utts,
            test_utts_per_speaker=args.test_utts,
            n_trials=args.trials,
            difficulty=args.difficulty,
            seed=args.seed,
            workers=args.workers,
        )
    print(f"corpus in {root}: train/, dev/, test/ (Kaldi data dirs with trials)")


def _trial_args(p: argparse.ArgumentParser, cal: str | None = "the calibration trials") -> None:
    """--data/--trials, and --cal-data/--cal-trials unless ``cal`` is None."""
    p.add_argument("--data", default="", help="data dir of other test trials")
    p.add_argument("--trials", default="", help="trial list in --data")
    if cal is not None:
        p.add_argument("--cal-data", default="", help=f"data dir of {cal}")
        p.add_argument("--cal-trials", default="", help="trial list in --cal-data")


def _trials(args, cal: bool = True) -> dict:
    """The test (and calibration) trial options as keyword arguments of the analyses."""
    out = {"data": args.data, "trials": args.trials}
    if cal:
        out.update(cal_data=args.cal_data, cal_trials=args.cal_trials)
    return out


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
        "README, Speed on a CPU); no effect on GPUs and TPUs",
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


def main(argv: list[str] | None = None) -> None:
    if argv is None:  # a command of its own (not called from Python): huge pages if asked
        _rerun_with_hugepages()
    args, rest = build_parser().parse_known_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # recorded in the lock file
    bad = [a for a in rest if not a.startswith("--config.")]
    if rest and args.command not in ("train", "qat", "eval", "study"):
        bad = rest  # these commands take no config
    if bad:
        build_parser().error(f"unrecognised arguments: {' '.join(bad)}")
    _set_cpu_devices(args.cpu_devices)
    from sqjax import fileio

    for name, value in vars(args).items():  # paths are made local once, here (file:// URLs)
        if isinstance(value, str):
            setattr(args, name, fileio.local(value))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from sqjax.cpu import native

    native.stable_cache_keys()  # the persistent cache serves programs holding our kernels
    for noisy in ("absl", "jax", "orbax"):  # orbax logs every checkpoint's options at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from sqjax import workdir as workdir_lib

    try:
        with workdir_lib.strict_restore(args.strict_restore):
            args.fn(args, rest)
    except (*EXPECTED_ERRORS, workdir_lib.WorkdirError) as e:
        if args.debug:
            raise
        _fail(args, _one_line(str(e)))
    except OSError as e:
        if args.debug or e.errno not in ENVIRONMENT_ERRNOS:
            raise
        where = f": {e.filename}" if e.filename else ""
        _fail(args, f"{e.strerror or os.strerror(e.errno)}{where} ({ENVIRONMENT_ERRNOS[e.errno]})")


def _one_line(message: str) -> str:
    lines = message.strip().splitlines() or [""]
    return lines[0] + (" (--debug shows the rest)" if len(lines) > 1 else "")


def _fail(args, message: str) -> None:
    print(f"sqjax {args.command}: error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    sys.exit(main())
