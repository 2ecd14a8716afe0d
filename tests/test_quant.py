"""sqjax.quant: rules, STE gradients, vmap over precisions, and training any Flax/JAX model."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from sqjax import quant

# ------------------------------------------------------------------------------ helpers


def _mlp_params(seed=0, din=8, hidden=32, dout=4):
    rng = np.random.default_rng(seed)
    return {
        "hidden": {
            "kernel": rng.normal(0, din**-0.5, (din, hidden)).astype(np.float32),
            "bias": np.zeros(hidden, np.float32),
        },
        "out": {
            "kernel": rng.normal(0, hidden**-0.5, (hidden, dout)).astype(np.float32),
            "bias": np.zeros(dout, np.float32),
        },
    }


def _mlp(p, x):
    h = jnp.tanh(x @ p["hidden"]["kernel"] + p["hidden"]["bias"][None, :])
    return h @ p["out"]["kernel"] + p["out"]["bias"][None, :]


def _data(seed=1, n=64, din=8, dout=4):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, din)).astype(np.float32)
    teacher = _mlp_params(seed + 100, din=din, dout=dout)
    return x, np.asarray(_mlp(teacher, x))


def _loss(p, x, y):
    return jnp.mean((_mlp(p, x) - y) ** 2)


def _nearest(w, cb):
    """NumPy reference: nearest-centroid indices (cb sorted)."""
    return np.argmin(
        np.abs(np.asarray(w, np.float64)[..., None] - np.asarray(cb, np.float64)), axis=-1
    )


def _assert_on_codebooks(qparams, state):
    for q, cb in zip(
        jax.tree.leaves(qparams), jax.tree.leaves(state.codebooks, is_leaf=lambda x: x is None)
    ):
        if cb is None:
            continue
        cb = np.asarray(cb)
        q = np.asarray(q)
        if cb.ndim == 1:
            assert set(np.unique(q)) <= set(cb.tolist())
        else:
            for c in range(cb.shape[0]):
                assert set(np.unique(q[..., c])) <= set(cb[c].tolist())


# -------------------------------------------------------------------------------- rules


@pytest.mark.parametrize("bits", [0, 9, -1, True, 2.0, "4"])
def test_rule_rejects_bad_bits(bits):
    with pytest.raises(ValueError, match=r"bits must be an int in 1\.\.8, or None"):
        quant.Rule("kernel$", bits=bits)


def test_rule_rejects_bad_regex_and_min_size():
    with pytest.raises(ValueError, match="not a valid regular expression.*re.escape"):
        quant.Rule("conv(1", bits=2)
    with pytest.raises(ValueError, match="min_size"):
        quant.Rule("kernel", bits=2, min_size=-1)


def test_first_match_wins_keep_float_and_min_size():
    params = {
        "encoder": {
            "conv": {"kernel": np.ones((3, 3, 2, 4), np.float32)},
            "bn": {"scale": np.ones(4, np.float32)},
            "dense": {"kernel": np.ones((16, 8), np.float32)},
            "tiny": {"kernel": np.ones((2, 2), np.float32)},
        },
        "head": {"kernel": np.ones((8, 3), np.float32)},
        "step": np.int32(0),
    }
    rules = (
        quant.Rule("head/", None),
        quant.Rule("encoder/dense/", 4),
        quant.Rule("tiny", 2, min_size=5),
    ) + quant.default_rules(2)
    got = {p.path: (p.rule, p.bits) for p in quant.plan(params, rules)}
    assert got == {
        "encoder/bn/scale": (None, None),
        "encoder/conv/kernel": (3, 2),
        "encoder/dense/kernel": (1, 4),  # rule 1 matched before the default rule
        "encoder/tiny/kernel": (2, None),  # 4 elements < min_size
        "head/kernel": (0, None),  # kept float
        "step": (None, None),
    }
    table = quant.format_plan(quant.plan(params, rules))
    assert "encoder/dense/kernel" in table and "total: 2/6 leaves quantized" in table


def test_per_channel_rule_needs_a_kernel():
    with pytest.raises(ValueError, match="per-channel needs a kernel"):
        quant.plan({"bias": np.ones(4, np.float32)}, (quant.Rule("bias", 2, per_channel=True),))


def test_plan_sizes():
    params = {"a": {"kernel": np.ones((10, 6), np.float32)}}
    (p,) = quant.plan(params, (quant.Rule("kernel", 3, per_channel=True),))
    assert (p.size, p.bits, p.n_codebooks) == (60, 3, 6)
    assert quant.packed_bits(p.size, p.bits, p.n_codebooks) == 60 * 3 + 6 * 8 * 32


def test_packed_bits_of_codebooks_and_grids_by_hand():
    assert quant.packed_bits(100, 3) == 300 + 8 * 32  # one float32 codebook of 8
    assert quant.packed_bits(100, 3, 4) == 300 + 4 * 8 * 32
    assert quant.packed_bits(100, 3, 4, group_bits=40) == 300 + 4 * 40  # scale + zero point
    assert quant.packed_bits(100, None, 4, group_bits=40) == 3200
    assert quant.KMeansQuantizer is quant.Quantizer  # the old name still works


def test_paths_for_linen_nnx_and_plain_dicts():
    class Linen(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2, name="out")(nn.Dense(3, name="hidden")(x))

    lin = Linen().init(jax.random.PRNGKey(0), jnp.ones((1, 4)))["params"]
    assert [p.path for p in quant.plan(lin, ())] == [
        "hidden/bias",
        "hidden/kernel",
        "out/bias",
        "out/kernel",
    ]

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(4, 3, rngs=rngs), nnx.Linear(3, 2, rngs=rngs)])

    _, state = nnx.split(Net(nnx.Rngs(0)))
    assert [p.path for p in quant.plan(state, ())] == [
        "layers/0/bias",
        "layers/0/kernel",
        "layers/1/bias",
        "layers/1/kernel",
    ]

    keypaths = [kp for kp, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert quant.path_parts(keypaths[1]) == ["layers", 0, "kernel"]  # index stays an int

    plain = {"blocks": [{"w": np.ones(2)}, {"w": np.ones(2)}]}
    assert [p.path for p in quant.plan(plain, ())] == ["blocks/0/w", "blocks/1/w"]
    keypaths = [kp for kp, _ in jax.tree_util.tree_flatten_with_path(plain)[0]]
    assert [quant.path_parts(kp) for kp in keypaths] == [["blocks", 0, "w"], ["blocks", 1, "w"]]


# ---------------------------------------------------------------------------- quantizer


def test_apply_is_nearest_centroid_per_tensor_and_per_channel():
    params = _mlp_params()
    qz = quant.kmeans_quantizer(
        (quant.Rule("out/kernel", 3, per_channel=True),) + quant.default_rules(2)
    )
    state = qz.init(params)
    cb = state.codebooks
    assert cb["hidden"]["kernel"].shape == (4,) and cb["out"]["kernel"].shape == (4, 8)
    assert cb["hidden"]["bias"] is None
    q = qz.apply(params, state)
    w, c = params["hidden"]["kernel"], np.asarray(cb["hidden"]["kernel"])
    np.testing.assert_array_equal(q["hidden"]["kernel"], c[_nearest(w, c)])
    w, c = params["out"]["kernel"], np.asarray(cb["out"]["kernel"])
    ref = np.stack([c[j][_nearest(w[:, j], c[j])] for j in range(w.shape[1])], axis=1)
    np.testing.assert_array_equal(q["out"]["kernel"], ref)
    np.testing.assert_array_equal(q["hidden"]["bias"], params["hidden"]["bias"])


@pytest.mark.parametrize("per_channel,learn", [(False, False), (True, False), (False, True)])
def test_ste_gradient_is_the_gradient_at_the_quantized_weights(per_channel, learn):
    """d loss(apply(w)) / dw equals d loss / dq taken at q = apply(w), and is not zero."""
    params, (x, y) = _mlp_params(), _data()
    qz = quant.kmeans_quantizer(
        quant.default_rules(2, per_channel=per_channel), learn_centroids=learn
    )
    state = qz.init(params)
    qparams = jax.tree.map(jnp.asarray, qz.apply(params, state))
    assert len(np.unique(qparams["hidden"]["kernel"])) <= (4 * 32 if per_channel else 4)
    g_ste = jax.grad(lambda p: _loss(qz.apply(p, state), x, y))(params)
    g_ref = jax.grad(_loss)(qparams, x, y)
    chex.assert_trees_all_close(g_ste, g_ref, rtol=1e-6, atol=1e-7)
    for layer in ("hidden", "out"):
        assert np.count_nonzero(g_ste[layer]["kernel"]) > 0.9 * g_ste[layer]["kernel"].size


def test_codebook_indices_match_numpy_for_unsorted_codebooks():
    rng = np.random.default_rng(3)
    w = rng.normal(size=(5, 6)).astype(np.float32)
    cb = np.array([0.5, -1.0, 1.5, 0.0], np.float32)  # unsorted, as learned ones can be
    np.testing.assert_array_equal(quant.codebook_indices(w, cb), _nearest(w, cb))
    cbc = rng.normal(size=(6, 4)).astype(np.float32)
    ref = np.stack([_nearest(w[:, j], cbc[j]) for j in range(6)], axis=1)
    np.testing.assert_array_equal(quant.codebook_indices(w, cbc), ref)


@pytest.mark.parametrize("per_channel", [False, True])
def test_learned_centroid_gradient_is_sum_of_member_gradients(per_channel):
    params, (x, y) = _mlp_params(), _data()
    qz = quant.kmeans_quantizer(
        quant.default_rules(2, per_channel=per_channel), learn_centroids=True
    )
    state = qz.init(params)
    qparams = qz.apply(params, state)
    g_w = jax.grad(_loss)(qparams, x, y)
    g_cb = jax.grad(lambda s: _loss(qz.apply(params, s), x, y))(state).codebooks
    for layer in ("hidden", "out"):
        w, cb, g = (
            params[layer]["kernel"],
            np.asarray(state.codebooks[layer]["kernel"]),
            np.asarray(g_w[layer]["kernel"]),
        )
        if per_channel:
            ref = np.stack(
                [
                    np.bincount(_nearest(w[:, j], cb[j]), g[:, j], minlength=4)
                    for j in range(w.shape[1])
                ]
            )
        else:
            ref = np.bincount(_nearest(w, cb).ravel(), g.ravel(), minlength=4)
        np.testing.assert_allclose(g_cb[layer]["kernel"], ref, rtol=1e-5, atol=1e-7)
    # and without learn_centroids the codebooks get no gradient
    frozen = quant.kmeans_quantizer(quant.default_rules(2, per_channel=per_channel))
    g0 = jax.grad(lambda s: _loss(frozen.apply(params, s), x, y))(state).codebooks
    assert all(not np.any(np.asarray(v)) for v in jax.tree.leaves(g0))


def _owned(w, cb):
    """Weights owned by each centroid of a sorted (K,) codebook (NumPy argmin)."""
    return np.bincount(_nearest(w, cb).ravel(), minlength=len(cb))


def test_update_reseeds_a_dead_centroid():
    params = _mlp_params()
    qz = quant.kmeans_quantizer(quant.default_rules(2), refresh_iters=5)
    state = qz.init(params)
    cb = np.asarray(state.codebooks["hidden"]["kernel"]).copy()
    cb[-1] = 50.0  # owns no weight
    dead = quant.QuantizerState({**state.codebooks, "hidden": {"kernel": cb, "bias": None}})
    w = params["hidden"]["kernel"]
    assert _owned(w, cb)[-1] == 0
    for update in (qz.update, jax.jit(qz.update)):
        new = np.asarray(
            update(jax.tree.map(jnp.asarray, params), dead).codebooks["hidden"]["kernel"]
        )
        assert np.all(np.diff(new) >= 0) and np.all(_owned(w, new) >= 1), new
        err = lambda c: np.mean((w - c[_nearest(w, c)]) ** 2)
        assert err(new) < err(cb)


def test_update_keeps_learned_centroids_and_only_reseeds():
    """learn_centroids: update does no Lloyd; learned values stay (sorted), and a dead
    centroid goes to the weight farthest from its centroid in the cluster of largest
    squared error (NumPy reference)."""
    params = _mlp_params()
    qz = quant.kmeans_quantizer(quant.default_rules(2), learn_centroids=True)
    state = qz.init(params)
    w = params["hidden"]["kernel"]
    learned = np.asarray(state.codebooks["hidden"]["kernel"]) * 1.1 + 0.01  # not a Lloyd fit
    cbs = {**state.codebooks, "hidden": {"kernel": learned[::-1].copy(), "bias": None}}
    new = qz.update(params, quant.QuantizerState(cbs)).codebooks
    np.testing.assert_array_equal(new["hidden"]["kernel"], learned)  # sorted, unchanged
    np.testing.assert_array_equal(new["out"]["kernel"], state.codebooks["out"]["kernel"])
    live = learned[:3]
    cbs["hidden"]["kernel"] = np.append(live, -50.0).astype(np.float32)
    new = np.asarray(qz.update(params, quant.QuantizerState(cbs)).codebooks["hidden"]["kernel"])
    idx = _nearest(w, live).ravel()
    err = (w.ravel().astype(np.float64) - live[idx]) ** 2
    worst = np.argmax(np.bincount(idx, err, minlength=3))
    far = w.ravel()[idx == worst][np.argmax(err[idx == worst])]
    np.testing.assert_array_equal(new, np.sort(np.append(live, far)))
    assert np.all(_owned(w, new) >= 1)


def test_learned_centroids_train_faster_than_frozen():
    """Linear regression onto a teacher whose weights lie outside the student's initial
    range: 2-bit frozen codebooks cannot reach them, learned ones can. The optimizer sees
    {"w": latent weights, "cb": codebooks}; update() every 25 steps, as in training."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(128, 16)), jnp.float32)
    teacher = rng.choice(np.array([-1.5, -0.5, 0.5, 1.5], np.float32), size=(16, 4))
    y = x @ teacher
    w0 = {"dense": {"kernel": jnp.asarray(rng.normal(0, 0.25, (16, 4)), jnp.float32)}}

    def train(learn, steps=150):
        qz = quant.kmeans_quantizer(quant.default_rules(2), learn_centroids=learn)
        tx = optax.adam(2e-2)
        p = {"w": w0, "cb": qz.init(w0).codebooks}
        opt = tx.init(p)

        def loss_fn(p):
            qw = qz.apply(p["w"], quant.QuantizerState(p["cb"]))
            return jnp.mean((x @ qw["dense"]["kernel"] - y) ** 2)

        @jax.jit
        def step(p, opt):
            upd, opt = tx.update(jax.grad(loss_fn)(p), opt, p)
            return optax.apply_updates(p, upd), opt

        for i in range(steps):
            p, opt = step(p, opt)
            if learn and i % 25 == 24:
                p = {**p, "cb": qz.update(p["w"], quant.QuantizerState(p["cb"])).codebooks}
        return float(loss_fn(p)), p

    frozen, p_frozen = train(False)
    learned, p_learned = train(True)
    chex.assert_trees_all_equal(
        p_frozen["cb"], quant.kmeans_quantizer(quant.default_rules(2)).init(w0).codebooks
    )
    assert learned < 0.1 * frozen, (learned, frozen)
    # the learned codebook found the teacher's levels
    np.testing.assert_allclose(p_learned["cb"]["dense"]["kernel"], [-1.5, -0.5, 0.5, 1.5], atol=0.1)


