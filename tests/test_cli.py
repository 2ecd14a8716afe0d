"""The sqjax command end to end on the tiny config: train, then eval on a trial list."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from sqjax import cli, evaluate, prepare, runs
from sqjax.data import DataError

from .conftest import CONFIGS


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "qat", "eval", "synth"):
        assert command in out


ON = {"SQJAX_HUGEPAGES": "1"}


@pytest.mark.parametrize(
    "environ, thp, libc, tunables",
    [
        (ON, "always [madvise] never", "glibc 2.36", "glibc.malloc.hugetlb=1"),
        ({**ON, "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "always [madvise] never",
         "glibc 2.35", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
        (ON, "always [madvise] never", "glibc 2.34", None),  # no hugetlb tunable before 2.35
        (ON, "always [madvise] never", "", None),  # not glibc (musl, macOS)
        (ON, "[always] madvise never", "glibc 2.36", None),  # THP for every large buffer anyway
        (ON, "always madvise [never]", "glibc 2.36", None),
        ({}, "always [madvise] never", "glibc 2.36", None),  # opt-in: off by default
        ({"SQJAX_HUGEPAGES": "0"}, "always [madvise] never", "glibc 2.36", None),
        ({**ON, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "always [madvise] never",
         "glibc 2.36", None),  # the user's own choice, and what stops a second re-run
    ],
)  # fmt: skip
def test_hugepage_environment(environ, thp, libc, tunables):
    env = cli._hugepage_env({"PATH": "/bin", **environ}, thp, libc)
    if tunables is None:
        assert env is None
    else:
        assert env == {"PATH": "/bin", **environ, "GLIBC_TUNABLES": tunables}


@pytest.mark.parametrize("opt_in", [True, False])
def test_command_reruns_itself_with_huge_pages_only_when_asked(opt_in, tmp_path):
    # With SQJAX_HUGEPAGES=1 a command of its own re-runs once with the tunable where the
    # kernel and libc allow it, and keeps its arguments and its exit status; without it,
    # it never re-executes (the environment it runs in is the one it was given).
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "SQJAX_HUGEPAGES")}
    env.update(ON if opt_in else {})
    expected = cli._hugepage_env(env)  # this machine's kernel and libc
    assert opt_in or expected is None
    rerun = "import os; from sqjax import cli; cli._rerun_with_hugepages(); "
    probe = rerun + "print(os.environ.get('GLIBC_TUNABLES'))"
    kwargs = {"env": env, "capture_output": True, "text": True}
    run = subprocess.run([sys.executable, "-c", probe], check=False, **kwargs)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(expected and expected["GLIBC_TUNABLES"])
    command = "from sqjax import cli; cli.main()"
    missing = tmp_path / "missing"
    run = subprocess.run(
        [sys.executable, "-c", command, "report", str(missing)], check=False, **kwargs
    )
    assert run.returncode == 2 and str(missing) in run.stderr, run.stderr


@pytest.mark.parametrize("argv", [None, ["--help"], ["train", "--bogus"], ["eval", "--step", "x"]])
def test_the_command_line_answers_without_importing_jax(argv):
    """``import sqjax.cli``, ``sqjax --help`` and argument errors import no JAX (nor the
    modules that do): ``sqjax`` is lazy and each command imports its modules when it runs,
    so they answer in a fraction of a second."""
    code = [
        "import sys",
        "import sqjax.cli",
        f"argv = {argv!r}",
        "try:",
        "    argv is None or sqjax.cli.main(argv)",
        "except SystemExit:",
        "    pass",
        "heavy = [m for m in ('jax', 'flax', 'numpy', 'sqjax.models') if m in sys.modules]",
        "print('imported:', heavy, file=sys.stderr)",
    ]
    run = subprocess.run(
        [sys.executable, "-c", "\n".join(code)], capture_output=True, text=True, check=False
    )
    assert run.stderr.splitlines()[-1] == "imported: []", run.stderr


def test_unknown_argument_is_an_error(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--config", "x.py", "--workdir", "w", "--bogus"])
    assert "--bogus" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tiny_config, tmp_path_factory):
    """A tiny FP32 run trained by the command line: (workdir, synth_dir, printed output)."""
    workdir = tmp_path_factory.mktemp("run")
    synth_dir = tiny_config.data.synth_dir
    overrides = [
        f"--config.data.synth_dir={synth_dir}",
        "--config.progress=False",
        "--config.data.synth_args.workers=1",
        "--config.train.num_steps=2",
    ]
    with pytest.MonkeyPatch.context() as mp:
        out = io.StringIO()
        mp.setattr("sys.stdout", out)
        cli.main(
            ["train", "--config", str(CONFIGS / "tiny.py"), "--workdir", str(workdir), *overrides]
        )
    return workdir, synth_dir, out.getvalue()


def test_train_prints_and_writes_metrics(trained):
    workdir, _, out = trained
    metrics = json.loads((workdir / "metrics_test.json").read_text())
    assert metrics["step"] == 2
    # The printed figures are those of the file, and the baseline's.
    assert f"{metrics['eer']:8.4f}" in out and f"{metrics['baseline/eer']:.4f}" in out


def test_eval_on_a_trial_list(trained, tmp_path):
    workdir, synth_dir, _ = trained
    # Score a Kaldi-format trial list that holds half of the test trials.
    lines = Path(synth_dir, "test", "trials").read_text().splitlines()
    trials = tmp_path / "half.txt"
    trials.write_text("\n".join(lines[::2]) + "\n")
    args = [
        "eval",
        "--workdir",
        str(workdir),
        "--data",
        f"{synth_dir}/test",
        "--trials",
        str(trials),
    ]
    cli.main(args)
    half = json.loads((workdir / "metrics_half.json").read_text())
    assert half["n_target"] + half["n_nontarget"] == len(lines[::2])

    trials.write_text(lines[0] + "\nnot-an-utt spk00000-0000 target\n")
    with pytest.raises(DataError, match=r"half.txt:2"):
        cli.main(["--debug", *args])


def test_ptq_and_export_of_an_fp32_run(trained, capsys):
    import numpy as np

    from sqjax.export import load_packed

    workdir, _, _ = trained
    cli.main(["ptq", "--workdir", str(workdir), "--bits", "8,1"])
    out = capsys.readouterr().out
    assert "fp32" in out and "8bit" in out and "1bit" in out
    rows = json.loads((workdir / "ptq.json").read_text())
    assert set(rows) == {"fp32", "8bit", "1bit", "8bit+bn", "1bit+bn"}

    with pytest.raises(ValueError, match="give --bits"):
        cli.main(["--debug", "export", "--workdir", str(workdir)])
    cli.main(["export", "--workdir", str(workdir), "--bits", "2"])
    params = load_packed(workdir / "encoder_2bit.npz")
    kernels = [np.asarray(leaf["kernel"]) for leaf in _modules(params)]
    assert kernels and all(len(np.unique(k)) <= 4 for k in kernels)
    assert "wrote" in capsys.readouterr().out


def _modules(tree):
    """Every dict in a nested dict that holds a "kernel"."""
    if isinstance(tree, dict):
        if "kernel" in tree:
            yield tree
        for v in tree.values():
            yield from _modules(v)


def _run_cli(capsys, *args) -> tuple[int, str]:
    """Exit status and stderr of ``sqjax ARGS``."""
    with pytest.raises(SystemExit) as e:
        cli.main(list(args))
    return e.value.code, capsys.readouterr().err


def test_expected_errors_print_one_line(trained, tmp_path, capsys):
    code, err = _run_cli(capsys, "eval", "--workdir", str(tmp_path / "nope"))
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("sqjax eval: error: ") and "config.json not found" in err
    code, err = _run_cli(capsys, "eval", "--workdir", f"file://{tmp_path}/nope")  # made local
    assert code == 2 and f"is {tmp_path}/nope a sqjax run" in err and "file:" not in err
    config = str(CONFIGS / "tiny.py")
    code, err = _run_cli(
        capsys,
        "train",
        "--config",
        config,
        "--workdir",
        str(tmp_path),
        "--config.train.num_stepz=3",
    )
    assert code == 2 and err.count("\n") == 1 and "num_stepz" in err and "Traceback" not in err
    code, err = _run_cli(capsys, "train", "--config", str(tmp_path / "x.py"), "--workdir", "w")
    assert code == 2 and err.startswith("sqjax train: error: config file") and "x.py" in err
    workdir, synth_dir, _ = trained
    bad = tmp_path / "bad_trials"
    bad.write_text("a b c d\n")
    args = ["eval", "--workdir", str(workdir), "--data", f"{synth_dir}/test", "--trials", str(bad)]
    code, err = _run_cli(capsys, *args)
    assert code == 2 and err.count("\n") == 1 and "bad_trials:1" in err
    with pytest.raises(DataError):  # --debug: the exception itself, with its traceback
        cli.main(["--debug", *args])


def test_exported_model_file_runs_alone(trained, tmp_path, capsys):
    import numpy as np

    workdir, synth_dir, _ = trained
    model = tmp_path / "enc2.npz"
    cli.main(["export", "--workdir", str(workdir), "--bits", "2", "--out", str(model)])
    capsys.readouterr()
    # Scoring with the file alone equals post-training quantization of the run.
    rows = runs.ptq_workdir(workdir, (2,), bn_utts=0)
    trials = f"{synth_dir}/test/trials"
    cli.main(["eval", "--model", str(model), "--data", f"{synth_dir}/test", "--trials", trials])
    assert f"{rows['2bit']['eer']:8.4f}" in capsys.readouterr().out

    out = tmp_path / "emb.npy"
    cli.main(["embed", "--model", str(model), "--data", f"{synth_dir}/test", "--out", str(out)])
    emb = np.load(out)
    utts = (tmp_path / "emb.utts.txt").read_text().split()
    config, state, _ = runs.restore_run(workdir)
    q = runs.train.build_quantizer(config, 2)
    variables = evaluate.encoder_variables(state.replace(qstate=q.init(state.params["encoder"])), q)
    split = prepare.load_split(
        f"{synth_dir}/test",
        None,
        sample_rate=16000,
        n_mels=80,
        cache_dir=None,
        min_seconds=0.0,
        workers=1,
        progress=False,
    )
    assert utts == list(split.corpus.utts)
    ref = evaluate.extract_embeddings(
        evaluate.jitted_embed(runs.train.build_encoder(config)),
        variables,
        split.feats,
        batch_size=config.eval.batch_size,
        max_frames=config.eval.max_frames,
    )
    np.testing.assert_allclose(emb, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="--model takes --data and --trials"):
        cli.main(["--debug", "eval", "--model", str(model), "--data", f"{synth_dir}/test"])


def test_analyze_ptq_of_a_run(trained, capsys):
    import numpy as np

    workdir, _, _ = trained
    runs.ptq_workdir(workdir, (2,), bn_utts=0)  # single-precision scores to compare with
    cli.main(["analyze", "--workdir", str(workdir), "--ptq", "8,2"])
    out = capsys.readouterr().out
    assert "harmful" in out and "knee of eer" in out
    z = np.load(workdir / "analysis" / "scores.npz")
    assert list(z["precisions"]) == ["fp32", "8bit", "2bit"]
    # One batched pass over all precisions gives each run's own scores.
    np.testing.assert_allclose(
        z["scores"][0], np.load(workdir / "scores_fp32.npz")["scores"], atol=1e-5
    )
    np.testing.assert_allclose(
        z["scores"][2], np.load(workdir / "scores_ptq2.npz")["scores"], atol=1e-5
    )
    result = json.loads((workdir / "analysis" / "score_analysis.json").read_text())
    # Flips at the FP32 theta, counted here from the saved scores.
    theta, y = result["theta"]["value"], z["labels"]
    acc32, acc2 = z["scores"][0] >= theta, z["scores"][2] >= theta
    harmful = int(np.sum((acc32 != acc2) & (acc32 == y)))
    assert result["per_precision"]["2bit"]["flips"]["harmful"] == harmful
    assert result["calibration"] is not None and np.isfinite(z["llrs"]).all()
    for name in ("degradation", "drift", "flips", "det", "reliability"):
        assert (workdir / "analysis" / "figures" / f"{name}.png").stat().st_size > 5000


@pytest.fixture(scope="module")
def layers_1bit(trained):
    """``sqjax layers --bits 1 --protect 8 --top 3`` of the run, once: (out dir, printed)."""
    workdir = trained[0]
    with pytest.MonkeyPatch.context() as mp:
        out = io.StringIO()
        mp.setattr("sys.stdout", out)
        argv = ["layers", "--workdir", str(workdir), "--bits", "1", "--protect", "8", "--top", "3"]
        cli.main(argv)
    return workdir / "layers", out.getvalue()


def test_layers_of_a_run(layers_1bit):
    import csv

    folder, out = layers_1bit
    assert "1bit: reference EER" in out and "Spearman" in out and "mixed precision" in out
    result = json.loads((folder / "layer_analysis.json").read_text())
    a = result["widths"]["1bit"]
    with open(folder / "layers.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [r["path"] for r in a["layers"]]
    # The printed table shows the most sensitive layers, in the ranking's order.
    shown = [p.removesuffix("/kernel") for p in a["ranking"][:3]]
    assert all(p in out for p in shown)
    assert (
        sorted(a["ranking"], key=lambda p: -float(next(r["drift"] for r in rows if r["path"] == p)))
        == a["ranking"]
    )


def test_layers_per_channel_codebooks_distort_less(trained, layers_1bit, capsys):
    workdir, synth_dir, _ = trained
    out = workdir / "layers_pc"
    # --protect 4: the 1-bit layers compared below do not depend on it, and per-channel
    # 8-bit codebooks (256 centroids per output channel) took 25 s of the test to fit.
    argv = ["layers", "--workdir", str(workdir), "--bits", "1", "--protect", "4"]
    cli.main([*argv, "--per-channel", "--out", str(out), "--speakers", "3"])
    result = json.loads((out / "layer_analysis.json").read_text())
    per_channel = result["widths"]["1bit"]
    # --speakers 3: the trials whose two sides are among the first 3 test speakers by name
    spk = dict(line.split() for line in Path(synth_dir, "test", "utt2spk").read_text().splitlines())
    first = set(sorted(set(spk.values()))[:3])
    trials = [line.split() for line in Path(synth_dir, "test", "trials").read_text().splitlines()]
    kept = [t for t in trials if spk[t[0]] in first and spk[t[1]] in first]
    assert 0 < len(kept) < len(trials)
    assert (result["trials"]["speakers"], result["trials"]["n_trials"]) == (3, len(kept))
    per_tensor = json.loads((layers_1bit[0] / "layer_analysis.json").read_text())
    pt = {r["path"]: r["rel_err"] for r in per_tensor["widths"]["1bit"]["layers"]}
    # More codebooks, each fitted to fewer weights: never more squared error per tensor.
    for r in per_channel["layers"]:
        assert r["rel_err"] <= pt[r["path"]] + 1e-9, r["path"]
    assert sum(r["rel_err"] for r in per_channel["layers"]) < sum(pt.values())
    capsys.readouterr()


def test_layers_errors(trained, capsys):
    workdir, _, _ = trained
    with pytest.raises(SystemExit) as e:
        cli.main(["layers"])
    assert e.value.code == 2
    assert "give --study DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["layers", "--study", str(workdir), "--bits", "2"])
    assert "no <b>bit run directories" in capsys.readouterr().err


def test_cascade_of_a_run(trained, tmp_path, capsys):
    workdir, _, _ = trained
    cli.main(["cascade", "--workdir", str(workdir), "--stages", "2,32", "--tolerance", "0.5"])
    out = capsys.readouterr().out
    assert "2bit alone" in out and "fp32 alone" in out and "storage of all stage models" in out
    result = json.loads((workdir / "cascade" / "cascade.json").read_text())
    assert result["stages"] == ["2bit", "fp32"]
    assert result["chosen"] is not None, "a 50% tolerance keeps some tau"
    assert result["deployment"]["same_decisions"]
    with pytest.raises(SystemExit):
        cli.main(["cascade", "--workdir", str(workdir), "--stages", "4,2"])
    assert "--stages" in capsys.readouterr().err

    # `sqjax export --cascade`: the bundle of those stages, its manifest from cascade.json.
    pytest.importorskip("onnxruntime")
    from sqjax.deploy import runtime

    bundle = tmp_path / "bundle"
    argv = ["export", "--cascade", "--workdir", str(workdir), "--stages", "2,32"]
    cli.main([*argv, "--out", str(bundle)])
    out = capsys.readouterr().out
    assert f"wrote cascade bundle {bundle}" in out
    m = json.loads((bundle / "manifest.json").read_text())
    assert [s["name"] for s in m["stages"]] == ["2bit", "fp32"]
    assert m["eta"] == result["eta"]["value"]
    assert [s["tau"] for s in m["stages"]] == [result["chosen"]["taus"][0], None]
    for p, s in enumerate(m["stages"]):
        assert (s["a"], s["b"]) == (result["calibration"]["a"][p], result["calibration"]["b"][p])
        assert (bundle / s["file"]).stat().st_size == s["bytes"]
        assert f"{s['file']:<22} {s['bytes']:>10,} B" in out
    assert m["stages"][0]["bytes"] < m["stages"][1]["bytes"] / 4  # 2-bit indices packed
    assert runtime.Verifier(bundle).stages == ["2bit", "fp32"]
    with pytest.raises(SystemExit):
        cli.main([*argv[:-1], "2,4,32", "--out", str(tmp_path / "b2")])
    assert "rerun `sqjax cascade` with --stages 2,4,32" in capsys.readouterr().err


def test_grids_compares_kmeans_and_uniform_by_hand(trained, tmp_path, capsys):
    """`sqjax grids`: one row per method, granularity and width; the uniform per-tensor
    2-bit row checked against a quantizer built by hand, scored alone, its distortion by
    NumPy and its size counted by hand; K-means never distorts more than the grid."""
    import numpy as np

    from sqjax import metrics, quant, uniform_quantizer

    workdir, _, _ = trained
    cli.main(["grids", "--workdir", str(workdir), "--bits", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "uniform per channel" in out and "K-means lower is" in out
    result = json.loads((tmp_path / "grids.json").read_text())
    # The paired difference is the rows' difference; its verdict follows its interval.
    comps = {(c["mode"], c["per_channel"], c["bits"]): c for c in result["comparisons"]}
    for pc in (False, True):
        c = comps["ptq", pc, 2]
        by = {(r["method"], r["per_channel"]): r["eer"] for r in result["rows"] if r["bits"] == 2}
        assert c["uniform_minus_kmeans_eer"] == pytest.approx(by["uniform", pc] - by["kmeans", pc])
        lo, hi = c["uniform_minus_kmeans_eer_ci"]
        assert lo <= hi
        want = "supported" if lo > 0 else "contradicted" if hi < 0 else "undetermined"
        assert c["verdict"] == want
    assert (tmp_path / "figures" / "grids.png").stat().st_size > 10_000
    assert len((tmp_path / "grids.csv").read_text().splitlines()) == 1 + 4
    rows = {(r["method"], r["per_channel"], r["bits"]): r for r in result["rows"]}
    assert len(rows) == 4
    for pc in (False, True):
        assert rows["kmeans", pc, 2]["distortion"] <= rows["uniform", pc, 2]["distortion"]

    config, state, _ = runs.restore_run(workdir)
    assert tuple(config.quant.keep_float) == ()
    params = state.params["encoder"]
    q = uniform_quantizer((quant.Rule("kernel$", 2),), scale="mse")
    qparams = q.apply(params, q.init(params))
    split = prepare.test_data(config)
    scores = runs.score_variables(
        config, {"params": qparams, "batch_stats": state.batch_stats}, split
    )
    row = rows["uniform", False, 2]
    assert row["eer"] == pytest.approx(metrics.eer(scores, split.trials.labels)[0], abs=1e-9)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    kernels = [(np.asarray(w, np.float64), np.asarray(v, np.float64))
               for (kp, w), v in zip(flat, jax.tree.leaves(qparams))
               if quant.path_str(kp).endswith("kernel")]  # fmt: skip
    err = sum(np.sum((w - v) ** 2) for w, v in kernels) / sum(np.sum(w**2) for w, _ in kernels)
    assert row["distortion"] == pytest.approx(err, rel=1e-9)
    bits = sum(w.size * 2 + 32 + 8 for w, _ in kernels)  # indices, scale, zero point
    bits += 32 * sum(np.size(w) for kp, w in flat if not quant.path_str(kp).endswith("kernel"))
    assert row["bytes"] == round(bits / 8)
