"""Tests for sqjax.models: geometry against WeSpeaker's published numbers, and the AAM head
against an independent NumPy ArcFace computation."""

import functools
import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sqjax.cpu import fused as cpu_fused
from sqjax.cpu import native
from sqjax.models import (
    AUTO_SLICE,
    POOL_EPS,
    PRESETS,
    AAMSoftmax,
    ResNet,
    build_encoder,
    count_params,
    encoder_macs,
    encoder_macs_by_layer,
    encoder_segments,
    training_compiler_options,
)


@pytest.fixture(autouse=True)
def _strict_rank_promotion():
    with jax.numpy_rank_promotion("raise"):
        yield


@pytest.fixture(scope="module")
def tiny():
    model = build_encoder("resnet_tiny")
    x = jax.random.normal(jax.random.key(1), (3, 40, 80))
    return model, x, jax.jit(model.init)(jax.random.key(0), x)


# --- parameter counts (eval_shape: no memory) ------------------------------------------


@pytest.mark.parametrize(
    "name, published, tol",
    [
        ("resnet34", 6.63e6, 0.01),  # WeSpeaker model zoo, without the classifier
        ("resnet221", 23.79e6, 0.01),
        ("resnet293", 28.62e6, 0.01),
        ("resnet36", 6.9e6, 0.02),  # PAPER.md "about"
        ("resnet200", 20.9e6, 0.02),
    ],
)
def test_param_counts_match_published(name, published, tol):
    assert abs(count_params(build_encoder(name)) / published - 1) < tol


def test_param_count_resnet34_exact_by_hand():
    # Independent count: conv kernels + BN (scale, bias) + embedding Dense with bias.
    w, n = 32, 0
    n += 9 * 1 * w + 2 * w
    c_in = w
    for i, blocks in enumerate([3, 4, 6, 3]):
        c = w * 2**i
        for j in range(blocks):
            n += 9 * c_in * c + 2 * c + 9 * c * c + 2 * c
            if c_in != c or (i > 0 and j == 0):
                n += c_in * c + 2 * c
            c_in = c
    n += 2 * 256 * 10 * 256 + 256
    assert count_params(build_encoder("resnet34")) == n == 6_634_336


def test_unknown_preset_lists_presets():
    with pytest.raises(ValueError, match="resnet34"):
        build_encoder("resnet35")


def test_wrong_feature_dim_raises(tiny):
    model, _, variables = tiny
    with pytest.raises(ValueError, match="n_mels"):
        model.apply(variables, jnp.zeros((2, 40, 64)))


# --- forward pass -----------------------------------------------------------------------


@pytest.mark.parametrize("frames", [17, 64])
def test_output_shape_variable_length(tiny, frames):
    model, _, variables = tiny
    y = model.apply(variables, jnp.ones((2, frames, 80)))
    assert y.shape == (2, 32) and y.dtype == jnp.float32
    assert np.isfinite(np.asarray(y)).all()


