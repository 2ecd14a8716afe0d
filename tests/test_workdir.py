"""The one atomic-write helper: whole files, and the permissions a plain open() gives."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from sqjax.workdir import atomic_write


def test_atomic_write_permissions_follow_the_umask(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic_write(tmp_path / "atomic.txt", "x")
    mode = lambda p: os.stat(p).st_mode & 0o777
    assert mode(tmp_path / "atomic.txt") == mode(plain)


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "f.bin"
    atomic_write(path, b"old")

    def boom(f):
        f.write(b"half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_write(path, boom)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_a_run_older_than_a_new_setting_resumes_at_its_default(tmp_path):
    """A config.json written before quant.method existed resumes under the default
    ("kmeans"), not under another value; any other change is still refused, by name."""
    import json

    from sqjax.config import default_config
    from sqjax.workdir import check_resumable

    old = default_config().to_dict()
    del old["quant"]["method"]
    (tmp_path / "config.json").write_text(json.dumps(old, default=list))
    check_resumable(tmp_path, default_config())
    other = default_config()
    other.quant.method = "uniform"
    with pytest.raises(ValueError, match=r"changed: quant\.method\)"):
        check_resumable(tmp_path, other)
    other = default_config()
    other.train.num_steps += 1
    with pytest.raises(ValueError, match=r"changed: train\.num_steps\)"):
        check_resumable(tmp_path, other)


# ------------------------------------------------------------------ damaged checkpoints


def _copy_run(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run, dst)
    return dst


def _overwrite_data_files(step_dir):
    """Zeroes every array chunk of a checkpoint (as after a bad copy), sizes unchanged."""
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files, f"no data files under {step_dir}: orbax's layout changed?"
    for p in files:
        p.write_bytes(b"\0" * p.stat().st_size)


def _remove_commit_marker(step_dir):
    # Orbax writes it into the temporary folder just before the rename that commits it.
    (step_dir / "commit_success.txt").unlink()


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_equal_trees(a, b):
    la, lb = _leaves(a), _leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("damage", [_overwrite_data_files, _remove_commit_marker])
def test_a_damaged_latest_checkpoint_falls_back_to_the_newest_readable(
    tiny_run, tmp_path, caplog, damage
):
    from sqjax import runs
    from sqjax.workdir import CheckpointError, strict_restore

    _, run = tiny_run
    _, step1, _ = runs.restore_run(run, step=1)
    _, step2, _ = runs.restore_run(run, step=2)
    assert not np.array_equal(*(_leaves(s.params)[0] for s in (step1, step2)))
    workdir = _copy_run(run, tmp_path)
    damage(workdir / "checkpoints" / "2")
    with caplog.at_level(logging.WARNING, logger="sqjax"):
        _, state, _ = runs.restore_run(workdir)
    assert int(state.step) == 1
    _assert_equal_trees(state, step1)  # the intact step 1, as the undamaged run holds it
    [line] = [r.getMessage() for r in caplog.records if r.name == "sqjax"]
    assert line.startswith(f"checkpoint step 2 of {workdir} cannot be read (")
    assert line.endswith("; using step 1, the newest readable one") and "\n" not in line
    with pytest.raises(CheckpointError, match=r"step 2 .* strict restore refuses"):
        runs.restore_run(workdir, strict=True)
    with strict_restore(), pytest.raises(CheckpointError, match="strict restore refuses"):
        runs.restore_run(workdir)
    with pytest.raises(CheckpointError, match=r"step 2 of .* cannot be read"):
        runs.restore_run(workdir, step=2)  # a step asked for is never replaced
    with pytest.raises(CheckpointError, match=r"no checkpoint step 7 .* \(steps: 1, 2\)"):
        runs.restore_run(workdir, step=7)
    # (All markers gone reads as a run by an orbax that wrote none: damage step 1's data.)
    _overwrite_data_files(workdir / "checkpoints" / "1")
    with pytest.raises(
        CheckpointError, match=r"no checkpoint of .* can be read \(step 2: .*step 1"
    ):
        runs.restore_run(workdir)
    assert not (workdir / "checkpoints-damaged").exists()  # readers move nothing


def test_training_resumes_from_the_newest_readable_checkpoint(tiny_run, tmp_path, caplog):
    from sqjax import runs

    config, run = tiny_run
    workdir = _copy_run(run, tmp_path)
    _overwrite_data_files(workdir / "checkpoints" / "2")
    with caplog.at_level(logging.WARNING, logger="sqjax"):
        runs.train_and_evaluate(config, workdir)
    assert any(f"moved to {workdir}/checkpoints-damaged/" in r.getMessage() for r in caplog.records)
    assert (workdir / "checkpoints-damaged" / "2" / "default").is_dir()  # kept, out of the way
    _, resumed, _ = runs.restore_run(workdir)
    _, full, _ = runs.restore_run(run)
    assert int(resumed.step) == 2
    _assert_equal_trees(resumed, full)  # step 2 trained again from step 1: bit-identical


# ------------------------------------------------------------------------ the lock

_HOLD = """import sys
from sqjax.workdir import lock
with lock(sys.argv[1], "sqjax train --workdir X"):
    print("held", flush=True)
    sys.stdin.read()