def test_vmap_over_stacked_precisions_equals_loop():
    params, (x, _) = _mlp_params(), _data()
    bits = (1, 2, 4, None)
    stacked = quant.ptq_stack(params, bits)
    out = jax.vmap(_mlp, in_axes=(0, None))(stacked, x)
    for i, b in enumerate(bits):
        p = params if b is None else quant.quantize_params(params, b)
        np.testing.assert_allclose(out[i], _mlp(p, x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[-1], _mlp(params, x), rtol=1e-6, atol=1e-6)  # FP32 entry
    with pytest.raises(ValueError, match="same tree structure"):
        quant.stack_precisions([params, {"hidden": params["hidden"]}])


def test_state_stacks_vmaps_and_checkpoints(tmp_path):
    import orbax.checkpoint as ocp

    params, (x, _) = _mlp_params(), _data()
    qz = quant.kmeans_quantizer(quant.default_rules(2))
    s1, s2 = qz.init(params), qz.init(_mlp_params(seed=3))
    both = jax.tree.map(lambda *a: jnp.stack(a), s1, s2)
    out = jax.vmap(lambda s: _mlp(qz.apply(params, s), x))(both)
    np.testing.assert_allclose(out[1], _mlp(qz.apply(params, s2), x), rtol=1e-5, atol=1e-6)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "qstate", s1)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "qstate", jax.tree.map(ocp.utils.to_shape_dtype_struct, s1))
    ckpt.close()
    chex.assert_trees_all_equal(restored, s1)


