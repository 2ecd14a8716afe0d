import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from sqjax.pipeline import CropSampler, crop, prefetch


def _corpus(n_spk=5, per_spk=(1, 2, 3, 4, 9), n_mels=3):
    rng = np.random.default_rng(0)
    feats, labels = [], []
    for s in range(n_spk):
        for _ in range(per_spk[s]):
            feats.append(
                rng.normal(size=(int(rng.integers(20, 60)), n_mels)).astype(np.float32) + s
            )
            labels.append(s)
    return feats, np.array(labels)


def test_crop_is_a_window_or_wraps():
    f = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
    rng = np.random.default_rng(0)
    c = crop(f, 4, rng)
    start = int(c[0, 0]) // 2
    np.testing.assert_array_equal(c, f[start : start + 4])
    np.testing.assert_array_equal(crop(f, 25, rng), np.concatenate([f, f, f[:5]]))


def test_batches_are_deterministic_balanced_and_labelled():
    feats, labels = _corpus()
    s = CropSampler(feats, labels, n_frames=16, seed=3)
    a, b = s.batch(7, 5), s.batch(7, 5)
    np.testing.assert_array_equal(a["feats"], b["feats"])
    assert not np.array_equal(a["feats"], s.batch(8, 5)["feats"])
    assert a["feats"].shape == (5, 16, 3) and a["labels"].dtype == np.int32
    # 5 speakers, batch of 5: every speaker once although speaker 4 has 9 utterances.
    assert sorted(a["labels"]) == [0, 1, 2, 3, 4]
    # Each crop comes from an utterance of its label's speaker (features offset by s).
    means = a["feats"].mean(axis=(1, 2))
    assert np.all(np.abs(means - a["labels"]) < 1.0)
    counts = np.bincount(np.concatenate([s.batch(i, 4)["labels"] for i in range(400)]), minlength=5)
    assert counts.min() > 0.8 * counts.mean()  # uniform over speakers, not utterances


def test_prefetch_yields_sharded_batches_in_order():
    feats, labels = _corpus()
    s = CropSampler(feats, labels, n_frames=8, seed=0)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    got = list(prefetch(s, 2, 5, 4, sharding))
    assert len(got) == 3
    for step, batch in zip(range(2, 5), got):
        np.testing.assert_array_equal(np.asarray(batch["feats"]), s.batch(step, 4)["feats"])
        assert batch["feats"].sharding == sharding


def test_prefetch_reraises_worker_errors():
    feats, labels = _corpus()
    s = CropSampler(feats, labels, n_frames=8, seed=0)
    sharding = NamedSharding(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",)), P("data"))

    def boom(*a, **k):
        raise RuntimeError("bad batch")

    s.batch = boom
    with pytest.raises(RuntimeError, match="bad batch"):
        list(prefetch(s, 0, 3, 4, sharding))
