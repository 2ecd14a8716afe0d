"""Test setup: two simulated CPU devices (for the data-parallel tests) and strict numerics.

Two, not eight: on a 2-core machine collectives across 8 simulated devices were seen to
stall for seconds waiting for all-reduce rendezvous.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the session, shared by the xdist workers and
# every process a test starts (commands, notebooks, multi-host runs): the same programs
# compile once. A fresh `sqjax train` of configs/tiny.py took 31 s without it, 10 s with
# it warm. The controller creates it (workers inherit the variables) and removes it.
if "SQJAX_TEST_XLA_CACHE" not in os.environ:
    import tempfile

    os.environ["SQJAX_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="sqjax-tests-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["SQJAX_TEST_XLA_CACHE"]
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    # Runs that several test files use, trained by the first worker that needs them.
    os.environ["SQJAX_TEST_SHARED"] = tempfile.mkdtemp(prefix="sqjax-tests-shared-")
    _OWNS_XLA_CACHE = True
else:
    _OWNS_XLA_CACHE = False

# The persistent cache serves programs holding sqjax's native kernels from one process to
# the next (sqjax.cpu.native.stable_cache_keys, as the sqjax command sets it), in this
# process and those it starts (notebook kernels included): every process recompiled its
# train and embedding programs before.
os.environ["JAX_REMOVE_CUSTOM_PARTITIONING_PTR_FROM_CACHE_KEY"] = "true"

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
# In case a plugin imported jax before the variables above were set.
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


from pathlib import Path

import pytest

CONFIGS = Path(__file__).parents[1] / "configs"

# The longest test files first (seconds of test time in a 2-worker run): pyproject's addopts
# run two xdist workers that take whole files in this order, so the long ones start early
# and the short ones fill in at the end (in name order, one worker ran the last 8 minutes
# alone: 27 min in all). xdist starts each worker on two files, the 1st and 3rd to one,
# the 2nd and 4th to the other: test_cli runs after test_train on one worker, so the tiny
# run's programs are compiled once (then cached), not by both workers at once.
LONGEST_FIRST = (
    "test_train.py",  # ~180 s (measured in the suite, both workers busy)
    "test_models.py",  # ~165
    "test_cli.py",  # ~170
    "test_notebooks.py",  # ~145
    "test_native.py",  # ~140
    "test_multihost.py",  # ~130
    "test_wespeaker.py",  # ~100
    "test_analysis_cascade.py",  # ~90 (trains the shared learned_run)
    "test_study.py",  # ~85
    "test_stream.py",  # ~55
    "test_analysis_layers.py",  # ~50
    "test_kmeans.py",  # ~50
)


def pytest_configure(config):
    # With SQJAX_HUGEPAGES=1 the xdist workers and the commands tests start run with glibc's
    # huge pages, as the sqjax command then does (cli._hugepage_env; by default neither
    # does): they start after this. With -n 0 this process keeps 4 KiB pages (glibc reads
    # the tunable only when a process starts).
    from sqjax import cli

    env = cli._hugepage_env(dict(os.environ))
    if env is not None:
        os.environ["GLIBC_TUNABLES"] = env["GLIBC_TUNABLES"]


def pytest_unconfigure(config):
    if _OWNS_XLA_CACHE and "PYTEST_XDIST_WORKER" not in os.environ:
        import shutil

        shutil.rmtree(os.environ["SQJAX_TEST_XLA_CACHE"], ignore_errors=True)
        shutil.rmtree(os.environ["SQJAX_TEST_SHARED"], ignore_errors=True)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory):
    """configs/tiny.py on a tiny synthetic corpus generated once per test session."""
    from sqjax.config import load_config

    root = tmp_path_factory.mktemp("corpus")
    return load_config(
        CONFIGS / "tiny.py",
        [
            f"--config.data.synth_dir={root}/synth",
            "--config.progress=False",
            "--config.data.synth_args.workers=1",
        ],
    )


# The learning config: see tests/test_learning.py for how it was chosen and what it gives.
LEARNING_SEED = int(os.environ.get("SQJAX_LEARNING_SEED", "0"))
LEARNING_OVERRIDES = [
    "--config.data.synth_args.n_train_speakers=48",
    "--config.data.synth_args.n_dev_speakers=20",
    "--config.data.synth_args.utts_per_speaker=6",
    "--config.data.synth_args.n_test_speakers=20",
    "--config.data.synth_args.test_utts_per_speaker=5",
    "--config.data.synth_args.n_trials=1000",
    "--config.model.n_mels=40",
    "--config.model.width=8",
    "--config.model.embed_dim=256",
    "--config.head.scale=16.0",
    "--config.head.margin=0.0",
    "--config.train.num_steps=250",
    "--config.train.batch_size=32",
    "--config.train.n_frames=50",
    "--config.train.learning_rate=3e-3",
    "--config.train.warmup_steps=5",
    "--config.train.log_every=50",
    "--config.train.checkpoint_every=250",
]


@pytest.fixture(scope="session")
def learned_run():
    """A small model that learns (tests/test_learning.py), trained once per test session
    by the first xdist worker that needs it, the others waiting for it (three test files
    use it; each worker trained its own, 30-60 s): ``(config, workdir, test metrics)``.
    Tests only read it."""
    import fcntl
    import json

    from sqjax import runs
    from sqjax.config import load_config

    root = Path(os.environ["SQJAX_TEST_SHARED"]) / "learning"
    root.mkdir(exist_ok=True)
    config = load_config(
        CONFIGS / "tiny.py",
        [
            f"--config.data.synth_dir={root}/synth",
            "--config.progress=False",
            "--config.data.synth_args.workers=1",
            "--config.data.workers=1",  # a spawn pool costs more than it saves here
            f"--config.seed={LEARNING_SEED}",
            f"--config.data.synth_args.seed={LEARNING_SEED}",
            *LEARNING_OVERRIDES,
        ],
    )
    workdir = root / "run"
    with open(root / "fixture.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not (workdir / "metrics_test.json").exists():
            runs.train_and_evaluate(config, workdir)
        metrics = json.loads((workdir / "metrics_test.json").read_text())
    return config, workdir, metrics


@pytest.fixture(scope="session")
def tiny_run(tiny_config, tmp_path_factory):
    """The tiny config trained 2 steps with a checkpoint after each, once per session:
    ``(config, workdir)``. Tests copy it before changing anything in it."""
    from sqjax import runs

    config = tiny_config.copy_and_resolve_references()
    config.train.num_steps, config.train.checkpoint_every = 2, 1
    config.eval.baseline = False
    workdir = tmp_path_factory.mktemp("tiny_run") / "run"
    runs.train_and_evaluate(config, workdir)
    return config, workdir