def test_train_updates_batch_stats_eval_is_deterministic(tiny):
    model, x, variables = tiny
    y, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
    assert y.shape == (3, 32)
    before = variables["batch_stats"]["stem_bn"]["mean"]
    after = updates["batch_stats"]["stem_bn"]["mean"]
    assert not np.allclose(before, after)
    # Running mean follows PyTorch's momentum 0.1: 0.9 * old + 0.1 * batch mean.
    x_img = np.asarray(x).transpose(0, 2, 1)[..., None]
    kernel = np.asarray(variables["params"]["stem_conv"]["kernel"])  # (3, 3, 1, C)
    pad = np.pad(x_img, ((0, 0), (1, 1), (1, 1), (0, 0)))
    conv = sum(
        pad[:, a : a + 80, b : b + 40, :] * kernel[a, b, 0] for a in range(3) for b in range(3)
    )
    np.testing.assert_allclose(after, 0.1 * conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    y1 = model.apply(variables, x)
    y2 = model.apply(variables, x)
    np.testing.assert_array_equal(y1, y2)


def test_statistics_pooling_matches_numpy(tiny):
    # Capture the last block's output (B, F', T', C) and the embedding layer's input.
    model, x, variables = tiny
    seen = {}

    def capture(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.module.name == "layer4_0":
            seen["fmap"] = np.asarray(out)
        if context.module.name == "embedding":
            seen["stats"] = np.asarray(args[0])
        return out

    with nn.intercept_methods(capture):
        model.apply(variables, x)
    fmap = seen["fmap"]  # (3, 10, 5, 32): 80 mels and 40 frames after three stride-2 stages
    assert fmap.shape == (3, 10, 5, 32)
    frames = fmap.transpose(0, 2, 3, 1).reshape(3, 5, 32 * 10)  # channel-major (C, F')
    expected = np.concatenate([frames.mean(1), np.sqrt(frames.var(1) + POOL_EPS)], axis=1)
    np.testing.assert_allclose(seen["stats"], expected, rtol=1e-5, atol=1e-6)


def test_embedding_is_pure_function_of_variables(tiny):
    model, x, v0 = tiny
    v1 = jax.jit(model.init)(jax.random.key(7), x)
    v1 = jax.tree.map(lambda a: a + 0.1, v1)  # also non-trivial BN statistics
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), v0, v1)
    ys = jax.jit(jax.vmap(lambda v: model.apply(v, x)))(stacked)
    apply = jax.jit(model.apply)
    chex.assert_trees_all_close(ys[0], apply(v0, x), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(ys[1], apply(v1, x), rtol=1e-5, atol=1e-5)
    assert not np.allclose(ys[0], ys[1])


def test_bfloat16_compute_keeps_float32_params_and_output(tiny):
    _, x, variables = tiny
    model = build_encoder("resnet_tiny", dtype=jnp.bfloat16)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes["params"]))
    y = jax.jit(model.apply)(variables, x)
    assert y.dtype == jnp.float32
    # bf16 trunk stays close to the float32 embedding (3 significant digits per op).
    y32 = jax.jit(build_encoder("resnet_tiny").apply)(variables, x)
    assert np.corrcoef(np.ravel(y), np.ravel(y32))[0, 1] > 0.99


def test_parameter_paths_are_stable(tiny):
    _, _, variables = tiny
    paths = {
        "/".join(k.key for k in path)
        for path, _ in jax.tree_util.tree_leaves_with_path(variables["params"])
    }
    for expected in [
        "stem_conv/kernel",
        "stem_bn/scale",
        "stem_bn/bias",
        "layer1_0/conv1/kernel",
        "layer1_0/bn2/scale",
        "layer2_0/shortcut_conv/kernel",
        "layer2_0/shortcut_bn/scale",
        "layer4_0/conv2/kernel",
        "embedding/kernel",
        "embedding/bias",
    ]:
        assert expected in paths, expected
    assert "layer1_0/shortcut_conv/kernel" not in paths  # same shape: identity shortcut
    assert not any("bias" in p for p in paths if "conv" in p)  # convs have no bias
    bottleneck = ResNet((1, 1, 1, 1), block="bottleneck", width=4, embed_dim=8)
    shapes = jax.eval_shape(bottleneck.init, jax.random.key(0), jnp.zeros((1, 16, 80)))
    blk = shapes["params"]["layer1_0"]
    assert blk["conv3"]["kernel"].shape == (1, 1, 4, 16)
    assert blk["shortcut_conv"]["kernel"].shape == (1, 1, 4, 16)  # 4 -> 16 channels


# --- MACs ----------------------------------------------------------------------------------


def test_encoder_macs_tiny_by_hand():
    model = ResNet((1, 1, 1, 1), width=4, embed_dim=32, n_mels=16)
    # 16 frames x 16 mels; stages at 16x16, 8x8, 4x4, 2x2 positions.
    expected = {
        "stem_conv": 256 * 9 * 1 * 4,
        "layer1_0/conv1": 256 * 9 * 4 * 4,
        "layer1_0/conv2": 256 * 9 * 4 * 4,
        "layer2_0/conv1": 64 * 9 * 4 * 8,
        "layer2_0/conv2": 64 * 9 * 8 * 8,
        "layer2_0/shortcut_conv": 64 * 4 * 8,
        "layer3_0/conv1": 16 * 9 * 8 * 16,
        "layer3_0/conv2": 16 * 9 * 16 * 16,
        "layer3_0/shortcut_conv": 16 * 8 * 16,
        "layer4_0/conv1": 4 * 9 * 16 * 32,
        "layer4_0/conv2": 4 * 9 * 32 * 32,
        "layer4_0/shortcut_conv": 4 * 16 * 32,
        "embedding": (2 * 32 * 2) * 32,  # mean and std of 32 channels x 2 freq bins
    }
    assert encoder_macs_by_layer(model, n_frames=16) == expected
    assert encoder_macs(model, n_frames=16) == sum(expected.values())


