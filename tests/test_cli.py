"""The sqjax command end to end on the tiny config: train, then eval on a trial list."""

import io
import json
from pathlib import Path

import pytest

from sqjax import cli
from sqjax.data import DataError

from .conftest import CONFIGS


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "qat", "eval", "synth"):
        assert command in out


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
    assert "eer" in out and "raw-feature baseline" in out
    metrics = json.loads((workdir / "metrics_test.json").read_text())
    assert 0 <= metrics["eer"] <= 1 and metrics["step"] == 2


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
        cli.main(args)


def test_ptq_and_export_of_an_fp32_run(trained, capsys):
    import numpy as np

    from sqjax.export import load_packed

    workdir, _, _ = trained
    cli.main(["ptq", "--workdir", str(workdir), "--bits", "8,1"])
    out = capsys.readouterr().out
    assert "fp32" in out and "8bit" in out and "1bit" in out
    rows = json.loads((workdir / "ptq.json").read_text())
    assert set(rows) == {"fp32", "8bit", "1bit"}

    with pytest.raises(ValueError, match="give --bits"):
        cli.main(["export", "--workdir", str(workdir)])
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
