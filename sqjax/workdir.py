"""A run directory: ``config.json``, orbax checkpoints, the resume policy, the writer's
lock, and the package's one atomic-write helper. A run directory may be local or remote
(``gs://``, ``s3://``), see ``sqjax.fileio``. Paths here are local paths or object-store
URLs: a ``file://`` URL is made a local path where it enters (the CLI's arguments,
``runs``, ``train.train``, ``config.normalise_paths``).

One writer at a time: commands that write a run directory hold its ``lock`` (a
``.sqjax.lock`` file there); readers take none, and see only whole files (``atomic_write``,
and orbax commits a checkpoint by renaming its folder). A checkpoint that cannot be read
is skipped for the newest readable one (``restore_newest``), unless restoring is strict.

Restoring takes its template and sharding from the caller, so this module imports
nothing of sqjax above it. JAX and orbax are imported where used: the corpus generator's
worker processes write files through ``atomic_write`` and should not load them.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import errno
import fcntl
import io
import json
import logging
import os
import re
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import ml_collections

from sqjax import fileio

log = logging.getLogger("sqjax")


class WorkdirError(RuntimeError):
    """A run directory the user must act on: in use by another command, or without a
    checkpoint that can be read."""


class WorkdirInUse(WorkdirError):
    """Another process holds the run directory's lock."""


class CheckpointError(WorkdirError):
    """No checkpoint of a run could be read (or, when strict, the one asked for)."""


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
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a write: name the file
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
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
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def load_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """The config a run in ``workdir`` was started with; settings added to sqjax after it
    started are there at their defaults (how the run ran)."""
    from sqjax.config import default_config, normalise_paths

    path = fileio.as_path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a sqjax run directory?")
    saved = _merged(default_config().to_dict(), json.loads(path.read_text()))
    return normalise_paths(ml_collections.ConfigDict(saved))


def _merged(default: dict, saved: dict) -> dict:
    out = dict(default)
    for k, v in saved.items():
        out[k] = _merged(default[k], v) if isinstance(default.get(k), dict) else v
    return out


def checkpoint_manager(workdir: str | os.PathLike, keep: int, *, read_only: bool = False):
    """Orbax checkpoints in ``workdir/checkpoints``, the last ``keep`` kept, saved
    synchronously. A writer's manager (the default; hold ``lock``) deletes the temporary
    folders of saves that never finished; a ``read_only`` one creates and deletes nothing,
    so it may look at a run that is being trained."""
    import orbax.checkpoint as ocp

    # Not orbax's read_only option: it logs a warning each time.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else keep,
        create=not read_only,
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=False,
    )
    return ocp.CheckpointManager(_checkpoint_dir(workdir), options=options)


def _checkpoint_dir(workdir: str | os.PathLike):
    if fileio.is_remote(workdir):
        return fileio.as_path(workdir) / "checkpoints"
    return Path(os.path.abspath(workdir)) / "checkpoints"


def restore(mngr, step: int, target: Any, sharding) -> Any:
    """Checkpoint ``step`` of an orbax ``CheckpointManager``, shaped like the pytree
    ``target`` and placed with ``sharding``."""
    import jax
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), target
    )
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


_STRICT = contextvars.ContextVar("sqjax_strict_restore", default=False)


@contextlib.contextmanager
def strict_restore(strict: bool = True) -> Iterator[None]:
    """Within it, restoring with ``strict=None`` (the default everywhere) refuses a
    damaged latest checkpoint instead of falling back (``sqjax --strict-restore``)."""
    token = _STRICT.set(strict)
    try:
        yield
    finally:
        _STRICT.reset(token)


# Written by orbax (0.11.2 and later) into a step's folder just before the rename that
# commits it; a folder without one is an incomplete copy (or a save cut short).
_COMMIT_FILE = "commit_success.txt"