def test_encoder_macs_resnet34_near_wespeaker_figure():
    # WeSpeaker quotes 4.55 G(FLOPs, in fact MACs, via thop) for 2 s = 200 frames.
    macs = encoder_macs(build_encoder("resnet34"), n_frames=200)
    assert abs(macs / 4.55e9 - 1) < 0.01


def _hand_param_count(stage_sizes, block, width, embed_dim, n_mels):
    """Conv kernels + BN (scale, bias) + embedding Dense, from the ResNet geometry alone."""
    expansion = {"basic": 1, "bottleneck": 4}[block]
    n = 9 * 1 * width + 2 * width  # stem
    c_in, freq = width, n_mels
    for i, blocks in enumerate(stage_sizes):
        p = width * 2**i
        c_out = expansion * p
        for j in range(blocks):
            stride = 2 if i > 0 and j == 0 else 1
            if block == "basic":
                n += 9 * c_in * p + 2 * p + 9 * p * p + 2 * p
            else:  # 1x1 reduce, 3x3, 1x1 expand
                n += c_in * p + 2 * p + 9 * p * p + 2 * p + p * c_out + 2 * c_out
            if stride != 1 or c_in != c_out:
                n += c_in * c_out + 2 * c_out  # 1x1 projection shortcut
            if stride == 2:
                freq = (freq + 1) // 2  # 3x3, stride 2, padding 1
            c_in = c_out
    return n + 2 * c_in * freq * embed_dim + embed_dim  # mean and std of (C, F') -> Dense


PRESET_GEOMETRY = [  # name, depth, block, width, embed_dim
    ("resnet34", 34, "basic", 32, 256),
    ("resnet36", 36, "basic", 32, 256),
    ("resnet200", 200, "bottleneck", 32, 256),
    ("resnet221", 221, "bottleneck", 32, 256),
    ("resnet293", 293, "bottleneck", 32, 256),
    ("resnet18", 18, "basic", 32, 256),
    ("resnet50", 50, "bottleneck", 32, 256),
    ("resnet101", 101, "bottleneck", 32, 256),
    ("resnet152", 152, "bottleneck", 32, 256),
    ("resnet_demo", 18, "basic", 16, 256),
    ("resnet_tiny", 10, "basic", 4, 32),
]


def test_every_preset_is_checked_by_hand():
    assert sorted(PRESETS) == sorted(case[0] for case in PRESET_GEOMETRY)


@pytest.mark.parametrize("name, depth, block, width, embed_dim", PRESET_GEOMETRY)
def test_presets_geometry_and_param_count_by_hand(name, depth, block, width, embed_dim):
    model = build_encoder(name)
    assert (model.block, model.width, model.embed_dim) == (block, width, embed_dim)
    assert model.n_mels == 80 and len(model.stage_sizes) == 4
    # The name's depth: weighted layers = stem + convs per block x blocks + embedding.
    assert {"basic": 2, "bottleneck": 3}[block] * sum(model.stage_sizes) + 2 == depth
    assert count_params(model) == _hand_param_count(model.stage_sizes, block, width, embed_dim, 80)


# --- AAM-softmax head ----------------------------------------------------------------------


def _numpy_arcface(emb, kernel, labels, margin, scale):
    """Independent ArcFace: angles via arccos, margin added to the target angle."""
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    w = kernel / np.linalg.norm(kernel, axis=0, keepdims=True)
    cos = np.clip(e @ w, -1, 1)
    logits = scale * cos
    for i, y in enumerate(labels):
        theta = math.acos(cos[i, y])
        if theta + margin <= math.pi:
            logits[i, y] = scale * math.cos(theta + margin)
        else:  # WeSpeaker's continuous fallback beyond the threshold
            logits[i, y] = scale * (cos[i, y] - (1 - math.cos(margin)))
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(labels)), labels].mean(), logits


def _head_case():
    # Hand-checkable geometry: classes on the axes of the plane, embeddings at known angles.
    kernel = np.array([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])  # columns: 0, 90, 180 degrees
    angles = np.deg2rad([30.0, 100.0, 175.0, 10.0])
    emb = np.stack([np.cos(angles), np.sin(angles)], axis=1) * np.array([[1.0], [2.0], [0.5], [3]])
    labels = np.array([0, 1, 0, 2])  # the third sample is 175 deg from its class: > pi - m
    return emb, kernel, labels


