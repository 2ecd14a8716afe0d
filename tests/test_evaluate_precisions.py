"""All-precision embeddings (``precision_embed``, ``extract_embeddings_all``) against the
per-precision path: ``jitted_embed`` called on each model's own variables."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sqjax import quant
from sqjax.evaluate import (
    PRECISION_STRATEGIES,
    default_precision_strategy,
    extract_embeddings,
    extract_embeddings_all,
    jitted_embed,
    n_precisions,
    precision_embed,
)
from sqjax.models import build_encoder

ENCODER = build_encoder("resnet_tiny", embed_dim=8)


def assert_close(out, ref):
    """Equal to float32 rounding, relative to the embeddings' scale."""
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def _stats(rng, batch_stats):
    """Random BatchNorm statistics that change the embeddings (means near 0: larger ones
    would zero every ReLU of a random network and leave a constant embedding)."""

    def draw(path, s):
        value = (
            rng.normal(0, 0.2, s.shape) if path[-1].key == "mean" else rng.uniform(0.5, 2, s.shape)
        )
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, batch_stats)


@pytest.fixture(scope="module")
def models():
    """Three precisions, each with its own BatchNorm statistics: FP32, PTQ 2-bit, and a
    perturbed copy standing in for a QAT run."""
    rng = np.random.default_rng(0)
    # An rbg key: the default threefry init takes 4x longer to compile.
    v = jax.jit(ENCODER.init)(jax.random.key(0, impl="rbg"), jnp.zeros((1, 40, 80)))
    params = v["params"]
    qat = jax.tree.map(lambda w: w + 0.05 * jnp.asarray(rng.normal(size=w.shape), w.dtype), params)
    per_precision = [
        {"params": p, "batch_stats": _stats(rng, v["batch_stats"])}
        for p in (params, quant.quantize_params(params, 2), qat)
    ]
    return per_precision, quant.stack_precisions(per_precision)


@pytest.mark.parametrize("strategy", ["auto", *PRECISION_STRATEGIES])
def test_precision_embed_matches_per_precision_models(models, strategy):
    per_precision, stacked = models
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 40, 80)), jnp.float32)
    ref = np.stack([np.asarray(jitted_embed(ENCODER)(v, x)) for v in per_precision])
    # The precisions must differ, or a strategy that used precision 0 everywhere would pass.
    for p in (1, 2):
        assert np.abs(ref[p] - ref[0]).max() > 0.05 * np.abs(ref[0]).max()
    out = np.asarray(precision_embed(ENCODER, strategy)(stacked, x))
    assert out.shape == (3, 3, 8)
    assert_close(out, ref)


@pytest.mark.parametrize("strategy", PRECISION_STRATEGIES)
def test_extract_embeddings_all_matches_per_precision_extraction(models, strategy):
    per_precision, stacked = models
    rng = np.random.default_rng(2)
    # With rungs 20..40: shorter than min_frames (repeated to 20), cut to a rung (21 -> 20),
    # longer than max_frames (40-frame chunks and a 20-frame tail, averaged by length).
    # Batches of 3 (the last of each rung padded); the 40-frame batches reuse the compiled
    # programs of the test above.
    feats = [rng.normal(size=(n, 80)).astype(np.float32) for n in (13, 40, 60, 21, 100)]
    kw = {"batch_size": 3, "min_frames": 20, "max_frames": 40}
    ref = np.stack(
        [extract_embeddings(jitted_embed(ENCODER), v, feats, **kw) for v in per_precision]
    )
    out = extract_embeddings_all(precision_embed(ENCODER, strategy), stacked, feats, **kw)
    assert out.shape == (3, 5, 8)
    assert_close(out, ref)


def test_precision_embed_is_cached_and_checks_arguments(models):
    assert precision_embed(ENCODER, "unroll") is precision_embed(ENCODER, "unroll")
    assert precision_embed(ENCODER) is precision_embed(ENCODER, default_precision_strategy())
    assert default_precision_strategy("cpu") == "map"
    assert default_precision_strategy("gpu") == "vmap"
    with pytest.raises(ValueError, match="strategy='pmap'"):
        precision_embed(ENCODER, "pmap")
    _, stacked = models
    assert n_precisions(stacked) == 3
    bad = {**stacked, "batch_stats": jax.tree.map(lambda s: s[:2], stacked["batch_stats"])}
    with pytest.raises(ValueError, match="stack_precisions"):
        n_precisions(bad)