def test_quantize_params_rule_arguments():
    params = _mlp_params()
    with pytest.raises(ValueError, match="function of bits"):
        quant.quantize_params(params, 2, quant.default_rules(2))
    keep_out = lambda b: (quant.Rule("out/", None),) + quant.default_rules(b)
    q = quant.quantize_params(params, 2, keep_out)
    assert len(np.unique(q["hidden"]["kernel"])) == 4
    np.testing.assert_array_equal(q["out"]["kernel"], params["out"]["kernel"])


def test_nan_weight_raises_naming_the_leaf():
    params = _mlp_params()
    params["out"]["kernel"][1, 2] = np.nan
    with pytest.raises(ValueError, match="'out/kernel'.*NaN/inf"):
        quant.kmeans_quantizer(quant.default_rules(2)).init(params)


def test_distortion_report_matches_numpy():
    params = _mlp_params()
    qz = quant.kmeans_quantizer(quant.default_rules(2))
    state = qz.init(params)
    q = qz.apply(params, state)
    rep = quant.distortion_report(params, q, state)
    assert set(rep) == {"hidden/kernel", "out/kernel"}
    w, qw = params["out"]["kernel"].astype(np.float64), np.asarray(q["out"]["kernel"], np.float64)
    rel = np.sum((w - qw) ** 2) / np.sum(w**2)
    np.testing.assert_allclose(rep["out/kernel"].rel_sq_error, rel, rtol=1e-9)
    np.testing.assert_allclose(rep["out/kernel"].sqnr_db, -10 * np.log10(rel), rtol=1e-9)
    assert set(quant.distortion_report(params, q)) == set(rep)  # without state: changed leaves


