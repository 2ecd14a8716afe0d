import numpy as np

from sqjax.evaluate import (
    cosine_scores,
    extract_embeddings,
    length_buckets,
    raw_feature_baseline,
    trial_indices,
)


def test_length_buckets_lose_at_most_ten_percent():
    rungs = length_buckets(100, 3000)
    assert rungs[0] == 100 and rungs[-1] == 3000 and np.all(np.diff(rungs) > 0)
    for n in range(100, 3001, 7):
        cut = rungs[np.searchsorted(rungs, n, side="right") - 1]
        assert n / 1.1 - 1 <= cut <= n


def test_extract_embeddings_matches_per_utterance_reference(capsys):
    # A "model" whose embedding is the mean over time: the reference is computable by hand.
    calls = []

    def embed(_, x):
        calls.append(x.shape)
        return x.mean(axis=1)

    rng = np.random.default_rng(0)
    lengths = [50, 100, 130, 260, 7000]
    feats = [rng.normal(size=(n, 4)).astype(np.float32) for n in lengths]
    emb = extract_embeddings(embed, None, feats, batch_size=2, min_frames=100, max_frames=3000)
    rungs = length_buckets(100, 3000)

    def cut(f):
        return f[: rungs[np.searchsorted(rungs, len(f), side="right") - 1]]

    np.testing.assert_allclose(emb[0], np.tile(feats[0], (2, 1)).mean(0), rtol=1e-5)
    np.testing.assert_allclose(emb[2], cut(feats[2]).mean(0), rtol=1e-5)
    np.testing.assert_allclose(emb[3], cut(feats[3]).mean(0), rtol=1e-5)
    chunks = [feats[4][:3000], feats[4][3000:6000], cut(feats[4][6000:])]
    weights = [len(c) for c in chunks]  # 3000, 3000 and the tail's rung
    ref = np.average([c.mean(0) for c in chunks], axis=0, weights=weights)
    np.testing.assert_allclose(emb[4], ref, rtol=1e-5)
    assert all(shape[0] == 2 for shape in calls)  # fixed batch: one compile per rung
    # With a progress bar: the same embeddings, the bar counting every segment.
    with_bar = extract_embeddings(embed, None, feats, batch_size=2, desc="embed")
    np.testing.assert_array_equal(with_bar, emb)
    err = capsys.readouterr().err
    assert "embed" in err and "/7 " in err  # 4 short utterances and 3 chunks of the long one


def test_cosine_scores_against_numpy():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(6, 5))
    enroll, test = trial_indices(list("abcdef"), ["a", "c", "f"], ["b", "c", "a"])
    s = cosine_scores(emb, enroll, test)
    for k, (i, j) in enumerate(zip(enroll, test)):
        ref = emb[i] @ emb[j] / np.linalg.norm(emb[i]) / np.linalg.norm(emb[j])
        assert abs(s[k] - ref) < 1e-12
    assert abs(s[1] - 1) < 1e-12


def test_raw_feature_baseline_standardises_with_train_statistics():
    rng = np.random.default_rng(2)
    train = [rng.normal(size=(30, 2)) * [1, 100] for _ in range(50)]
    test = [rng.normal(size=(30, 2)) * [1, 100] for _ in range(3)]
    emb = raw_feature_baseline(train, test)
    stats = np.array([np.concatenate([f.mean(0), f.std(0)]) for f in train])
    ref = (np.concatenate([test[0].mean(0), test[0].std(0)]) - stats.mean(0)) / stats.std(0)
    np.testing.assert_allclose(emb[0], ref, rtol=1e-6)


def test_sharded_embeddings_equal_one_device():
    # A real (random) encoder: 1 and 2 devices, and the plain unsharded path, give the
    # same embeddings; an odd batch size is rounded up to the device count.
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from sqjax import models

    assert jax.device_count() >= 2, "conftest sets two simulated CPU devices"
    encoder = models.build_encoder("resnet_tiny", n_mels=16, embed_dim=8)
    variables = encoder.init(jax.random.key(0), np.zeros((2, 120, 16), np.float32), train=False)
    rng = np.random.default_rng(0)
    feats = [rng.normal(size=(n, 16)).astype(np.float32) for n in (100, 100, 130, 250, 400)]
    embed = jax.jit(lambda v, x: encoder.apply(v, x, train=False))
    ref = extract_embeddings(embed, variables, feats, batch_size=3)
    for n in (1, 2):
        sharding = NamedSharding(Mesh(np.array(jax.devices()[:n]), ("data",)), P("data"))
        seen = []

        def spy(v, x, seen=seen):
            seen.append((x.shape[0], x.sharding))
            return embed(v, x)

        got = extract_embeddings(spy, variables, feats, batch_size=3, sharding=sharding)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
        assert {b for b, _ in seen} == {3 if n == 1 else 4}
        assert all(s == sharding for _, s in seen)  # each device embeds its rows only


def test_inference_programs_use_the_cpu_options_and_embed_the_same():
    # jitted_embed compiles with models.inference_compiler_options (on CPU: XLA's YNNPACK
    # fusions off): the same embeddings as a plain jax.jit of the encoder, and where plain
    # XLA builds YNNPACK fusions, the inference program has none.
    import jax

    from sqjax import evaluate, models

    assert models.inference_compiler_options("gpu") == {}
    assert models.inference_compiler_options("tpu") == {}
    encoder = models.build_encoder("resnet_tiny", n_mels=16, embed_dim=8)
    x = np.random.default_rng(0).normal(size=(4, 120, 16)).astype(np.float32)
    variables = encoder.init(jax.random.key(0), x, train=False)
    plain = jax.jit(lambda v, x: encoder.apply(v, x, train=False))
    ours = evaluate.jitted_embed(encoder)
    np.testing.assert_allclose(ours(variables, x), plain(variables, x), rtol=1e-5, atol=1e-6)
    if "ynn_fusion" in plain.lower(variables, x).compile().as_text():  # jaxlib 0.10: yes
        assert "ynn_fusion" not in ours.lower(variables, x).compile().as_text()
