"""Test setup: two simulated CPU devices (for the data-parallel tests) and strict numerics.

Two, not eight: on a 2-core machine collectives across 8 simulated devices were seen to
stall for seconds waiting for all-reduce rendezvous.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