def test_apply_and_update_compile_once():
    params = _mlp_params()
    qz = quant.kmeans_quantizer(quant.default_rules(2))
    state = qz.init(params)
    chex.clear_trace_counter()
    # qz.apply is jitted itself: chex counts the traces of a plain function around it.
    apply = jax.jit(chex.assert_max_traces(lambda p, s: qz.apply(p, s), n=1))
    update = jax.jit(chex.assert_max_traces(qz.update, n=1))
    for seed in range(3):
        p = jax.tree.map(jnp.asarray, _mlp_params(seed))
        state = update(p, state)
        apply(p, state)
        qz.apply(p, state)  # called eagerly: its own jit, compiled once
    assert qz.apply._cache_size() == 1


def test_update_under_jit_refreshes_like_eager():
    params = _mlp_params()
    qz = quant.kmeans_quantizer(quant.default_rules(4), refresh_iters=5)
    state = qz.init(params)
    moved = jax.tree.map(lambda w: w * 1.3 + 0.01, params)
    eager = qz.update(moved, state)
    jitted = jax.jit(qz.update)(jax.tree.map(jnp.asarray, moved), state)
    chex.assert_trees_all_close(eager, jitted, rtol=1e-5, atol=1e-6)
    before = quant.distortion_report(moved, qz.apply(moved, state), state)
    after = quant.distortion_report(moved, qz.apply(moved, eager), eager)
    for path in before:
        assert after[path].rel_sq_error < before[path].rel_sq_error


