"""`sqjax study`: the whole study on the tiny config, its report, and resuming after a kill."""

import json
import os
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser

import pytest

from sqjax import cli, runs
from sqjax.experiments import analyze, cascade, grids, layers, qat_study, study

from .conftest import CONFIGS

STUDY_OVERRIDES = [
    "--config.quant.bits_list=(2,)",
    "--config.quant.num_steps=3",
    "--config.study.layer_bits=(2,)",
    "--config.study.protect_bits=(8,)",
    "--config.study.cascade_stages=(2,32)",
    "--config.study.ptq_bn_utts=16",
]


def _overrides(tiny_config):
    return [
        f"--config.data.synth_dir={tiny_config.data.synth_dir}",
        "--config.progress=False",
        "--config.data.synth_args.workers=1",
        "--config.data.workers=1",
        *STUDY_OVERRIDES,
    ]


@pytest.fixture(scope="module")
def tiny_study(tiny_config, tmp_path_factory):
    """The tiny study run once by the command line, uninterrupted: (workdir, output)."""
    workdir = tmp_path_factory.mktemp("study")
    with pytest.MonkeyPatch.context() as mp:
        import io

        out = io.StringIO()
        mp.setattr("sys.stdout", out)
        cli.main(
            [
                "study",
                "--config",
                str(CONFIGS / "tiny.py"),
                "--workdir",
                str(workdir),
                *_overrides(tiny_config),
            ]
        )
    return workdir, out.getvalue()


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.images, self.headings, self._h = [], [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        if tag in ("h1", "h2"):
            self._h = ""

    def handle_endtag(self, tag):
        if tag in ("h1", "h2") and self._h is not None:
            self.headings.append(self._h)
            self._h = None

    def handle_data(self, data):
        if self._h is not None:
            self._h += data


def test_study_writes_every_stage_and_a_self_contained_report(tiny_study):
    workdir, out = tiny_study
    for f in [
        "fp32/metrics_test.json",
        "2bit/metrics_test.json",
        "ptq/ptq.json",
        "analysis/qat/score_analysis.json",
        "analysis/ptq/score_analysis.json",
        "layers/ptq/layers.csv",
        "layers/qat/layer_analysis.json",
        "cascade/cascade.json",
        "report/report.md",
        "report/index.html",
    ]:
        assert (workdir / f).exists(), f
    summary = json.loads((workdir / "report" / "report.json").read_text())
    assert [(r["precision"], r["method"]) for r in summary["rows"]] == [
        ("fp32", "FP32"),
        ("2bit", "QAT"),
        ("2bit", "PTQ"),
    ]
    # The QAT row is the QAT run's own test metrics.
    qat = json.loads((workdir / "2bit" / "metrics_test.json").read_text())
    assert summary["rows"][1]["eer"] == pytest.approx(qat["eer"], abs=1e-6)
    assert {c["verdict"] for c in summary["claims"]} <= {
        "supported",
        "contradicted",
        "undetermined",
        "not measured",
    }
    # Every judged claim is printed with its verdict (on the tiny corpus often undetermined).
    assert summary["claims"]
    for c in summary["claims"]:
        assert f"{c['verdict']}: {c['claim']}" in out, c

    page = _Page()
    page.feed((workdir / "report" / "index.html").read_text())
    assert page.headings[:2] == [page.headings[0], "What the data show"]
    assert {"Setup", "Results per precision", "The calibrated cascade", "Figures"} <= set(
        page.headings
    )
    assert page.tags.count("table") >= 5
    # Every figure inlined (no file references), one per PNG the analyses wrote.
    assert page.images and all(src.startswith("data:image/png;base64,") for src in page.images)
    md = (workdir / "report" / "report.md").read_text()
    assert md.count("![") == len(page.images)
    for h in page.headings:
        assert h in md


def test_report_command_regenerates_the_same_report(tiny_study, capsys):
    workdir, _ = tiny_study
    before = (workdir / "report" / "report.md").read_text()
    (workdir / "report" / "report.md").unlink()
    cli.main(["report", str(workdir)])
    assert (workdir / "report" / "report.md").read_text() == before
    out = capsys.readouterr().out
    summary = json.loads((workdir / "report" / "report.json").read_text())
    assert all(f"{c['verdict']}: {c['claim']}" in out for c in summary["claims"])


def test_a_finished_study_runs_nothing_again(tiny_study, tiny_config, monkeypatch):
    workdir, _ = tiny_study

    def fail(*a, **k):
        raise AssertionError("a finished stage ran again")

    for name in ("train_and_evaluate", "ptq_workdir"):
        monkeypatch.setattr(runs, name, fail)
    monkeypatch.setattr(analyze, "analyze", fail)
    monkeypatch.setattr(layers, "analyze_layers", fail)
    monkeypatch.setattr(cascade, "run_cascade", fail)
    config = study_config(tiny_config)
    study.run_study(config, workdir)


def study_config(tiny_config):
    from sqjax.config import load_config

    return load_config(CONFIGS / "tiny.py", _overrides(tiny_config))


def test_killed_study_resumes_to_the_same_report(tiny_study, tiny_config, tmp_path):
    """SIGKILL the command once its QAT run has started, start it again, and compare the
    final report's numbers with the uninterrupted study's. It fine-tunes from that study's
    FP32 run (``init_from``), so only the stages after FP32 training are paid twice."""
    workdir = tmp_path / "study"
    cmd = [
        sys.executable,
        "-m",
        "sqjax.cli",
        "study",
        "--config",
        str(CONFIGS / "tiny.py"),
        "--workdir",
        str(workdir),
        *_overrides(tiny_config),
        f"--config.quant.init_from={tiny_study[0] / 'fp32'}",
    ]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = workdir / "2bit" / "config.json"  # the QAT run has started
    deadline = time.monotonic() + 300
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert killed, "the study ended before it could be killed"
    assert not (workdir / "2bit" / "metrics_test.json").exists()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    got = json.loads((workdir / "report" / "report.json").read_text())
    want = json.loads((tiny_study[0] / "report" / "report.json").read_text())
    assert got["rows"] == want["rows"]
    assert got["cascade"] == want["cascade"]
    assert [c["evidence"] for c in got["claims"]] == [c["evidence"] for c in want["claims"]]


def test_grids_takes_a_qat_study_as_rows(tiny_study, tmp_path):
    """`compare_grids` with a QAT study and no PTQ widths: one row per QAT run, its EER
    the one the run's own evaluation wrote (another code path: one model, not the
    all-precision pass), its packed size and distortion present."""
    workdir, _ = tiny_study
    result = grids.compare_grids(workdir / "fp32", (), tmp_path, qat_studies=[workdir])
    (row,) = result["rows"]
    assert (row["mode"], row["method"], row["per_channel"], row["bits"]) == (
        "qat",
        "kmeans",
        False,
        2,
    )
    own = json.loads((workdir / "2bit" / "metrics_test.json").read_text())
    assert row["eer"] == pytest.approx(own["eer"], abs=1e-9)
    assert 0 < row["distortion"] < 1 and 0 < row["bytes"] < result["fp32"]["bytes"]
    assert "QAT" in grids.format_grids(result)


def test_grids_qat_bits_runs_one_qat_study_per_method(tiny_study, tmp_path, monkeypatch):
    """--qat-bits: one `quantization_study` per method and granularity, from the FP32 run,
    at those widths, into OUT/qat/<method>_per_<tensor|channel>; their runs become rows.
    (The study itself is stubbed by a copy of the tiny study's 2-bit run.)"""
    import shutil

    workdir, _ = tiny_study
    calls = []

    def fake_study(config, out):
        calls.append((config.quant.method, config.quant.per_channel, out.name))
        assert config.quant.init_from == str(workdir / "fp32")
        assert tuple(config.quant.bits_list) == (2,) and config.quant.num_steps == 5
        shutil.copytree(workdir / "2bit", out / "2bit")

    monkeypatch.setattr(qat_study, "quantization_study", fake_study)
    qat_config = runs.restore_run(workdir / "fp32")[0]
    qat_config.quant.num_steps = 5
    result = grids.compare_grids(
        workdir / "fp32", (), tmp_path, qat_bits=(2,), qat_config=qat_config
    )
    assert calls == [
        ("kmeans", False, "kmeans_per_tensor"),
        ("kmeans", True, "kmeans_per_channel"),
        ("uniform", False, "uniform_per_tensor"),
        ("uniform", True, "uniform_per_channel"),
    ]
    assert len(result["rows"]) == 4 and {r["mode"] for r in result["rows"]} == {"qat"}