"""


def _holder(workdir):
    """A process (no JAX) holding ``workdir``'s lock until its stdin closes."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    p = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(workdir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert p.stdout.readline() == "held\n"
    return p


def test_a_second_writer_is_refused_and_a_killed_holders_lock_taken_over(tmp_path, caplog, capsys):
    from sqjax import cli
    from sqjax.workdir import LOCK_FILE, WorkdirInUse, lock

    holder = _holder(tmp_path)
    try:
        who = rf"pid {holder.pid} on {socket.gethostname()} \(`sqjax train --workdir X`, since "
        with pytest.raises(WorkdirInUse, match=rf"^{tmp_path} is in use by {who}"), lock(tmp_path):
            pass
        # The command: one line, status 2, before it reads or writes anything.
        with pytest.raises(SystemExit) as e:
            cli.main(["ptq", "--workdir", str(tmp_path)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert err.startswith(f"sqjax ptq: error: {tmp_path} is in use by pid {holder.pid} ")
        assert err.rstrip().endswith("wait for it to end (or stop it), or give another directory")
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]
    finally:
        holder.kill()  # SIGKILL: no clean-up of its own; the kernel drops the flock
        holder.wait()
    record = json.loads((tmp_path / LOCK_FILE).read_text())
    assert record["pid"] == holder.pid  # left behind by the killed holder
    with caplog.at_level(logging.WARNING, logger="sqjax"), lock(tmp_path, "mine"):
        mine = json.loads((tmp_path / LOCK_FILE).read_text())
        assert (mine["pid"], mine["host"], mine["command"]) == (
            os.getpid(),
            socket.gethostname(),
            "mine",
        )
        with lock(tmp_path):  # the same process again (a command calling train.train)
            pass
    [notice] = [r.getMessage() for r in caplog.records if r.name == "sqjax"]
    assert notice.startswith(f"taking over the lock of {tmp_path} from pid {holder.pid} on ")
    assert notice.endswith(": it has ended")
    assert (tmp_path / LOCK_FILE).read_text() == ""  # a clean end leaves no record
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sqjax"), lock(tmp_path):
        pass
    assert not caplog.records  # so the next holder gives no notice


def test_training_holds_the_lock_of_its_run(tiny_run, tmp_path, capsys):
    from sqjax import runs
    from sqjax.workdir import WorkdirInUse

    config, run = tiny_run
    workdir = _copy_run(run, tmp_path)
    holder = _holder(workdir)
    try:
        with pytest.raises(WorkdirInUse, match=f"pid {holder.pid}"):
            runs.train_and_evaluate(config, workdir)  # finished: would only restore and score
    finally:
        holder.stdin.close()
        holder.wait()
    assert not list((workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))


# -------------------------------------------------------------- kill -9 during a save

# Trains the tiny run of ``tiny_run`` and SIGKILLs itself in the middle of saving step 2:
# orbax has written every file into the step's temporary folder, not yet committed it.
_KILLED_IN_SAVE = """import os, signal, sys
from orbax.checkpoint._src.path import atomicity
commit = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self, *args, **kwargs):
    if self._final_path.name == "2":
        os.kill(os.getpid(), signal.SIGKILL)
    return await commit(self, *args, **kwargs)
atomicity.AtomicRenameTemporaryPath.finalize = finalize
from sqjax import runs
from sqjax.config import load_config
config = load_config(sys.argv[1], sys.argv[3:])
runs.train_and_evaluate(config, sys.argv[2])
"""


def test_killed_during_a_checkpoint_save_resumes_bit_identical(tiny_run, tmp_path, caplog):
    from sqjax import runs
    from sqjax.workdir import LOCK_FILE

    config, run = tiny_run
    workdir = tmp_path / "run"
    overrides = [
        f"--config.data.synth_dir={config.data.synth_dir}",
        "--config.progress=False",
        "--config.data.synth_args.workers=1",
        "--config.train.num_steps=2",
        "--config.train.checkpoint_every=1",
        "--config.eval.baseline=False",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    tiny = str(Path(__file__).parents[1] / "configs" / "tiny.py")
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_IN_SAVE, tiny, str(workdir), *overrides],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    ckpts = workdir / "checkpoints"
    [partial] = ckpts.glob("2.orbax-checkpoint-tmp*")  # the save it was killed in
    assert any(p.is_file() for p in partial.rglob("*")) and (ckpts / "1").is_dir()
    assert not (ckpts / "2").exists()
    with caplog.at_level(logging.WARNING, logger="sqjax"):
        runs.train_and_evaluate(config, workdir)  # the same run again: resumes from step 1
    assert any(  # the killed process's lock record
        r.getMessage().startswith(f"taking over the lock of {workdir} from pid ")
        for r in caplog.records
    )
    assert not list(ckpts.glob("*.orbax-checkpoint-tmp*"))  # the writer cleared it
    assert (workdir / LOCK_FILE).read_text() == ""
    _, resumed, _ = runs.restore_run(workdir)
    _, full, _ = runs.restore_run(run)
    assert int(resumed.step) == 2
    _assert_equal_trees(resumed, full)  # as the uninterrupted run: bit-identical
