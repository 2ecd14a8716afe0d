"""Test setup: two simulated CPU devices (for the data-parallel tests) and strict numerics.

Two, not eight: on a 2-core machine collectives across 8 simulated devices were seen to
stall for seconds waiting for all-reduce rendezvous.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")


from pathlib import Path

import pytest

CONFIGS = Path(__file__).parents[1] / "configs"


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
