"""sqjax.export: bit-exact round trip, honest sizes, atomic writes."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sqjax import export, quant


def test_bit_stream_layout_by_hand():
    # 3-bit values 1, 2, 7 -> stream bits (LSB first) 100 010 111 -> bytes 0b11010001, 0b1
    np.testing.assert_array_equal(export._pack(np.array([1, 2, 7]), 3), [209, 1])
    np.testing.assert_array_equal(export._unpack(np.array([209, 1], np.uint8), 3, 3), [1, 2, 7])
    rng = np.random.default_rng(0)
    for bits in range(1, 9):
        idx = rng.integers(0, 2**bits, 1001)
        packed = export._pack(idx, bits)
        assert packed.size == -(-1001 * bits // 8)
        np.testing.assert_array_equal(export._unpack(packed, bits, 1001), idx)


def _params():
    """One leaf per bit width 1..8, per-channel leaves at 3 and 5 bits, float leaves, bf16."""
    rng = np.random.default_rng(1)
    p = {
        f"b{b}": {
            "kernel": rng.laplace(size=(16, 32)).astype(np.float32),
            "bias": rng.normal(size=32).astype(np.float32),
        }
        for b in range(1, 9)
    }
    p["pc3"] = {"kernel": rng.laplace(size=(3, 3, 4, 8)).astype(np.float32)}
    p["pc5"] = {"kernel": rng.laplace(size=(64, 6)).astype(np.float32)}
    p["half"] = {"kernel": jnp.asarray(rng.laplace(size=(8, 16)), jnp.bfloat16)}
    p["blocks"] = [{"w": rng.normal(size=(4, 4)).astype(np.float32)}]  # a list; float leaf
    return p


_RULES = (
    quant.Rule("pc3/", 3, per_channel=True),
    quant.Rule("pc5/", 5, per_channel=True),
    quant.Rule("half/", 4),
) + tuple(quant.Rule(f"b{b}/kernel", b) for b in range(1, 9))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    params = _params()
    qz = quant.kmeans_quantizer(_RULES)
    state = qz.init(params)
    path = tmp_path_factory.mktemp("export") / "model.sqz"
    report = export.export_packed(path, params, state)
    return params, qz, state, path, report


def test_round_trip_is_bit_exact(exported):
    params, qz, state, path, _ = exported
    expected = qz.apply(params, state)
    loaded = export.load_packed(path)
    flat_e = {quant.path_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
    flat_l = {quant.path_str(k): v for k, v in jax.tree_util.tree_flatten_with_path(loaded)[0]}
    assert flat_e.keys() == flat_l.keys()
    for name, v in flat_e.items():
        assert flat_l[name].dtype == v.dtype, name
        assert np.array_equal(np.asarray(flat_l[name]), np.asarray(v)), name
    assert list(loaded["blocks"]) == [0]  # nested dicts (int keys) without a target
    # with a target the original structure (here a list) comes back
    same = export.load_packed(path, target=params)
    assert isinstance(same["blocks"], list)
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), same, expected
    )


def test_sizes_match_hand_count_and_file(exported):
    params, _, state, path, report = exported
    by_path = {leaf.path: leaf for leaf in report.leaves}
    assert by_path["b3/kernel"].packed_bits == 512 * 3 + 8 * 32
    assert by_path["pc5/kernel"].packed_bits == 384 * 5 + 6 * 32 * 32
    assert by_path["b3/bias"].packed_bits == 32 * 32
    assert report.fp32_bytes == 4 * sum(np.size(x) for x in jax.tree.leaves(params))
    assert report.file_bytes == os.path.getsize(path)
    # the overhead is the JSON header, the npz/npy headers and < 1 byte per leaf
    with np.load(path) as z:
        header = z["header"].size
    assert 0 <= report.file_bytes - report.packed_bytes <= header + 2048 + len(report.leaves)
    assert export.size_report(params, state).leaves == report.leaves
    text = report.format()
    assert "total" in text and "file on disk" in text and f"{report.ratio:.1f}x" in text


def test_round_trip_nnx_state(tmp_path):
    model = nnx.Sequential(nnx.Linear(6, 16, rngs=nnx.Rngs(0)), nnx.Linear(16, 3, rngs=nnx.Rngs(1)))
    graphdef, params = nnx.split(model)
    qz = quant.kmeans_quantizer(quant.default_rules(2))
    state = qz.init(params)
    export.export_packed(tmp_path / "m.sqz", params, state)
    loaded = export.load_packed(tmp_path / "m.sqz", target=params)
    x = jnp.ones((2, 6))
    expected = nnx.merge(graphdef, qz.apply(params, state))(x)
    np.testing.assert_array_equal(nnx.merge(graphdef, loaded)(x), expected)


def test_write_is_atomic(tmp_path, monkeypatch):
    params = {"d": {"kernel": np.ones((4, 4), np.float32)}}
    state = quant.kmeans_quantizer(quant.default_rules(1)).init(params)
    path = tmp_path / "m.sqz"
    export.export_packed(path, params, state)
    before = path.read_bytes()

    def broken(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(export.np, "savez", broken)
    with pytest.raises(OSError, match="disk full"):
        export.export_packed(path, params, state)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.sqz"]  # no temporary file left


def test_rejects_foreign_files(tmp_path):
    np.savez(tmp_path / "other.npz", header=np.frombuffer(b'{"format": "x"}', np.uint8))
    with pytest.raises(ValueError, match="not a sqjax-packed"):
        export.load_packed(tmp_path / "other.npz")


def test_version_1_files_still_load(exported, tmp_path):
    """A file written before uniform grids (version 1: no scales/zeros members) loads as
    before; the K-means layout did not change."""
    params, _, _, path, _ = exported
    with np.load(path) as z:
        header = json.loads(bytes(z["header"]).decode())
        assert header["version"] == 2
        members = {k: z[k] for k in ("indices", "codebooks", "floats")}
    header["version"] = 1
    old = tmp_path / "v1.npz"  # np.savez appends .npz to other names
    np.savez(old, header=np.frombuffer(json.dumps(header).encode(), np.uint8), **members)
    jax.tree.map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
        export.load_packed(old, target=params),
        export.load_packed(path, target=params),
    )
    header["version"] = 3
    np.savez(old, header=np.frombuffer(json.dumps(header).encode(), np.uint8), **members)
    with pytest.raises(ValueError, match="version 1 or 2"):
        export.load_packed(old)
