"""sqjax.uniform: integer grids against NumPy, MSE scales, K-means vs grid, export, LSQ."""

from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sqjax import builders, export, quant, train, uniform
from sqjax.config import ConfigError, default_config, load_config

CONFIGS = Path(__file__).parents[1] / "configs"

# ------------------------------------------------------------------------------ helpers


def _ref_minmax(w, bits, symmetric, per_channel):
    """NumPy reference: min/max scales and zero points, (groups,) each, in float64."""
    k = 2**bits
    x = np.asarray(w, np.float64)
    x = x.reshape(-1, x.shape[-1]).T if per_channel else x.reshape(1, -1)
    if symmetric:
        s = 2 * np.abs(x).max(1) / (k - 1)
        return s, np.full_like(s, (k - 1) / 2)
    lo, hi = np.minimum(x.min(1), 0), np.maximum(x.max(1), 0)
    s = (hi - lo) / (k - 1)
    return s, np.clip(np.round(-lo / s), 0, k - 1)


def _ref_nearest(w, levels):
    """NumPy reference: each weight's nearest level; levels (K,) or (channels, K)."""
    w = np.asarray(w, np.float64)
    lv = np.asarray(levels, np.float64)
    if lv.ndim == 1:
        return lv[np.argmin(np.abs(w[..., None] - lv), axis=-1)]
    idx = np.argmin(np.abs(w[..., None] - lv), axis=-1)  # lv (C, K) broadcasts on w's last axis
    return np.take_along_axis(np.broadcast_to(lv, w.shape + lv.shape[-1:]), idx[..., None], -1)[
        ..., 0
    ]


