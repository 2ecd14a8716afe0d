"""What each ``sqjax`` command does once its arguments are parsed: ``cmd_<name>(args,
overrides)`` loads what it needs (imported here, when it runs, so that ``--help`` and argument
errors never import JAX), takes the lock of the directory it writes, and prints its result.
``overrides`` are the ``--config.<key>=<value>`` arguments of the commands that take a config.
"""

from __future__ import annotations

import contextlib
from pathlib import Path


def _writing(path, args) -> contextlib.AbstractContextManager:
    """The lock of the directory ``path`` this command writes, held by process 0 alone in
    a multi-host run (``sqjax.workdir.lock``); call after ``_init_distributed``."""
    import jax

    from sqjax import workdir as workdir_lib

    if jax.process_index() != 0:
        return contextlib.nullcontext()
    return workdir_lib.lock(path, command=" ".join(["sqjax", *args.argv]))


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


def _trials(args, cal: bool = True) -> dict:
    """The test (and calibration) trial options as keyword arguments of the analyses."""
    out = {"data": args.data, "trials": args.trials}
    if cal:
        out.update(cal_data=args.cal_data, cal_trials=args.cal_trials)
    return out
