"""The ``sqjax`` command: synth, train, qat, ptq, export, eval, analyze, layers, grids,
cascade, study, report, embed, verify, import-wespeaker.

sqjax train --config configs/demo.py --workdir runs/demo [--config.train.num_steps=100]
sqjax qat   --config configs/qat_demo.py --workdir runs/demo_qat
sqjax ptq   --workdir runs/demo --bits 8,4,2
sqjax export --workdir runs/demo_qat/2bit
sqjax export --workdir runs/demo_qat/2bit --format onnx   # or --model FILE.npz; [--with-frontend]
sqjax export --cascade --study runs/qat_demo --stages 2,4,32 --out bundle/
sqjax verify --bundle bundle/ --data DIR --enroll LIST --claims FILE
sqjax eval  --workdir runs/r34 --data /data/vox1 --trials /data/vox1/veri_test2.txt
sqjax eval  --model runs/demo_qat/2bit/encoder_2bit.npz --data DIR --trials FILE
sqjax analyze --study runs/qat_demo          # or --workdir runs/demo --ptq 8,4,3,2,1
sqjax layers --workdir runs/demo --bits 2     # or --study runs/qat_demo
sqjax cascade --study runs/qat_demo --stages 2,4,8,32
sqjax study --config configs/study_demo.py --workdir runs/study_demo
sqjax report runs/study_demo
sqjax embed --model runs/demo_qat/2bit/encoder_2bit.npz --data DIR --out emb.npy
sqjax synth --out data/synth --speakers 100
sqjax import-wespeaker avg_model.pt --model resnet34 --out runs/ws_r34 [--data DIR --trials FILE]

Expected errors (bad data, trials, run dirs, config values, a run directory in use, no
readable checkpoint, a full or read-only disk) print one line,
``sqjax <command>: error: <message>``, and exit with status 2; ``--debug`` shows the
traceback. Any other exception is a bug and shows its traceback.

Commands that write a directory hold its lock (``sqjax.workdir.lock``) while they run:
train, qat, study (the run or study directory), ptq and export (the run directory; export
to an ``--out`` file elsewhere takes none), analyze, layers, grids and cascade (their
output directory), import-wespeaker and synth (``--out``), report (``DIR/report``). eval
and embed only read (their outputs are whole files, written atomically).
"""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path

from sqjax.cli.parser import build_parser

__all__ = ["build_parser", "main"]

# Errors a user can fix (bad data, trial list, run directory, config value): one line.
# DataError and ConfigError are ValueErrors.
EXPECTED_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)
# OSErrors of the machine, not of sqjax: the disk is full or the directory not writable.
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "free some space, or write elsewhere",
    errno.EDQUOT: "free some space, or write elsewhere",
    errno.EROFS: "write elsewhere (a read-only file system)",
    errno.EACCES: "make it writable, or write elsewhere",
    errno.EPERM: "make it writable, or write elsewhere",
}


def _set_cpu_devices(n: int) -> None:
    # Must happen before jax initialises its backends. On CPU, N simulated devices run N
    # data-parallel shards, each on its own core: small convs use one core each otherwise.
    flags = os.environ.get("XLA_FLAGS", "")
    if n > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


# XLA:CPU maps each program's buffers afresh on every call (hundreds of MB at the demo's
# batch 32), and glibc's malloc backs them with 4 KiB pages, each faulted in on first touch:
# some 220k page faults per demo training step. With transparent huge pages in "madvise"
# mode, glibc >= 2.35 asks for 2 MiB pages when told to (GLIBC_TUNABLES, read only when a
# process starts), so with SQJAX_HUGEPAGES=1 the command re-runs itself once with it. docs/speed.md,
# "Huge pages": the demo's training ran 1.26x faster; a step right after seconds of idle
# can run slower (up to 2x on a VM with a memory balloon). Opt-in: a command that replaces
# its own process (os.execve) surprises debuggers, profilers and wrappers.
_HUGEPAGES = "glibc.malloc.hugetlb=1"
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _hugepage_env(
    environ: dict, thp_mode: str | None = None, libc: str | None = None
) -> dict | None:
    """The environment to run a command with huge pages in, or None: not asked for
    (``SQJAX_HUGEPAGES=1``), already set up (``glibc.malloc.hugetlb`` in ``GLIBC_TUNABLES``,
    also what stops a second re-run), not glibc 2.35 or later (``libc``, as
    ``os.confstr("CS_GNU_LIBC_VERSION")``), or THP not in madvise mode (``thp_mode``, the
    kernel's ``transparent_hugepage/enabled``: in "always" mode large buffers get them
    anyway, in "never" not at all). ``thp_mode`` and ``libc`` default to this machine's."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in tunables or environ.get("SQJAX_HUGEPAGES") != "1":
        return None
    try:
        libc = (os.confstr("CS_GNU_LIBC_VERSION") or "") if libc is None else libc
        thp_mode = _THP_MODE.read_text() if thp_mode is None else thp_mode
    except (ValueError, OSError):  # not Linux, or no THP
        return None
    name, _, version = libc.partition(" ")
    try:
        glibc = name == "glibc" and tuple(map(int, version.split(".")[:2])) >= (2, 35)
    except ValueError:
        glibc = False
    if not glibc or "[madvise]" not in thp_mode:
        return None
    return {**environ, "GLIBC_TUNABLES": f"{tunables}:{_HUGEPAGES}".lstrip(":")}


def _rerun_with_hugepages() -> None:
    """Replace this process by the same command in ``_hugepage_env``, where it applies
    (only with ``SQJAX_HUGEPAGES=1``; otherwise a no-op)."""
    env = _hugepage_env(dict(os.environ))
    if env is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def main(argv: list[str] | None = None) -> None:
    if argv is None:  # a command of its own (not called from Python): huge pages if asked
        _rerun_with_hugepages()
    args, rest = build_parser().parse_known_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)  # recorded in the lock file
    bad = [a for a in rest if not a.startswith("--config.")]
    if rest and args.command not in ("train", "qat", "eval", "study"):
        bad = rest  # these commands take no config
    if bad:
        build_parser().error(f"unrecognised arguments: {' '.join(bad)}")
    _set_cpu_devices(args.cpu_devices)
    from sqjax import fileio

    for name, value in vars(args).items():  # paths are made local once, here (file:// URLs)
        if isinstance(value, str):
            setattr(args, name, fileio.local(value))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from sqjax.cpu import native

    native.stable_cache_keys()  # the persistent cache serves programs holding our kernels
    for noisy in ("absl", "jax", "orbax"):  # orbax logs every checkpoint's options at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from sqjax import workdir as workdir_lib

    try:
        with workdir_lib.strict_restore(args.strict_restore):
            args.fn(args, rest)
    except (*EXPECTED_ERRORS, workdir_lib.WorkdirError) as e:
        if args.debug:
            raise
        _fail(args, _one_line(str(e)))
    except OSError as e:
        if args.debug or e.errno not in ENVIRONMENT_ERRNOS:
            raise
        where = f": {e.filename}" if e.filename else ""
        _fail(args, f"{e.strerror or os.strerror(e.errno)}{where} ({ENVIRONMENT_ERRNOS[e.errno]})")


def _one_line(message: str) -> str:
    lines = message.strip().splitlines() or [""]
    return lines[0] + (" (--debug shows the rest)" if len(lines) > 1 else "")


def _fail(args, message: str) -> None:
    print(f"sqjax {args.command}: error: {message}", file=sys.stderr)
    sys.exit(2)