def _tensor(kind, shape, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "gauss":
        return rng.normal(size=shape).astype(np.float32)
    if kind == "laplace":
        return rng.laplace(size=shape).astype(np.float32)
    w = rng.normal(size=shape)  # a few large outliers, as trained kernels have
    flat = w.reshape(-1)
    flat[rng.choice(flat.size, 4, replace=False)] *= 25
    return w.astype(np.float32)


def _sq_err(w, q):
    return float(np.sum((np.asarray(w, np.float64) - np.asarray(q, np.float64)) ** 2))


# ---------------------------------------------------------------------- levels, rounding


@pytest.mark.parametrize("symmetric", [False, True])
def test_minmax_levels_and_rounding_match_numpy(symmetric):
    """b = 1..8, per tensor ("t<b>") and per channel ("c<b>")."""
    rng = np.random.default_rng(0)
    params, rules = {}, []
    for b in range(1, 9):
        for g in "tc":
            w = (rng.laplace(size=(12, 5)) + 0.3).astype(np.float32)
            params[f"{g}{b}"] = {"kernel": w, "bias": np.ones(5, np.float32)}
            rules.append(quant.Rule(f"{g}{b}/kernel", b, per_channel=g == "c"))
    qz = uniform.uniform_quantizer(rules, symmetric=symmetric, scale="minmax")
    state = qz.init(params)
    qparams = jax.jit(qz.apply)(params, state)
    for name in params:
        per_channel, bits = name[0] == "c", int(name[1:])
        k, w = 2**bits, params[name]["kernel"]
        assert state.codebooks[name]["bias"] is None and state.scales[name]["bias"] is None
        s, z = np.asarray(state.scales[name]["kernel"]), np.asarray(state.zeros[name]["kernel"])
        cb = np.asarray(state.codebooks[name]["kernel"])
        ref_s, ref_z = _ref_minmax(w, bits, symmetric, per_channel)
        assert s.shape == ((5,) if per_channel else ()) and cb.shape == s.shape + (k,)
        np.testing.assert_allclose(s.reshape(-1), ref_s, rtol=1e-6)
        np.testing.assert_array_equal(z.reshape(-1), ref_z)
        # the levels are exactly scale * (arange(K) - zero) in float32, as NumPy computes it
        s32, z32 = s.astype(np.float32)[..., None], z.astype(np.float32)[..., None]
        np.testing.assert_array_equal(cb, s32 * (np.arange(k, dtype=np.float32) - z32))
        assert np.all(np.diff(cb, axis=-1) > 0)
        if symmetric:  # mid-rise: +-s/2, ..., the outermost at max|w|; 0 is not a level
            np.testing.assert_allclose(
                cb[..., -1], np.abs(w).max(0 if per_channel else None), rtol=1e-6
            )
            assert not np.any(cb == 0)
        else:  # 0 is a level
            assert np.all(np.any(cb == 0, axis=-1))
        q = np.asarray(qparams[name]["kernel"])
        np.testing.assert_array_equal(q, _ref_nearest(w, cb))
        np.testing.assert_array_equal(qparams[name]["bias"], params[name]["bias"])
        # within the grid the error is at most half a step
        sg = s[None, :] if per_channel else s
        inside = (w >= cb[..., 0]) & (w <= cb[..., -1])
        assert np.all(np.abs(w - q)[inside] <= (sg / 2 * (1 + 1e-6) * np.ones_like(w))[inside])


def test_symmetric_grids_by_hand():
    w = np.array([[-3.0, 0.2], [1.0, 1.5]], np.float32)  # max|w| = 3
    state = uniform.uniform_quantizer(quant.default_rules(1), symmetric=True, scale="minmax").init(
        {"kernel": w}
    )
    np.testing.assert_array_equal(state.codebooks["kernel"], [-3.0, 3.0])  # s = 6, +-s/2
    state = uniform.uniform_quantizer(quant.default_rules(2), symmetric=True, scale="minmax").init(
        {"kernel": w}
    )
    np.testing.assert_array_equal(state.codebooks["kernel"], [-3.0, -1.0, 1.0, 3.0])  # s = 2
    # asymmetric 2 bits: range [-3, 1.5], s = 1.5, zero = 2: levels -3, -1.5, 0, 1.5
    state = uniform.uniform_quantizer(quant.default_rules(2), scale="minmax").init({"kernel": w})
    np.testing.assert_array_equal(state.codebooks["kernel"], [-3.0, -1.5, 0.0, 1.5])
    assert float(state.zeros["kernel"]) == 2.0


def test_levels_are_bit_identical_in_numpy_and_jitted_jax():
    rng = np.random.default_rng(1)
    s = rng.uniform(1e-3, 2.0, 64).astype(np.float32)
    for k in (2, 16, 256):
        for z in (rng.integers(0, k, 64).astype(np.float32), np.full(64, (k - 1) / 2, np.float32)):
            ref = s[:, None] * (np.arange(k, dtype=np.float32)[None, :] - z[:, None])
            got = jax.jit(uniform.grid_levels, static_argnums=2)(s, z, k)
            np.testing.assert_array_equal(np.asarray(got), ref)


def test_mse_scale_rounding_matches_numpy():
    w = _tensor("laplace", (24, 6), seed=2)
    for symmetric in (False, True):
        qz = uniform.uniform_quantizer(
            quant.default_rules(3, per_channel=True), symmetric=symmetric
        )
        state = qz.init({"kernel": w})
        cb = np.asarray(state.codebooks["kernel"])
        np.testing.assert_array_equal(qz.apply({"kernel": w}, state)["kernel"], _ref_nearest(w, cb))


# ----------------------------------------------------------------------------- MSE scale


def _zoo(tensor_bits, channel_bits):
    """Leaves "<kind>/<granularity>/b<bits>": per tensor (512 weights) at each of
    ``tensor_bits``, per channel (4 channels of 64) at each of ``channel_bits``, with the
    rules that quantize each at its width."""
    params = {kind: {"t": {}, "c": {}} for kind in ("gauss", "laplace", "outliers")}
    rules = []
    for i, kind in enumerate(params):
        for b in tensor_bits:
            params[kind]["t"][f"b{b}"] = _tensor(kind, (64, 8), seed=10 * i + b)
            rules.append(quant.Rule(f"{kind}/t/b{b}$", b))
        for b in channel_bits:
            params[kind]["c"][f"b{b}"] = _tensor(kind, (64, 4), seed=10 * i + b + 100)
            rules.append(quant.Rule(f"{kind}/c/b{b}$", b, per_channel=True))
    return params, tuple(rules)


def _errors(state, params):
    """Squared error per quantized leaf path, each weight on its nearest level (NumPy)."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    cbs = jax.tree.leaves(state.codebooks)
    return {quant.path_str(kp): _sq_err(w, _ref_nearest(w, cb)) for (kp, w), cb in zip(flat, cbs)}


def test_mse_scale_never_worse_than_minmax():
    params, rules = _zoo((1, 2, 3, 4, 6, 8), (1, 2, 3, 4, 6, 8))
    for symmetric in (False, True):
        minmax, mse = (
            _errors(
                uniform.uniform_quantizer(rules, symmetric=symmetric, scale=s).init(params), params
            )
            for s in ("minmax", "mse")
        )
        for path, e in mse.items():
            assert e <= minmax[path] * (1 + 1e-6), (path, symmetric, e, minmax[path])
            b = int(path.rsplit("b", 1)[1])
            # per tensor at low widths clipping the tails pays, clearly
            if b <= 3 and "/t/" in path and not path.startswith("outliers"):
                assert e < 0.9 * minmax[path], (path, symmetric, e, minmax[path])


def test_mse_scale_is_near_a_brute_force_numpy_search():
    w = _tensor("gauss", (64, 32), seed=4)
    params = {"kernel": w}
    for bits in (2, 4):
        k = 2**bits
        z = (k - 1) / 2
        best = min(
            _sq_err(w, s * (np.clip(np.round(w / s + z), 0, k - 1) - z))
            for s in np.linspace(0.01, 2 * np.abs(w).max() / (k - 1), 4000)
        )
        qz = uniform.uniform_quantizer(quant.default_rules(bits), symmetric=True)
        got = _sq_err(w, qz.apply(params, qz.init(params))["kernel"])
        assert got <= best * 1.002, (bits, got, best)


def test_kmeans_distortion_never_worse_than_uniform_grid():
    """K-means is the optimal 1-D quantizer for squared error: at equal b, no grid beats it
    (per tensor at b = 1..8, per channel at 1..6: 64 weights need no more; Gaussian,
    Laplace and outlier weights)."""
    params, rules = _zoo(range(1, 9), range(1, 7))
    kmeans = _errors(quant.kmeans_quantizer(rules).init(params), params)
    for symmetric in (False, True):
        grid = _errors(uniform.uniform_quantizer(rules, symmetric=symmetric).init(params), params)
        for path, e in grid.items():
            assert kmeans[path] <= e * (1 + 1e-6) + 1e-12, (path, symmetric, kmeans[path], e)
            assert kmeans[path] < e or e == 0, (path, symmetric)  # and strictly, here


# -------------------------------------------------------------------------------- update


def test_update_refits_and_keeps_learned_scales():
    rng = np.random.default_rng(6)
    params = {"a": {"kernel": rng.normal(size=(16, 4)).astype(np.float32)}}
    moved = {"a": {"kernel": params["a"]["kernel"] * 1.5 + 0.2}}
    rules = quant.default_rules(3, per_channel=True)
    qz = uniform.uniform_quantizer(rules)
    state = qz.init(params)
    for update in (qz.update, jax.jit(qz.update)):
        new = update(jax.tree.map(jnp.asarray, moved), state)
        fresh = qz.init(moved)
        for field in ("scales", "zeros", "codebooks"):
            np.testing.assert_allclose(
                getattr(new, field)["a"]["kernel"],
                getattr(fresh, field)["a"]["kernel"],
                rtol=1e-6,
            )
    lq = uniform.uniform_quantizer(rules, scale="minmax", learn_scale=True)
    state = lq.init(params)
    learned = uniform.with_scales(state, {"a": {"kernel": state.scales["a"]["kernel"] * 0.7}})
    new = jax.jit(lq.update)(jax.tree.map(jnp.asarray, moved), learned)
    s = np.asarray(learned.scales["a"]["kernel"])
    np.testing.assert_array_equal(new.scales["a"]["kernel"], s)  # kept
    _, ref_z = _ref_minmax(moved["a"]["kernel"], 3, False, True)  # from the moved weights
    np.testing.assert_array_equal(new.zeros["a"]["kernel"], ref_z)
    np.testing.assert_array_equal(
        new.codebooks["a"]["kernel"],
        s[:, None] * (np.arange(8, dtype=np.float32) - ref_z.astype(np.float32)[:, None]),
    )


# -------------------------------------------------------------------------------- export


def _export_params():
    rng = np.random.default_rng(7)
    p = {f"b{b}": {"kernel": rng.laplace(size=(16, 32)).astype(np.float32)} for b in (1, 3, 8)}
    p["pc2"] = {"kernel": rng.laplace(size=(3, 3, 4, 8)).astype(np.float32)}
    p["pc7"] = {"kernel": rng.normal(size=(64, 6)).astype(np.float32)}
    p["half"] = {"kernel": jnp.asarray(rng.laplace(size=(8, 16)), jnp.bfloat16)}
    p["bias"] = rng.normal(size=32).astype(np.float32)
    return p


_EXPORT_RULES = (
    quant.Rule("pc2/", 2, per_channel=True),
    quant.Rule("pc7/", 7, per_channel=True),
    quant.Rule("half/", 4),
) + tuple(quant.Rule(f"b{b}/kernel", b) for b in (1, 3, 8))


@pytest.mark.parametrize("symmetric", [False, True])
def test_export_round_trip_is_bit_exact_and_sizes_by_hand(tmp_path, symmetric):
    params = _export_params()
    qz = uniform.uniform_quantizer(_EXPORT_RULES, symmetric=symmetric)
    state = qz.init(params)
    path = tmp_path / "m.sqz"
    report = export.export_packed(path, params, state)
    expected = jax.jit(qz.apply)(params, state)
    loaded = export.load_packed(path, target=params)
    for (kp, e), g in zip(
        jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(loaded)
    ):
        assert g.dtype == e.dtype, quant.path_str(kp)
        assert np.array_equal(np.asarray(g), np.asarray(e)), quant.path_str(kp)
    per_grid = 32 if symmetric else 32 + 8  # float32 scale (+ 8-bit zero point)
    bits = {leaf.path: leaf.packed_bits for leaf in report.leaves}
    assert bits["b3/kernel"] == 512 * 3 + per_grid
    assert bits["b8/kernel"] == 512 * 8 + per_grid
    assert bits["pc2/kernel"] == 288 * 2 + 8 * per_grid
    assert bits["pc7/kernel"] == 384 * 7 + 6 * per_grid
    assert bits["half/kernel"] == 128 * 4 + per_grid
    assert bits["bias"] == 32 * 32
    assert report.file_bytes == path.stat().st_size
    with np.load(path) as z:
        header = z["header"].size
        assert z["scales"].dtype == np.float32 and z["scales"].size == 3 + 1 + 8 + 6
        assert z["zeros"].size == (0 if symmetric else 3 + 1 + 8 + 6)
        assert z["codebooks"].size == 0  # grids store no levels
    assert 0 <= report.file_bytes - report.packed_bytes <= header + 3072 + len(report.leaves)


def test_export_refuses_levels_that_do_not_match_the_scales(tmp_path):
    params = {"d": {"kernel": np.linspace(-1, 1, 32, dtype=np.float32).reshape(8, 4)}}
    state = uniform.uniform_quantizer(quant.default_rules(2)).init(params)
    stale = state._replace(scales={"d": {"kernel": state.scales["d"]["kernel"] * 1.1}})
    with pytest.raises(ValueError, match="'d/kernel'.*refresh"):
        export.export_packed(tmp_path / "m.sqz", params, stale)
    export.export_packed(tmp_path / "m.sqz", params, uniform.with_scales(state, stale.scales))


# ---------------------------------------------------------------------- gradients (STE, LSQ)


def _toy():
    rng = np.random.default_rng(8)
    params = {
        "h": {"kernel": rng.normal(0, 0.4, (6, 12)).astype(np.float32)},
        "o": {"kernel": rng.normal(0, 0.3, (12, 3)).astype(np.float32)},
    }
    x = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(32, 3)), jnp.float32)
    loss = lambda p: jnp.mean((jnp.tanh(x @ p["h"]["kernel"]) @ p["o"]["kernel"] - y) ** 2)
    return params, loss


@pytest.mark.parametrize(
    "symmetric,per_channel,learn",
    [(False, False, False), (True, True, False), (False, True, True), (True, False, True)],
)
def test_weight_gradient_is_straight_through(symmetric, per_channel, learn):
    params, loss = _toy()
    qz = uniform.uniform_quantizer(
        quant.default_rules(2, per_channel=per_channel), symmetric=symmetric, learn_scale=learn
    )
    state = qz.init(params)
    qparams = jax.jit(qz.apply)(params, state)
    g_ste = jax.jit(jax.grad(lambda p: loss(qz.apply(p, state))))(params)
    g_ref = jax.jit(jax.grad(loss))(qparams)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), g_ste, g_ref)
    g_s = jax.jit(jax.grad(lambda s, p: loss(qz.apply(p, s))))(state, params).scales
    assert all(np.any(np.asarray(v)) == learn for v in jax.tree.leaves(g_s))


def test_lsq_scale_gradient_by_hand():
    # symmetric 2 bits, s = 1, zero = 1.5: levels -1.5, -0.5, 0.5, 1.5 (Q_P = 1.5).
    # w = 0.3 -> 0.5 (inside: round - w/s = 0.5 - 0.3); w = -1.2 -> -1.5 (inside: -0.3);
    # w = 2.6 is above the grid: the clip bound Q_P = 1.5. dL/dq = c = (1, 2, 3).
    # dL/ds = (0.2 - 0.6 + 4.5) / sqrt(N Q_P) = 4.1 / sqrt(4.5)
    w = {"kernel": np.array([0.3, -1.2, 2.6], np.float32)}
    c = jnp.array([1.0, 2.0, 3.0])
    qz = uniform.uniform_quantizer(quant.default_rules(2), symmetric=True, learn_scale=True)
    one, placeholder = {"kernel": np.float32(1.0)}, {"kernel": np.zeros(4, np.float32)}
    state = uniform.with_scales(
        uniform.UniformState(placeholder, one, {"kernel": np.float32(1.5)}), one
    )
    np.testing.assert_array_equal(state.codebooks["kernel"], [-1.5, -0.5, 0.5, 1.5])
    np.testing.assert_array_equal(qz.apply(w, state)["kernel"], [0.5, -1.5, 1.5])
    g = jax.grad(lambda st: jnp.sum(c * qz.apply(w, st)["kernel"]))(state)
    np.testing.assert_allclose(g.scales["kernel"], 4.1 / np.sqrt(4.5), rtol=1e-6)


def _lsq_paper(w, s, z, k, qp):
    """LSQ as in the paper's pseudo-code (Esser et al. 2020, appendix), in the affine frame:
    gradscale on s, then clamp, round with a straight-through pass, and rescale."""
    g = 1.0 / np.sqrt(w.shape[0] * qp)
    s = jax.lax.stop_gradient(s - s * g) + s * g
    v = jnp.clip(w / s + z, 0, k - 1)
    vbar = jax.lax.stop_gradient(jnp.round(v) - v) + v
    return (vbar - z) * s


@pytest.mark.parametrize("symmetric", [False, True])
def test_lsq_scale_gradient_matches_the_paper_per_channel(symmetric):
    rng = np.random.default_rng(9)
    w = rng.laplace(size=(50, 4)).astype(np.float32)
    c = jnp.asarray(rng.normal(size=(50, 4)), jnp.float32)
    qz = uniform.uniform_quantizer(
        quant.default_rules(3, per_channel=True), symmetric=symmetric, learn_scale=True
    )
    state = qz.init({"kernel": w})
    s, z = state.scales["kernel"], state.zeros["kernel"]
    qp = 3.5 if symmetric else 7.0
    # w is an argument, not a constant: XLA miscompiles a vmapped compare-all searchsorted
    # over a constant's last axis (jax 0.10.2), which quant._lookup uses per channel.
    loss = lambda st, w: jnp.sum(c * qz.apply({"kernel": w}, st)["kernel"])
    g = jax.jit(jax.grad(loss))(state, w)
    ref = jax.jit(
        jax.grad(lambda s: jnp.sum(c * _lsq_paper(jnp.asarray(w), s[None, :], z[None, :], 8, qp)))
    )(s)
    np.testing.assert_allclose(g.scales["kernel"], ref, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(g.zeros["kernel"]) == 0)  # zero points are not trained


def test_learned_scale_lowers_the_loss_of_a_toy_regression():
    """Teacher weights on a grid 4x wider than the student's: with frozen scales the
    2-bit grid cannot reach them; with LSQ the scale grows to the teacher's."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(128, 16)), jnp.float32)
    teacher = rng.choice(np.array([-1.5, -0.5, 0.5, 1.5], np.float32), size=(16, 4))
    y = x @ teacher
    w0 = {"dense": {"kernel": jnp.asarray(teacher / 4 + rng.normal(0, 0.01, (16, 4)), jnp.float32)}}

    def fit(learn, steps=120):
        qz = uniform.uniform_quantizer(quant.default_rules(2), symmetric=True, learn_scale=learn)
        tx = optax.adam(2e-2)
        state = qz.init(w0)
        p = (w0, state.scales)
        opt = tx.init(p)

        def loss_fn(p):
            qw = qz.apply(p[0], uniform.with_scales(state, p[1]))
            return jnp.mean((x @ qw["dense"]["kernel"] - y) ** 2)

        @jax.jit
        def step(p, opt):
            upd, opt = tx.update(jax.grad(loss_fn)(p), opt, p)
            return optax.apply_updates(p, upd), opt

        for _ in range(steps):
            p, opt = step(p, opt)
        return float(loss_fn(p)), float(p[1]["dense"]["kernel"])

    frozen, s_frozen = fit(False)
    learned, s_learned = fit(True)
    assert learned < 0.05 * frozen, (learned, frozen)
    assert abs(s_learned - 1.0) < 0.1 and abs(s_frozen - 0.25) < 0.05, (s_learned, s_frozen)


# ------------------------------------------------------------------------- config, train


def _config(**quant_keys):
    c = default_config()
    for k, v in quant_keys.items():
        c.quant[k] = v
    return c


def test_config_builds_the_chosen_quantizer():
    params = {"conv": {"kernel": np.ones((3, 3, 2, 4), np.float32) * np.arange(4)}}
    c = load_config(
        CONFIGS / "tiny.py", ["--config.quant.method=uniform", "--config.quant.scale=minmax"]
    )
    state = builders.build_quantizer(c, 2).init(params)
    assert isinstance(state, uniform.UniformState)
    np.testing.assert_array_equal(state.codebooks["conv"]["kernel"], [0, 1, 2, 3])
    c = _config(method="uniform", symmetric=True, scale="minmax")
    state = builders.build_quantizer(c, 2).init(params)
    assert float(state.zeros["conv"]["kernel"]) == 1.5
    assert builders.build_quantizer(default_config(), 2).init.__qualname__.startswith(
        "kmeans_quantizer."
    )
    assert not builders.learns_quantizer(default_config())
    assert builders.learns_quantizer(_config(method="uniform", learn_scale=True))


@pytest.mark.parametrize(
    "keys,match",
    [
        ({"method": "lloyd"}, r"config\.quant\.method='lloyd'.*'kmeans' or 'uniform'"),
        ({"method": "uniform", "scale": "max"}, r"config\.quant\.scale='max'.*'minmax', 'mse'"),
        ({"learn_scale": True}, r"config\.quant\.learn_scale.*method='uniform'"),
        ({"method": "uniform", "learn_centroids": True}, r"learn_centroids.*method='kmeans'"),
    ],
)
def test_bad_quant_config_names_the_key(keys, match):
    with pytest.raises(ConfigError, match=match):
        builders.build_quantizer(_config(**keys), 2)


def test_bad_scale_argument_is_named():
    with pytest.raises(ValueError, match="scale='max'"):
        uniform.uniform_quantizer(quant.default_rules(2), scale="max")


class _Encoder(nn.Module):  # the train_step interface: params + batch_stats
    n_mels: int = 4
    embed_dim: int = 6

    @nn.compact
    def __call__(self, x, train):
        h = nn.Dense(self.embed_dim, name="proj")(x.mean(axis=1))
        return nn.BatchNorm(use_running_average=not train, name="bn")(h)


class _Head(nn.Module):
    @nn.compact
    def __call__(self, emb, labels, margin):
        logits = nn.Dense(3, name="cls")(emb)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, logits


def test_train_step_trains_the_scales_and_keeps_levels_in_sync():
    encoder, head, tx = _Encoder(), _Head(), optax.adam(1e-2)
    rng = np.random.default_rng(10)
    feats = jnp.asarray(rng.normal(size=(8, 5, 4)), jnp.float32)
    batch = {"feats": feats, "labels": jnp.asarray(rng.integers(0, 3, 8), jnp.int32)}
    variables = encoder.init(jax.random.key(0), feats, train=False)
    params = {
        "encoder": variables["params"],
        "head": head.init(jax.random.key(1), jnp.zeros((2, 6)), jnp.zeros(2, jnp.int32), 0.0)[
            "params"
        ],
    }
    state = builders.TrainState(
        jnp.zeros((), jnp.int32), params, variables["batch_stats"], None, ()
    )
    qz = uniform.uniform_quantizer(quant.default_rules(2), learn_scale=True)
    state = builders.with_codebooks(state, qz, tx, learn=True)
    kw = {"encoder": encoder, "head": head, "tx": tx, "margin": 0.0, "margin_warmup_steps": 0}
    step = jax.jit(lambda st, b: train.train_step(st, b, quantizer=qz, learn_quantizer=True, **kw))
    new = state
    for _ in range(3):
        new, metrics = step(new, batch)
    assert np.isfinite(float(metrics["loss"]))
    s0 = float(state.qstate.scales["proj"]["kernel"])
    s1 = float(new.qstate.scales["proj"]["kernel"])
    assert s1 != s0
    z = np.asarray(new.qstate.zeros["proj"]["kernel"], np.float32)
    np.testing.assert_array_equal(
        new.qstate.codebooks["proj"]["kernel"],
        np.float32(s1) * (np.arange(4, dtype=np.float32) - z),
    )