@pytest.mark.parametrize("margin", [0.0, 0.2, 0.3])
def test_aam_softmax_matches_numpy(margin):
    emb, kernel, labels = _head_case()
    head = AAMSoftmax(num_classes=3, scale=32.0)
    variables = {"params": {"kernel": jnp.asarray(kernel, jnp.float32)}}
    loss, logits = jax.jit(head.apply)(
        variables, jnp.asarray(emb, jnp.float32), jnp.asarray(labels), jnp.float32(margin)
    )
    ref_loss, ref_logits = _numpy_arcface(emb, kernel, labels, margin, 32.0)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    # Hand check: first sample's target logit is 32 * cos(30 deg + m).
    np.testing.assert_allclose(logits[0, 0], 32 * math.cos(math.radians(30) + margin), rtol=1e-5)


def test_aam_softmax_margin_zero_is_normalized_softmax_and_grads_finite():
    emb, kernel, labels = _head_case()
    head = AAMSoftmax(num_classes=3)
    e, k = jnp.asarray(emb, jnp.float32), jnp.asarray(kernel, jnp.float32)
    cos = (e / jnp.linalg.norm(e, axis=1, keepdims=True)) @ (
        k / jnp.linalg.norm(k, axis=0, keepdims=True)
    )
    expected = -jax.nn.log_softmax(32 * cos)[jnp.arange(4), labels].mean()
    loss = head.apply({"params": {"kernel": k}}, e, labels, 0.0)[0]
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # Embedding exactly on its class (|cos| = 1): gradients must stay finite for any margin.
    grad = jax.jit(
        jax.grad(
            lambda k, m: head.apply({"params": {"kernel": k}}, k.T[:2], jnp.arange(2), m)[0],
            argnums=(0, 1),
        )
    )
    for m in (0.0, 0.2):
        assert all(np.isfinite(g).all() for g in jax.tree.leaves(grad(k, jnp.float32(m))))


def test_aam_softmax_init_kernel_shape():
    head = AAMSoftmax(num_classes=5)
    v = head.init(jax.random.key(0), jnp.ones((2, 32)), jnp.array([0, 4]), 0.2)
    assert v["params"]["kernel"].shape == (32, 5)


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_segments_chained_equal_the_whole_encoder(block):
    """The stem, each block and the head, applied one after another on their own
    variables, give the encoder's embeddings (non-trivial BatchNorm statistics)."""
    enc = ResNet(stage_sizes=(1, 2, 1, 1), block=block, width=4, embed_dim=8, n_mels=16)
    v = enc.init(jax.random.key(0), jnp.zeros((1, 40, 16)))
    stats = jax.tree.map(lambda a: a + 0.3 * jnp.cos(jnp.arange(a.size)).reshape(a.shape),
                         v["batch_stats"])  # fmt: skip
    v = {"params": v["params"], "batch_stats": stats}
    x = jax.random.normal(jax.random.key(1), (3, 57, 16))
    segments = encoder_segments(enc)
    assert [s.keys for s in segments] == [("stem_conv", "stem_bn")] + [
        (f"layer{i}_{j}",) for i, n in zip(range(1, 5), (1, 2, 1, 1)) for j in range(n)
    ] + [("embedding",)]
    h = x
    for s in segments:
        h = s.apply({c: {k: t[k] for k in s.keys if k in t} for c, t in v.items()}, h)
    np.testing.assert_allclose(h, enc.apply(v, x), rtol=1e-5, atol=1e-6)


def _random_batchnorm(variables, key):
    """BatchNorm scales, biases, means and variances drawn away from their init (1, 0, 0, 1)."""
    paths, tree = jax.tree_util.tree_flatten_with_path(variables)
    leaves = []
    for i, (path, leaf) in enumerate(paths):
        name, k = path[-1].key, jax.random.fold_in(key, i)
        if name in ("scale", "var"):
            leaf = jax.random.uniform(k, leaf.shape, minval=0.5, maxval=2.0)
        elif name in ("mean", "bias"):
            leaf = 0.3 * jax.random.normal(k, leaf.shape)
        leaves.append(leaf)
    return jax.tree_util.tree_unflatten(tree, leaves)


