"""The one atomic-write helper: whole files, and the permissions a plain open() gives."""

import os

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