def _reason(e: BaseException) -> str:
    """One line on why a checkpoint could not be read: orbax and TensorStore errors span
    dozens of lines (the store's whole spec); the innermost cause says what failed."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text.split(" See full TensorStore details")[0]
    text = re.sub(r' in OCDBT database at local file "[^"]*"', "", text)
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def restore_newest(
    mngr, target: Any, sharding, *, strict: bool | None = None, set_aside: bool = False
) -> tuple[int, Any]:
    """``(step, state)`` of the newest checkpoint of ``mngr`` that can be read.

    A step that cannot be read (a data file damaged, its commit marker missing) is
    skipped with one logged line naming it, why, and the step used instead; with
    ``strict`` (default: ``strict_restore``'s setting) it is a ``CheckpointError``
    instead. A training run resuming passes ``set_aside=True``: the skipped steps are
    moved to ``checkpoints-damaged/`` beside ``checkpoints/`` (process 0 moves them, all
    processes wait), so that the steps it trains again can be saved.
    """
    strict = _STRICT.get() if strict is None else strict
    steps = sorted(mngr.all_steps(), reverse=True)
    folder = Path(str(mngr.directory))
    if not steps:
        raise CheckpointError(f"no checkpoint in {folder}: train the run first")
    # A run written by an orbax that made no commit files has none in any step.
    marked = any((folder / str(s) / _COMMIT_FILE).exists() for s in steps)
    skipped = []
    for step in steps:
        error = None
        if marked and not (folder / str(step) / _COMMIT_FILE).exists():
            why = f"no {_COMMIT_FILE}: an incomplete save or copy"
        else:
            try:
                state = restore(mngr, step, target, sharding)
            except MemoryError:
                raise
            except Exception as e:  # noqa: BLE001 (orbax and TensorStore raise bare Exceptions)
                error, why = e, _reason(e)
            else:
                break
        if strict:
            older = ", ".join(map(str, steps[steps.index(step) + 1 :])) or "none"
            raise CheckpointError(
                f"checkpoint step {step} of {folder} cannot be read ({why}); strict restore "
                f"refuses to fall back (older steps: {older}): drop --strict-restore to use "
                "the newest readable one"
            ) from error
        skipped.append((step, why, error))
    else:
        whys = "; ".join(f"step {s}: {w}" for s, w, _ in skipped)
        raise CheckpointError(
            f"no checkpoint of {folder} can be read ({whys}); restore the folder from a "
            "copy, or move it aside to start the run afresh"
        ) from skipped[-1][2]
    if skipped:
        steps_txt = ", ".join(str(s) for s, _, _ in skipped)
        whys = "; ".join(w for _, w, _ in skipped)
        where = ""
        if set_aside:
            where = f", moved to {_set_aside(mngr, folder, [s for s, _, _ in skipped])}/"
        log.warning(
            "checkpoint step%s %s of %s cannot be read (%s)%s; using step %d, the newest "
            "readable one",
            "s" if len(skipped) > 1 else "",
            steps_txt,
            folder.parent,
            whys,
            where,
            step,
        )
    return step, state


def _set_aside(mngr, folder: Path, steps: list[int]) -> Path:
    import jax

    aside = folder.parent / "checkpoints-damaged"
    if jax.process_index() == 0:
        aside.mkdir(exist_ok=True)
        for s in steps:
            dest, n = aside / str(s), 1
            while dest.exists():  # an earlier damaged copy of the same step stays too
                dest, n = aside / f"{s}-{n}", n + 1
            os.replace(folder / str(s), dest)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("sqjax: damaged checkpoints set aside")
    mngr.reload()
    return aside


def restore_latest(
    workdir: str | os.PathLike,
    target: Any,
    sharding,
    step: int | None = None,
    *,
    strict: bool | None = None,
) -> Any:
    """The checkpoint at ``step`` of ``workdir``, shaped like ``target``; by default the
    newest one that can be read (``restore_newest``: an unreadable latest one is skipped
    with a logged line, or refused when ``strict``). A ``step`` asked for is restored or
    refused, never replaced by another."""
    with checkpoint_manager(workdir, keep=1_000_000, read_only=True) as mngr:
        if step is None:
            return restore_newest(mngr, target, sharding, strict=strict)[1]
        steps = mngr.all_steps()
        if step not in steps:
            raise CheckpointError(
                f"no checkpoint step {step} in {_checkpoint_dir(workdir)} (steps: "
                f"{', '.join(map(str, sorted(steps))) or 'none'})"
            )
        folder = Path(str(mngr.directory))
        marked = any((folder / str(s) / _COMMIT_FILE).exists() for s in steps)
        if marked and not (folder / str(step) / _COMMIT_FILE).exists():
            raise CheckpointError(
                f"checkpoint step {step} of {workdir} cannot be read (no {_COMMIT_FILE}: an "
                "incomplete save or copy); leave out the step for the newest readable one"
            )
        try:
            return restore(mngr, step, target, sharding)
        except MemoryError:
            raise
        except Exception as e:
            raise CheckpointError(
                f"checkpoint step {step} of {workdir} cannot be read ({_reason(e)}); leave "
                "out the step for the newest readable one"
            ) from e


LOCK_FILE = ".sqjax.lock"

# Locks this process holds: {lock file: [open file, depth]}. A command holding its run
# directory's lock calls library functions that take it again (train.train).
_HELD: dict[str, list] = {}


def _holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']} (`{h['command']}`, since {h['since']})"
    except (ValueError, KeyError, TypeError):
        return "another process (just starting: its record is not written yet)"


def _gone(text: str) -> bool:
    """Whether the holder recorded in ``text`` is a process of this host that has ended."""
    try:
        h = json.loads(text)
        if h["host"] != socket.gethostname():
            return False
        os.kill(int(h["pid"]), 0)
    except ProcessLookupError:
        return True
    except (ValueError, KeyError, TypeError, PermissionError):
        return False
    return False


@contextlib.contextmanager
def lock(workdir: str | os.PathLike, command: str | None = None) -> Iterator[None]:
    """Holds the writer's lock of ``workdir`` (created if need be): one command at a time.

    The lock is an ``fcntl.flock`` on ``workdir/.sqjax.lock``, which records the holder's
    pid, host, ``command`` (default: this process's arguments) and start time. The kernel
    releases it when the holder ends, however it ends; a record left by a holder that was
    killed is taken over with a logged notice. Another holder is a ``WorkdirInUse`` error
    naming it. The same process may take a lock it holds again (nested calls).

    Multi-host runs: only process 0 takes it (the run directory is shared storage, and
    every process writes through process 0's files or orbax's coordinated saves); callers
    skip it elsewhere. Directories on an object store (``gs://``) have no lock.
    """
    if fileio.is_remote(workdir):
        yield
        return
    folder = Path(os.path.abspath(workdir))
    folder.mkdir(parents=True, exist_ok=True)
    path = str((folder / LOCK_FILE).resolve())
    if path in _HELD:
        _HELD[path][1] += 1
        try:
            yield
        finally:
            _HELD[path][1] -= 1
        return
    # a+: the holder's record stays until the lock is ours; held past this function.
    f = open(path, "a+", encoding="utf-8")  # noqa: SIM115
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            f.seek(0)
            raise WorkdirInUse(
                f"{folder} is in use by {_holder(f.read())}: wait for it to end (or stop "
                "it), or give another directory"
            ) from None
        f.seek(0)
        old = f.read()
        if old.strip():
            state = "it has ended" if _gone(old) else "it no longer holds it"
            log.warning("taking over the lock of %s from %s: %s", folder, _holder(old), state)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command or " ".join(sys.argv),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        f.seek(0)
        f.truncate()
        f.write(json.dumps(record) + "\n")
        f.flush()
    except BaseException:
        f.close()
        raise
    _HELD[path] = [f, 1]
    try:
        yield
    finally:
        del _HELD[path]
        with contextlib.suppress(OSError):  # a full disk may refuse even this
            f.truncate(0)  # a clean end leaves no record: the next holder gives no notice
        f.close()  # releases the flock


def truncate_log(path: str | os.PathLike, step: int) -> None:
    """Drops JSONL rows past ``step``: a resumed run redoes those steps and logs them again."""
    path = fileio.as_path(path)
    if path.exists():
        lines = path.read_text().splitlines()
        if lines and not _is_json(lines[-1]):  # a last row cut short by a kill
            lines.pop()
        rows = [r for r in lines if json.loads(r)["step"] <= step]
        atomic_write(path, "".join(r + "\n" for r in rows))


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


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