@pytest.mark.parametrize(
    "block, width, direct, winograd",
    [("basic", 16, 3, 3), ("bottleneck", 16, 2, 0)],  # 3x3 stride-1 convs of < / >= 32 ch
)
def test_fused_inference_equals_flax_layers(block, width, direct, winograd, monkeypatch):
    """models.conv_bn (BatchNorm folded, the epilogue in sqjax.cpu.native's kernels) against
    Flax's Conv and BatchNorm layers (FUSED_INFERENCE off): embeddings, the segments, and
    gradients taken through inference; training mode keeps Flax's layers."""
    if not native.available():
        pytest.skip("no C++ compiler: sqjax.cpu.native is not built (tests/test_native.py)")
    enc = ResNet(stage_sizes=(1, 1, 1, 1), block=block, width=width, embed_dim=8, n_mels=16)
    x = jax.random.normal(jax.random.key(1), (2, 24, 16))
    v = _random_batchnorm(enc.init(jax.random.key(0), x), jax.random.key(2))
    monkeypatch.setattr(cpu_fused, "FUSED_INFERENCE", False)
    monkeypatch.setattr(cpu_fused, "WINOGRAD_INFERENCE_CHANNELS", 32)
    loss = lambda v, x: jnp.sum(jnp.sin(enc.apply(v, x)))
    want, want_grad = jax.jit(jax.value_and_grad(loss))(v, x)
    plain = jax.jit(lambda v, x: enc.apply(v, x))(v, x)
    monkeypatch.setattr(cpu_fused, "FUSED_INFERENCE", True)
    fused = jax.jit(lambda v, x: enc.apply(v, x))  # new functions: traced again
    text = fused.lower(v, x).as_text()
    calls = text.count(native.DIRECT_TARGET), text.count(native.WINOGRAD_TARGET)
    assert calls == (direct, winograd)
    np.testing.assert_allclose(fused(v, x), plain, rtol=1e-4, atol=1e-5)
    got, got_grad = jax.jit(jax.value_and_grad(lambda v, x: loss(v, x)))(v, x)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * float(jnp.max(jnp.abs(b))))
    h = x
    for s in encoder_segments(enc):
        h = s.apply({c: {k: t[k] for k in s.keys if k in t} for c, t in v.items()}, h)
    np.testing.assert_allclose(h, plain, rtol=1e-4, atol=1e-5)
    train_mode = jax.jit(lambda v, x: enc.apply(v, x, train=True, mutable="batch_stats"))
    assert native.DIRECT_TARGET not in train_mode.lower(v, x).as_text()
    captured = enc.apply(v, x, capture_intermediates=lambda m, _: m.name == "stem_conv")[1]
    assert captured["intermediates"]["stem_conv"]["__call__"][0].shape[-1] == width


@pytest.mark.parametrize(
    "conv_slice,use_native", [(2, False), (AUTO_SLICE, False), (AUTO_SLICE, True)]
)
def test_conv_slice_trains_the_same_encoder(conv_slice, use_native, monkeypatch):
    """A ResNet with conv_slice=2 or sized per layer (resnet_tiny: 4 to 32 channels, so
    both sizes), or with sqjax.cpu.native's kernel gradients (its 3x3, strided and 1x1
    convolutions), has the plain one's parameters, loss and gradients."""
    if use_native and not native.available():
        pytest.skip("no C++ compiler: sqjax.cpu.native is not built (tests/test_native.py)")
    monkeypatch.setenv("SQJAX_NATIVE", "1" if use_native else "0")
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(8, 40, 80)), jnp.float32)
    plain, chunked = (build_encoder("resnet_tiny", conv_slice=c) for c in (0, conv_slice))
    variables = plain.init(jax.random.key(0), x)

    def loss(model, params):
        emb, _ = model.apply(
            {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
        )
        return jnp.sum(jnp.sin(emb))

    l0, g0 = jax.value_and_grad(functools.partial(loss, plain))(variables["params"])
    options = training_compiler_options(chunked, "cpu")  # as train.train jits the step
    assert bool(options) == use_native
    grad = jax.jit(jax.value_and_grad(functools.partial(loss, chunked)), compiler_options=options)
    hlo = grad.lower(variables["params"]).as_text()
    assert (native.TARGET in hlo) == use_native
    l1, g1 = grad(variables["params"])
    assert l1 == pytest.approx(float(l0), rel=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0), strict=True):
        # Float rounding of sums in another order: relative to the tensor's scale.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_training_compiler_options_only_where_native_kernel_grads_run():
    cpu = build_encoder("resnet_tiny", conv_slice=AUTO_SLICE)
    assert training_compiler_options(cpu, "gpu") == {} == training_compiler_options(cpu, "tpu")
    assert training_compiler_options(build_encoder("resnet_tiny"), "cpu") == {}  # XLA's grads
    bf16 = build_encoder("resnet_tiny", conv_slice=AUTO_SLICE, dtype=jnp.bfloat16)
    assert training_compiler_options(bf16, "cpu") == {}  # the slices