# ----------------------------------------------------------------- QAT on various models


def _train(loss_fn, params, qz, steps=40, lr=1e-2):
    """Few optax steps of QAT: loss at quantized weights, STE, codebook refresh."""
    tx = optax.adam(lr)
    state, opt = qz.init(params), tx.init(params)

    @jax.jit
    def step(params, opt, state):
        loss, g = jax.value_and_grad(lambda p: loss_fn(qz.apply(p, state)))(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    refresh = jax.jit(qz.update)
    losses = []
    for i in range(steps):
        params, opt, loss = step(params, opt, state)
        losses.append(float(loss))
        if i % 10 == 9:
            state = refresh(params, state)
    return params, state, losses


def test_qat_plain_dict():
    (x, y), params = _data(), _mlp_params(seed=5)
    qz = quant.kmeans_quantizer(quant.default_rules(2))
    params, state, losses = _train(lambda p: _loss(p, x, y), jax.tree.map(jnp.asarray, params), qz)
    assert losses[-1] < 0.7 * losses[0]
    _assert_on_codebooks(qz.apply(params, state), state)


def test_qat_flax_linen_model():
    class Block(nn.Module):  # a tiny transformer-style block: attention + MLP
        @nn.compact
        def __call__(self, x):
            x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, name="attn")(
                nn.LayerNorm(name="ln1")(x)
            )
            h = nn.Dense(16, name="mlp_in")(nn.LayerNorm(name="ln2")(x))
            return nn.Dense(4, name="mlp_out")(nn.gelu(h)).mean(axis=1)

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(16, 5, 8)).astype(np.float32))
    y = jnp.asarray(rng.normal(size=(16, 4)).astype(np.float32))
    model = Block()
    params = model.init(jax.random.PRNGKey(0), x)["params"]
    qz = quant.kmeans_quantizer(quant.default_rules(2))
    quantized = [p.path for p in qz.plan(params) if p.bits]
    assert (
        "attn/query/kernel" in quantized
        and "mlp_out/kernel" in quantized
        and "ln1/scale" not in quantized
    )
    params, state, losses = _train(
        lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2), params, qz
    )
    assert losses[-1] < 0.7 * losses[0]
    _assert_on_codebooks(qz.apply(params, state), state)


