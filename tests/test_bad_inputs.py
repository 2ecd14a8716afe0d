"""Bad inputs through every subcommand: each one exits with status 2 and one line that
names what is wrong, and leaves the run directory as it was (or still resumable).

One table (``CASES``), run in-process on one tiny trained run (``tiny_run``): a case is
``(id, setup, argv, expected)``, where ``setup(ctx)`` writes the files the case needs
and returns the arguments' ``{placeholders}``, and ``expected`` is a fragment of the line.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from sqjax import cli

from .conftest import CONFIGS

TINY = str(CONFIGS / "tiny.py")


class Ctx:
    def __init__(self, run: Path, synth: Path, tmp: Path, monkeypatch):
        self.run, self.synth, self.tmp, self.monkeypatch = run, synth, tmp, monkeypatch
        self.cleanups = []

    def mount(self, target: Path, *options: str) -> bool:
        """``mount -o OPTIONS`` (root only), undone after the case; False where refused."""
        if os.geteuid() != 0 or shutil.which("mount") is None:
            return False
        run = subprocess.run(["mount", *options, str(target)], check=False, capture_output=True)
        if run.returncode == 0:
            self.cleanups.append(lambda: subprocess.run(["umount", str(target)], check=True))
        return run.returncode == 0

    def data_dir(self, waves=None, *, utt2spk=True, scp_lines=None, trials=None) -> Path:
        """A Kaldi data dir of 4 utterances (2 speakers) of the test split, or of
        ``waves`` {utt: (samples, rate, subtype)} written as WAV files."""
        d = self.tmp / "data"
        d.mkdir()
        test = self.synth / "test"
        lines = (test / "wav.scp").read_text().splitlines()
        spk = dict(line.split() for line in (test / "utt2spk").read_text().splitlines())
        utts = [line.split()[0] for line in lines]
        pick = [u for u in utts if spk[u] == spk[utts[0]]][:2]
        pick += [u for u in utts if spk[u] != spk[utts[0]]][:2]
        scp = {line.split()[0]: line.split()[1] for line in lines}
        if waves:
            for (u, (x, sr, subtype)), name in zip(waves.items(), pick, strict=False):
                path = d / f"{name}.wav"
                sf.write(path, x, sr, subtype=subtype)
                scp[name] = str(path)
                del u
        scp_text = scp_lines or [f"{u} {scp[u]}" for u in pick]
        (d / "wav.scp").write_text("\n".join(scp_text) + "\n")
        if utt2spk:
            (d / "utt2spk").write_text("".join(f"{u} {spk[u]}\n" for u in pick))
        (d / "trials").write_text(
            trials or f"{pick[0]} {pick[1]} target\n{pick[0]} {pick[2]} nontarget\n"
        )
        return d


def _plain(ctx):
    return {}


def _data(**kw):
    def setup(ctx):
        d = ctx.data_dir(**kw)
        return {"data": d, "trials": d / "trials"}

    return setup


def _wave(samples, sr=16000, subtype="PCM_16"):
    """A data dir whose first utterance is ``samples`` at ``sr``."""
    return _data(waves={"x": (samples, sr, subtype)})


def _dup_ids(ctx):
    d = ctx.data_dir()
    lines = (d / "wav.scp").read_text().splitlines()
    (d / "wav.scp").write_text("\n".join([*lines, lines[0]]) + "\n")
    return {"data": d, "trials": d / "trials"}


def _unknown_trial(ctx):
    d = ctx.data_dir()
    first = (d / "trials").read_text().splitlines()[0].split()[0]
    (d / "trials").write_text(f"{first} not-an-utt target\n")
    return {"data": d, "trials": d / "trials"}


def _not_a_model(ctx):
    path = ctx.tmp / "weights.npz"
    np.savez(path, w=np.zeros(3))
    return {"model": path}


def _not_a_npz(ctx):
    path = ctx.tmp / "model.npz"
    path.write_text("not a zip file\n")
    return {"model": path}


def _text_checkpoint(ctx):
    path = ctx.tmp / "avg_model.pt"
    path.write_text("not a checkpoint\n")
    return {"ckpt": path, "out": ctx.tmp / "imported"}


def _read_only_run(ctx):
    """A copy of the run on a read-only bind mount (root), else with no write permission."""
    ro = ctx.tmp / "ro"
    shutil.copytree(ctx.run, ro)
    if not ctx.mount(ro, "--bind", "-o", "ro", str(ro)):
        if os.geteuid() == 0:
            pytest.skip("root ignores permissions and mount is refused here")
        for p in [ro, *ro.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
        ctx.cleanups.append(lambda: [p.chmod(0o755) for p in [ro, *ro.rglob("*")]])
    return {"ro": ro}


def _full_disk(ctx):
    """An --out folder on a full 256 KiB tmpfs (root), else writes there fail with ENOSPC."""
    full = ctx.tmp / "full"
    full.mkdir()
    if ctx.mount(full, "-t", "tmpfs", "-o", "size=256k", "tmpfs"):
        with open(full / "filler", "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    else:

        def fsync(fd):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        ctx.monkeypatch.setattr("sqjax.workdir.os.fsync", fsync)
    return {"full": full}


CASES = [
    # synth: counts and sizes
    ("synth-0-speakers", _plain, "synth --out {tmp}/c --speakers 0", "--speakers"),
    ("synth-neg-speakers", _plain, "synth --out {tmp}/c --speakers -3", "--speakers"),
    ("synth-0-utts", _plain, "synth --out {tmp}/c --utts 0", "--utts"),
    ("synth-1-test-speaker", _plain, "synth --out {tmp}/c --test-speakers 1", "--test-speakers"),
    ("synth-0-workers", _plain, "synth --out {tmp}/c --workers 0", "--workers"),
    ("synth-1-trial", _plain, "synth --out {tmp}/c --trials 1", "--trials"),
    ("synth-1-test-utt", _plain, "synth --out {tmp}/c --test-utts 1", "--test-utts"),
    ("synth-neg-difficulty", _plain, "synth --out {tmp}/c --difficulty -1", "--difficulty"),
    # train: config values
    ("train-0-steps", _plain, ("train --config {tiny} --workdir {tmp}/w {syn} "
     "--config.train.num_steps=0"), "config.train.num_steps=0"),
    ("train-0-batch", _plain, ("train --config {tiny} --workdir {tmp}/w {syn} "
     "--config.train.batch_size=0"), "config.train.batch_size=0"),
    ("train-neg-frames", _plain, ("train --config {tiny} --workdir {tmp}/w {syn} "
     "--config.train.n_frames=-5"), "config.train.n_frames=-5"),
    ("train-bits-9", _plain, ("train --config {tiny} --workdir {tmp}/w {syn} "
     "--config.quant.bits=9"), "config.quant.bits=9"),
    ("train-wrong-type", _plain, ("train --config {tiny} --workdir {tmp}/w "
     "--config.train.num_steps=many"), "train.num_steps is int, got str"),
    ("train-unknown-key", _plain, ("train --config {tiny} --workdir {tmp}/w "
     "--config.train.num_stepz=3"), "no key 'train.num_stepz'"),
    ("train-unknown-preset", _plain, ("train --config {tiny} --workdir {tmp}/w {syn} "
     "--config.model.name=resnet999"), "unknown encoder preset 'resnet999'"),
    ("train-no-config-file", _plain, "train --config {tmp}/nope.py --workdir {tmp}/w",
     "nope.py not found"),
    ("train-0-train-speakers", _plain, ("train --config {tiny} --workdir {tmp}/w "
     "--config.data.synth_dir={tmp}/s0 --config.data.synth_args.n_train_speakers=0"),
     "n_train_speakers"),
    ("qat-bits-list-0", _plain, ("qat --config {tiny} --workdir {tmp}/q {syn} "
     "--config.quant.bits_list=(2,0)"), "config.quant.bits_list"),
    # ptq, export
    ("ptq-bits-0", _plain, "ptq --workdir {run} --bits 0", "bit widths must be in 1..8"),
    ("ptq-bits-not-int", _plain, "ptq --workdir {run} --bits 2,x", "comma-separated ints"),
    ("ptq-neg-bn-utts", _plain, "ptq --workdir {run} --bn-utts -1", "--bn-utts"),
    ("ptq-not-a-run", _plain, "ptq --workdir {tmp}", "config.json not found"),
    ("export-bits-9", _plain, "export --workdir {run} --bits 9", "--bits"),
    # eval, embed: data dirs, trial lists, audio, model files
    ("eval-step-missing", _plain, "eval --workdir {run} --step 99", "no checkpoint step 99"),
    ("eval-unknown-trial-id", _unknown_trial, ("eval --workdir {run} --data {data} "
     "--trials {trials}"), "not-an-utt"),
    ("eval-dup-wav-scp", _dup_ids, "eval --workdir {run} --data {data} --trials {trials}",
     "wav.scp:5"),
    ("eval-no-utt2spk", _data(utt2spk=False), ("eval --workdir {run} --data {data} "
     "--trials {trials}"), "utt2spk"),
    ("eval-0-samples", _wave(np.zeros(0, np.float32)), ("eval --workdir {run} --data {data} "
     "--trials {trials}"), "0 samples"),
    ("eval-nan-samples", _wave(np.full(16000, np.nan, np.float32), subtype="FLOAT"),
     "eval --workdir {run} --data {data} --trials {trials}", "NaN"),
    ("eval-8-khz", _wave(np.zeros(8000, np.float32), sr=8000), ("eval --workdir {run} "
     "--data {data} --trials {trials}"), "8000 Hz audio, below data.sample_rate=16000"),
    ("eval-3-channels", _wave(np.zeros((16000, 3), np.float32)), ("eval --workdir {run} "
     "--data {data} --trials {trials}"), "3 channels"),
    ("eval-too-short", _wave(np.zeros(800, np.float32)), ("eval --workdir {run} "
     "--data {data} --trials {trials}"), "shorter than min_seconds"),
    ("eval-not-a-model", _not_a_model, ("eval --model {model} --data {synth}/test "
     "--trials {synth}/test/trials"), "not a sqjax model file"),
    ("eval-model-not-npz", _not_a_npz, ("eval --model {model} --data {synth}/test "
     "--trials {synth}/test/trials"), "not a sqjax model file"),
    ("embed-not-a-model", _not_a_model, ("embed --model {model} --data {synth}/test "
     "--out {tmp}/e.npy"), "not a sqjax model file"),
    # the analyses
    ("analyze-ptq-9", _plain, "analyze --workdir {run} --ptq 9", "bit widths must be in 1..8"),
    ("analyze-not-a-study", _plain, "analyze --study {tmp}", "no <b>bit run directories"),
    ("layers-neg-tolerance", _plain, "layers --workdir {run} --tolerance -1", "--tolerance"),
    ("grids-bits-0", _plain, "grids --workdir {run} --bits 0", "bit widths must be in 1..8"),
    ("cascade-out-of-order", _plain, "cascade --workdir {run} --stages 8,4,2,32",
     "increasing widths"),
    ("cascade-stages-not-int", _plain, "cascade --workdir {run} --stages 2,x",
     "comma-separated ints"),
    ("cascade-bad-eta", _plain, "cascade --workdir {run} --eta often", "--eta"),
    ("cascade-neg-tolerance", _plain, "cascade --workdir {run} --tolerance -0.5",
     "--tolerance"),
    ("study-cascade-out-of-order", _plain, ("study --config {tiny} --workdir {tmp}/st {syn} "
     "--config.study.cascade_stages=(8,2,32)"), "config.study.cascade_stages"),
    ("report-not-a-study", _plain, "report {tmp}/nope", "nope"),
    ("import-not-a-checkpoint", _text_checkpoint, "import-wespeaker {ckpt} --out {out}",
     "avg_model.pt"),
    ("cpu-devices-0", _plain, "--cpu-devices 0 report {tmp}", "--cpu-devices"),
    # the machine: a read-only run directory, a full disk
    ("ptq-read-only-workdir", _read_only_run, "ptq --workdir {ro} --bits 2", ".sqjax.lock"),
    ("export-full-disk", _full_disk, "export --workdir {run} --bits 2 --out {full}/enc.npz",
     "No space left on device: "),
]  # fmt: skip


@pytest.fixture(scope="module")
def run(tiny_run):
    config, workdir = tiny_run
    return workdir, Path(config.data.synth_dir)


def _snapshot(path: Path) -> dict:
    return {
        str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def _main(capsys, argv) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main([str(a) for a in argv])
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_status_2(case, run, tmp_path, capsys, monkeypatch):
    workdir, synth = run
    ctx = Ctx(workdir, synth, tmp_path, monkeypatch)
    try:
        _check(ctx, capsys, *case[1:])
    finally:
        for undo in reversed(ctx.cleanups):
            undo()


def _check(ctx, capsys, setup, argv, expected):
    workdir, synth, tmp_path = ctx.run, ctx.synth, ctx.tmp
    fields = {
        "tmp": tmp_path,
        "run": workdir,
        "synth": synth,
        "tiny": TINY,
        "syn": f"--config.data.synth_dir={synth} --config.progress=False "
        "--config.data.synth_args.workers=1",
        **setup(ctx),
    }
    before = _snapshot(workdir)
    code, err = _main(capsys, argv.format(**fields).split())
    print(err, end="")  # the line, shown by pytest -rP
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("sqjax"), err
    assert expected in err, err
    assert _snapshot(workdir) == before  # the run directory untouched
    assert not list(tmp_path.rglob(".sqjax-*.tmp"))  # no half-written file left
