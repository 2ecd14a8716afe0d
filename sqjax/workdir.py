"""A run directory: ``config.json``, orbax checkpoints, the resume policy, and the
package's one atomic-write helper. A run directory may be local or remote (``gs://``,
``s3://``; ``file://`` URLs are local), see ``sqjax.fileio``.

Restoring takes its template and sharding from the caller, so this module imports
nothing of sqjax above it. JAX and orbax are imported where used: the corpus generator's
worker processes write files through ``atomic_write`` and should not load them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import ml_collections

from sqjax import fileio


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[IO[bytes]], Any]) -> None:
    """Writes ``data`` (bytes, text, or a function of a binary file) to ``path`` through a
    temporary file in the same directory and ``os.replace``: readers never see half a file,
    and an interrupted write leaves the old file (or none). On an object store the object
    is uploaded whole (an upload is atomic there)."""
    if fileio.is_remote(path):
        buf = io.BytesIO()
        if callable(data):
            data(buf)
        else:
            buf.write(data.encode() if isinstance(data, str) else data)
        fileio.as_path(path).parent.mkdir(parents=True, exist_ok=True)
        fileio.as_path(path).write_bytes(buf.getvalue())
        return
    path = fileio.local(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".sqjax-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True))


def append_line(path: str | os.PathLike, line: str) -> None:
    """Appends ``line`` and a newline to a (small) log file; an object store cannot append,
    so there the object is rewritten whole."""
    if fileio.is_remote(path):
        p = fileio.as_path(path)
        atomic_write(path, (p.read_text() if p.exists() else "") + line + "\n")
        return
    with open(fileio.local(path), "a", encoding="utf-8") as f:
        f.write(line + "\n")


def load_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config a run in ``workdir`` was started with; settings added to sqjax after it
    started are there at their defaults (how the run ran)."""
    from sqjax.config import default_config

    path = fileio.as_path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a sqjax run directory?")
    return ml_collections.ConfigDict(
        _merged(default_config().to_dict(), json.loads(path.read_text()))
    )


def _merged(default: dict, saved: dict) -> dict:
    out = dict(default)
    for k, v in saved.items():
        out[k] = _merged(default[k], v) if isinstance(default.get(k), dict) else v
    return out


def checkpoint_manager(workdir: str | os.PathLike, keep: int):
    """Orbax checkpoints in ``workdir/checkpoints``, the last ``keep`` kept, saved synchronously."""
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False
    )
    if fileio.is_remote(workdir):
        folder = fileio.as_path(workdir) / "checkpoints"
    else:
        folder = Path(os.path.abspath(fileio.local(workdir))) / "checkpoints"
    return ocp.CheckpointManager(folder, options=options)


def restore(mngr, step: int, target: Any, sharding) -> Any:
    """Checkpoint ``step`` of an orbax ``CheckpointManager``, shaped like the pytree
    ``target`` and placed with ``sharding``."""
    import jax
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), target
    )
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_latest(
    workdir: str | os.PathLike, target: Any, sharding, step: int | None = None
) -> Any:
    """The checkpoint at ``step`` (latest by default) of ``workdir``, shaped like ``target``."""
    with checkpoint_manager(workdir, keep=1_000_000) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(
                f"no checkpoint in {fileio.as_path(workdir) / 'checkpoints'}: train the run first"
            )
        return restore(mngr, step, target, sharding)


def truncate_log(path: str | os.PathLike, step: int) -> None:
    """Drops JSONL rows past ``step``: a resumed run redoes those steps and logs them again."""
    path = fileio.as_path(path)
    if path.exists():
        rows = [r for r in path.read_text().splitlines() if json.loads(r)["step"] <= step]
        atomic_write(path, "".join(r + "\n" for r in rows))


# Settings that do not change the trained parameters: a run may resume with others.
RESUME_FREE = frozenset(
    {
        "progress",
        "num_devices",
        "distributed",
        "data.workers",
        "data.feature_cache",
        "data.synth_args.workers",
        "train.log_every",
        "train.checkpoint_every",
        "train.keep_checkpoints",
    }
)


def _flat(d: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def check_resumable(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> None:
    """A run resumes exactly only under the config it started with: refuse any other
    (settings in ``RESUME_FREE``, ``eval.*`` and ``study.*`` excepted)."""
    free = lambda k: k in RESUME_FREE or k.startswith(("eval.", "study."))
    # A setting added after the run started is at its default (``load_run_config``).
    old = {k: v for k, v in _flat(json.loads(load_run_config(workdir).to_json())) if not free(k)}
    new = {k: v for k, v in _flat(json.loads(config.to_json())) if not free(k)}
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        raise ValueError(
            f"{workdir} holds checkpoints of a run with another config (changed: "
            f"{', '.join(changed)}); use a new --workdir, or the run's own settings to resume"
        )
