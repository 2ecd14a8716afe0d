"""Local and remote paths: work dirs, data lists, audio and checkpoints on ``gs://``,
``s3://`` (and whatever else ``etils.epath`` serves), ``file://`` URLs taken as local.

Local paths keep plain ``os`` calls (and ``atomic_write``'s rename); remote ones go
through ``epath`` (install its backend too: ``pip install gcsfs`` or ``s3fs``).

A ``file://`` URL is made a local path once, where it enters: the command line's
arguments (``cli.main``), a config's path settings (``config.normalise_paths``: in
``load_config``, ``runs.train_and_evaluate`` and a run's saved config), a run directory
given to ``runs`` or ``train.train``, and the public readers (``data.read_corpus``,
``read_trials``, ``load_audio``). Below them a path is a local one or an object store's URL.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Iterator

import soundfile as sf
from etils import epath


def local(path: str | os.PathLike) -> str:
    """``path`` as a string, a ``file://`` URL turned into its local path."""
    text = os.fspath(path)
    return text.removeprefix("file://") if text.startswith("file://") else text


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an object store (``gs://``, ``s3://``, ...), not a file."""
    return "://" in local(path)


def as_path(path: str | os.PathLike) -> epath.Path:
    """An ``epath.Path`` for a local path, a ``file://`` URL or a remote URL."""
    return epath.Path(local(path))


def local_dir(path: str | os.PathLike, what: str = "--workdir") -> pathlib.Path:
    """``path`` (a local path or ``file://`` URL) as a ``pathlib.Path``; a ValueError
    naming ``what`` for an object-store URL, in the commands that work on local run
    directories only (all but ``train`` and ``eval``)."""
    if is_remote(path):
        raise ValueError(
            f"{what}={os.fspath(path)}: this command works on local run directories only "
            f"(train and eval also take gs:// and s3:// ones); copy the run to a local folder"
        )
    return pathlib.Path(local(path))


def join(base: str | os.PathLike, name: str) -> str:
    """``name`` relative to directory ``base``: absolute local paths and URLs are kept;
    local results are absolute (a later ``chdir`` cannot break them)."""
    base = local(base)
    if is_remote(name) or name.startswith("file://"):
        return local(name)
    if is_remote(base):
        return name if name.startswith("/") else f"{base.rstrip('/')}/{name}"
    return os.path.abspath(os.path.join(base, name))


# What object stores report of a version, most specific first (GCS, S3, Azure, others).
_VERSION_KEYS = ("generation", "ETag", "etag", "md5Hash", "LastModified", "last_modified")
_VERSION_KEYS += ("updated", "mtime", "created")


def version(path: str | os.PathLike) -> str:
    """What identifies the current content of a remote object without reading it: its
    size and the store's version (GCS generation, S3 ETag, or a modification time)."""
    import fsspec

    fs, name = fsspec.core.url_to_fs(local(path))
    info = fs.info(name)
    for key in _VERSION_KEYS:
        if info.get(key):
            return f"{info.get('size')}:{key}={info[key]}"
    raise OSError(
        f"the store reports no version or modification time of {local(path)} "
        f"(fields: {sorted(info)}); set config.data.feature_cache='' to read it uncached"
    )


@contextlib.contextmanager
def sound_file(path: str | os.PathLike) -> Iterator[sf.SoundFile]:
    """An open ``soundfile.SoundFile`` of a local or remote audio file (libsndfile's
    errors pass through: ``RuntimeError`` for what is not audio)."""
    if is_remote(path):
        with as_path(path).open("rb") as raw, sf.SoundFile(raw) as f:
            yield f
    else:
        with sf.SoundFile(local(path)) as f:
            yield f
