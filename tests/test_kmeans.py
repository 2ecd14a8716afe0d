"""sqjax.kmeans against scikit-learn, brute force and NumPy references."""

import itertools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from sqjax import kmeans


def _mixture(n=20_000, seed=0):
    """Weight-like values: Laplacian bulk plus a narrow Gaussian bump."""
    rng = np.random.default_rng(seed)
    return np.concatenate(
        [rng.laplace(0, 0.05, n * 3 // 4), rng.normal(0.02, 0.01, n - n * 3 // 4)]
    ).astype(np.float32)


def _conv_kernel(seed=1):
    """A 3x3 conv kernel, 32 -> 64 channels (HWIO), He-scaled Laplacian."""
    std = np.sqrt(2 / (3 * 3 * 32))
    return (
        np.random.default_rng(seed).laplace(0, std / np.sqrt(2), (3, 3, 32, 64)).astype(np.float32)
    )


def _mse(x, c):
    x = np.asarray(x, np.float64).ravel()
    return float(np.mean(np.min((x[:, None] - np.asarray(c, np.float64)[None, :]) ** 2, axis=1)))


@pytest.fixture(scope="module")
def tensors():
    return {"mixture": _mixture(), "conv": _conv_kernel()}


def _fit_both(tensors, k, **kw):
    return dict(
        zip(
            tensors,
            kmeans.kmeans_1d_batch([x.reshape(1, -1) for x in tensors.values()], [k, k], **kw),
        )
    )


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_distortion_within_1pct_of_sklearn(tensors, bits):
    k = 2**bits
    for name, (c, d) in _fit_both(tensors, k).items():
        x = tensors[name].reshape(-1, 1)
        with threadpool_limits(1):  # OpenMP threads on a busy 2-core machine: up to 30x slower
            ref = KMeans(n_clusters=k, n_init=10, random_state=0).fit(x).inertia_ / x.shape[0]
        ours = _mse(x, c[0])
        assert ours <= 1.01 * ref, (name, bits, ours / ref)
        np.testing.assert_allclose(float(d[0]), ours, rtol=1e-4)  # reported MSE is exact
        assert np.all(np.diff(np.asarray(c[0])) >= 0)


def test_lloyd_fixed_point(tensors):
    """With tol=0 each centroid is the mean of the values nearest to it (a fixed point)."""
    x = tensors["conv"].ravel()
    c = _fit_both(tensors, 16, tol=0.0, iters=1000)["conv"][0][0]
    idx = np.argmin(np.abs(x[:, None] - np.asarray(c)[None, :]), axis=1)
    for j in np.unique(idx):
        np.testing.assert_allclose(
            c[j], x[idx == j].astype(np.float64).mean(), rtol=1e-5, atol=1e-7
        )


def _brute_force_optimum(x, k):
    xs = np.sort(np.asarray(x, np.float64))
    best = np.inf
    for cuts in itertools.combinations(range(1, len(xs)), k - 1):
        parts = np.split(xs, cuts)
        best = min(best, sum(((p - p.mean()) ** 2).sum() for p in parts))
    return best / len(xs)


@pytest.mark.parametrize("seed,k", [(0, 3), (1, 4), (2, 5)])
def test_small_inputs_reach_global_optimum(seed, k):
    x = np.random.default_rng(seed).laplace(size=13).astype(np.float32)
    c, d = kmeans.kmeans_1d(x, k)
    np.testing.assert_allclose(_mse(x, c), _brute_force_optimum(x, k), rtol=1e-5)
    np.testing.assert_allclose(float(d), _brute_force_optimum(x, k), rtol=1e-4)


@pytest.mark.parametrize(
    "x,k",
    [
        (np.full(50, 0.25), 4),  # constant
        (np.zeros(50), 2),  # all zeros
        (np.array([0.0, 1.0] * 20), 8),  # fewer distinct values than k
        (np.array([0.5, -1.0, 2.0]), 16),  # k > n
    ],
)
def test_degenerate_inputs_give_valid_codebooks(x, k):
    c, d = kmeans.kmeans_1d(x.astype(np.float32), k)
    c = np.asarray(c)
    assert c.shape == (k,) and np.all(np.isfinite(c)) and np.all(np.diff(c) >= 0)
    assert set(np.unique(x)) <= set(c.tolist())  # every distinct value is a centroid
    assert float(d) == 0.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_raises(bad):
    x = np.ones(100, np.float32)
    x[7] = bad
    with pytest.raises(ValueError, match="NaN/inf"):
        kmeans.kmeans_1d(x, 4)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="k must be"):
        kmeans.kmeans_1d(np.ones(4), 0)
    with pytest.raises(ValueError, match="init must be"):
        kmeans.kmeans_1d(np.ones(4), 2, init="random")
    with pytest.raises(ValueError, match="non-empty"):
        kmeans.kmeans_1d(np.ones(0), 2)


def test_grouped_equals_loop_over_groups():
    x = np.random.default_rng(3).laplace(size=(6, 300)).astype(np.float32)
    cg, dg = kmeans.kmeans_1d_grouped(x, 4)
    for g in range(x.shape[0]):
        c, d = kmeans.kmeans_1d(x[g], 4)
        np.testing.assert_allclose(cg[g], c, rtol=1e-6)
        np.testing.assert_allclose(dg[g], d, rtol=1e-5)


def test_assign_equals_brute_force_argmin():
    rng = np.random.default_rng(4)
    for k in (2, 8, 64):  # both search methods (<= 16 and > 16 centroids)
        c = np.sort(rng.normal(size=k)).astype(np.float32)
        x = np.concatenate([rng.normal(size=2000), c]).astype(np.float32)
        ref = np.argmin(np.abs(x[:, None].astype(np.float64) - c[None, :]), axis=1)
        np.testing.assert_array_equal(kmeans.assign(x, c), ref)
        # a value exactly on a (float32) midpoint goes to the larger centroid
        mid = ((c[1:] + c[:-1]) * np.float32(0.5)).astype(np.float32)
        np.testing.assert_array_equal(kmeans.assign(mid, c), np.arange(1, k))


def test_jitted_fit_matches_eager(tensors):
    """Under jit (XLA sort, no buckets) the result is the same as eager."""
    x = tensors["conv"][..., :4]
    c0, d0 = kmeans.kmeans_1d(x, 16)
    c1, d1 = jax.jit(lambda w: kmeans.kmeans_1d(w, 16))(jnp.asarray(x))
    np.testing.assert_allclose(c1, c0, rtol=1e-6)
    np.testing.assert_allclose(d1, d0, rtol=1e-5)


def _lloyd_numpy(x, c, iters):
    """Reference Lloyd by brute-force argmin; an empty cluster keeps its centroid."""
    x, c = np.asarray(x, np.float64).ravel(), np.asarray(c, np.float64).copy()
    for _ in range(iters):
        idx = np.argmin(np.abs(x[:, None] - c[None, :]), axis=1)
        for j in np.unique(idx):
            c[j] = x[idx == j].mean()
    return c


def _owners(x, c):
    """How many values of x each centroid of sorted c owns (ties go right, as `assign`)."""
    return np.bincount(kmeans.assign(np.ravel(x), c), minlength=len(c))


def test_warm_start_refines_and_keeps_converged_codebooks():
    x = _mixture(1_000, seed=7)
    c, _ = kmeans.kmeans_1d(x, 16, tol=0.0, iters=1000)
    c2, _ = kmeans.kmeans_1d(x, 16, init_centroids=c, iters=5)
    np.testing.assert_allclose(c2, c, rtol=1e-6)  # already a fixed point
    rough = np.linspace(x.min(), x.max(), 16).astype(np.float32)
    c0, d_rough = kmeans.kmeans_1d(x, 16, init_centroids=rough, iters=0)  # re-seeded only
    c5, d_refined = kmeans.kmeans_1d(x, 16, init_centroids=rough, iters=5)
    np.testing.assert_allclose(float(d_rough), _mse(x, c0), rtol=1e-4)
    np.testing.assert_allclose(float(d_refined), _mse(x, c5), rtol=1e-4)
    assert _mse(x, c5) < _mse(x, c0) < _mse(x, rough)


@pytest.mark.parametrize("shift", [0.0, -0.5])
def test_warm_start_reports_true_distortion(shift):
    """Non-negative data once gave the padding segments' zero codebooks marks inside the
    first segment, and a reported MSE of 0."""
    u = np.random.default_rng(0).uniform(0, 1, 1000).astype(np.float32) + shift
    c0 = np.array([0.1, 0.3, 0.6, 0.9], np.float32) + shift
    c, d = kmeans.kmeans_1d(u, 4, init_centroids=c0)
    np.testing.assert_allclose(float(d), _mse(u, c), rtol=1e-4)
    groups = [u.reshape(2, -1), u[:300].reshape(1, -1)]
    warm = [np.tile(c0, (2, 1)), c0[None, :3]]
    for g, (cb, mse) in zip(groups, kmeans.kmeans_1d_batch(groups, [4, 3], init_centroids=warm)):
        for row in range(g.shape[0]):
            np.testing.assert_allclose(float(mse[row]), _mse(g[row], cb[row]), rtol=1e-4)


def test_warm_start_reseeds_empty_clusters():
    """A centroid far outside the data owns nothing; the warm start moves it into the
    data, so every centroid owns a value and the distortion beats plain Lloyd."""
    x = _mixture(2_000, seed=8)
    c0 = np.append(np.quantile(x, [0.2, 0.5, 0.8]), 100.0).astype(np.float32)
    assert _owners(x, c0)[-1] == 0
    for iters in (0, 5):
        c, d = kmeans.kmeans_1d(x, 4, init_centroids=c0, iters=iters)
        c = np.asarray(c)
        assert np.all(np.diff(c) >= 0) and np.all(_owners(x, c) >= 1), (iters, c)
        ref = _mse(x, _lloyd_numpy(x, c0, iters))  # the dead centroid stays dead
        assert _mse(x, c) < 0.97 * ref, (iters, _mse(x, c), ref)
        np.testing.assert_allclose(float(d), _mse(x, c), rtol=1e-4)


def test_reseed_keeps_the_other_centroids_and_splits_the_worst_cluster():
    """With iters=0 a dead centroid goes to the value farthest from its centroid in the
    cluster of largest squared error (a NumPy brute-force reference); the others stay."""
    x = np.random.default_rng(9).laplace(size=500).astype(np.float32)
    live = np.array([-1.0, 0.0, 0.3], np.float32)
    c, _ = kmeans.kmeans_1d(x, 4, init_centroids=np.append(live, -50.0), iters=0)
    idx = np.argmin(np.abs(x[:, None] - live[None, :]), axis=1)
    err = (x.astype(np.float64) - live[idx]) ** 2
    worst = np.argmax(np.bincount(idx, err, minlength=3))
    far = x[idx == worst][np.argmax(err[idx == worst])]
    np.testing.assert_array_equal(np.asarray(c), np.sort(np.append(live, far)))
    # no empty cluster: unchanged
    c2, _ = kmeans.kmeans_1d(x, 4, init_centroids=np.append(live, 2.0), iters=0)
    np.testing.assert_array_equal(np.asarray(c2), np.sort(np.append(live, 2.0)))
    # fewer distinct values than centroids: nothing to split, no NaN
    c3, d3 = kmeans.kmeans_1d(
        np.array([0.0, 1.0] * 20, np.float32),
        4,
        init_centroids=np.array([0.0, 1.0, 5.0, 9.0], np.float32),
    )
    np.testing.assert_array_equal(np.asarray(c3), [0.0, 1.0, 5.0, 9.0])
    assert float(d3) == 0.0


@pytest.mark.parametrize("init", ["linear", "quantile", "kmeans++"])
def test_other_inits_valid_and_deterministic(init):
    x = _mixture(500, seed=5)
    c1, d1 = kmeans.kmeans_1d(x, 8, init=init, key=jax.random.PRNGKey(1))
    c2, _ = kmeans.kmeans_1d(x, 8, init=init, key=jax.random.PRNGKey(1))
    np.testing.assert_array_equal(c1, c2)
    assert np.all(np.diff(np.asarray(c1)) >= 0)
    np.testing.assert_allclose(float(d1), _mse(x, c1), rtol=1e-4)
    _, d_dp = kmeans.kmeans_1d(x, 8)
    assert float(d_dp) <= float(d1) * (1 + 1e-6)  # "dp" is exactly optimal on <= 512 values


def test_batch_mixed_k_and_sizes():
    """Different sizes and k in one call equal separate calls (up to float32 rounding of
    prefix sums taken at other offsets)."""
    rng = np.random.default_rng(6)
    xs = [rng.laplace(size=(1, n)).astype(np.float32) for n in (37, 1000, 700)]
    ks = [2, 16, 4]
    batch = kmeans.kmeans_1d_batch(xs, ks)
    for x, k, (c, d) in zip(xs, ks, batch):
        c1, d1 = kmeans.kmeans_1d(x, k)
        np.testing.assert_allclose(c[0], c1, rtol=1e-5)
        np.testing.assert_allclose(d[0], d1, rtol=1e-5)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_distortion_matches_sklearn_on_trained_demo_kernels(bits):
    """Kernels of the demo model trained by `sqjax train --config configs/demo.py` (600
    steps, seed 0): stem (72 weights, fewer than 2^8), a 1x1 shortcut (128) and two 3x3
    convs (9,216 and 18,432). Distortion within 1% of KMeans(n_init=10), or exact zero
    where the tensor has no more values than centroids."""
    k = 2**bits
    with np.load(Path(__file__).parent / "data" / "demo_kernels.npz") as z:
        kernels = {name: z[name].ravel().astype(np.float64) for name in z.files}
    for name, w in kernels.items():
        _, mse = kmeans.kmeans_1d(jnp.asarray(w, jnp.float32), k)
        if len(np.unique(w)) <= k:
            assert float(mse) == 0.0, name
            continue
        with threadpool_limits(1):
            ref = KMeans(n_clusters=k, n_init=10, random_state=0).fit(w[:, None])
        ref_mse = ref.inertia_ / w.size
        assert float(mse) <= 1.01 * ref_mse, (name, float(mse), ref_mse)


def test_assign_under_jit_and_vmap_with_constant_inputs_matches_numpy():
    """Per-channel assignment of weights captured as constants inside jit (as a model's
    closure would) equals NumPy's; searchsorted(method="compare_all") failed here."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(200, 8)).astype(np.float32)
    cb = np.sort(rng.normal(size=(8, 4)).astype(np.float32), axis=-1)
    mid = (cb[:, 1:] + cb[:, :-1]) / 2
    want = np.stack([np.searchsorted(mid[c], w[:, c], side="right") for c in range(8)], 1)
    got = jax.jit(lambda: jax.vmap(kmeans.assign, in_axes=(1, 0), out_axes=1)(w, cb))()
    np.testing.assert_array_equal(got, want)