def test_qat_flax_nnx_state():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(8, 32, rngs=rngs)
            self.out = nnx.Linear(32, 4, rngs=rngs)

        def __call__(self, x):
            return self.out(jnp.tanh(self.hidden(x)))

    (x, y) = _data()
    graphdef, params = nnx.split(Net(nnx.Rngs(0)))
    qz = quant.kmeans_quantizer(quant.default_rules(2))
    loss = lambda p: jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)
    params, state, losses = _train(loss, params, qz)
    assert isinstance(state.codebooks, nnx.State)
    assert losses[-1] < 0.7 * losses[0]
    _assert_on_codebooks(qz.apply(params, state), state)


def test_apply_on_sharded_params_equals_unsharded():
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    rng = np.random.default_rng(0)
    params = {
        "dense": {
            "kernel": jnp.asarray(rng.laplace(size=(16, 8)), jnp.float32),
            "bias": jnp.zeros((1, 8)),
        }
    }
    q = quant.kmeans_quantizer(quant.default_rules(2))
    state = q.init(params)
    mesh = Mesh(np.array(jax.devices()[:2]), ("model",))
    sharded = jax.device_put(params, NamedSharding(mesh, P(None, "model")))
    out = jax.jit(q.apply)(sharded, state)
    np.testing.assert_array_equal(
        np.asarray(out["dense"]["kernel"]), np.asarray(q.apply(params, state)["dense"]["kernel"])
    )
    assert out["dense"]["kernel"].sharding.spec == P(None, "model")
