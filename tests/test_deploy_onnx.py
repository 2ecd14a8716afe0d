"""sqjax.deploy: the ONNX encoder, run by onnxruntime, against the JAX forward pass of the
same packed model file (``runs.load_model_file``), and its size against FP32's."""

import importlib
import importlib.metadata
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sqjax import builders, export, quant, runs, uniform
from sqjax.cli import main
from sqjax.config import default_config

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from sqjax.deploy import onnx_export, runtime


def _config(name="resnet_tiny", **model):
    c = default_config()
    c.model.name = name
    c.model.update(model)
    c.eval.batch_size = 4
    return c


def _variables(config, seed=0):
    """Random encoder variables of the config's shapes (``jax.eval_shape``: no compiles),
    BatchNorm parameters and statistics far from 1/0, so a mix-up of scale, shift, mean
    or variance in the folding cannot go unnoticed."""
    enc = builders.build_encoder(config)
    shapes = jax.eval_shape(lambda: enc.init(jax.random.key(0), jnp.zeros((1, 120, enc.n_mels))))
    rng = np.random.default_rng(seed)

    def fill(kp, x):
        key, shape = str(kp[-1].key), x.shape
        if key in ("scale", "var"):
            return (0.5 + rng.random(shape)).astype(np.float32)
        if key in ("mean", "bias"):
            return (0.3 * rng.normal(size=shape)).astype(np.float32)
        fan_in = int(np.prod(shape[:-1]))  # He-scaled kernels keep activations O(1)
        return (rng.normal(size=shape) * np.sqrt(2 / fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, dict(shapes))


@pytest.fixture(scope="module", autouse=True)
def _numpy_assignment():
    """``export_packed``'s nearest-level assignment in NumPy: its jitted assignment compiles
    once per kernel shape and codebook size, most of this file's time otherwise. The file
    is a valid packed model either way, and both sides below read the same file."""

    def nearest(w, cb):
        w, cb = np.asarray(w), np.asarray(cb)
        flat = w.reshape(-1, 1, 1) if cb.ndim == 1 else w.reshape(-1, w.shape[-1], 1)
        return np.argmin(np.abs(flat - cb), axis=-1).reshape(w.shape)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export, "_indices", nearest)
        yield


def _codebook(w, k, method, per_channel, sym):
    """A valid codebook (K-means: quantiles of the weights; uniform: the min/max grid) of
    one kernel, in NumPy: fitting K-means here would cost the test its time budget."""
    w = np.asarray(w, np.float32)
    g = w.reshape(-1, w.shape[-1]).T if per_channel else w.reshape(1, -1)  # (groups, m)
    if method == "kmeans":
        cb = np.quantile(g, (np.arange(k) + 0.5) / k, axis=1).T.astype(np.float32)
        return (cb if per_channel else cb[0]), None, None
    if sym:
        s = (2 * np.abs(g).max(axis=1) / (k - 1)).astype(np.float32)
        z = np.full(len(g), (k - 1) / 2, np.float32)
    else:
        lo, hi = np.minimum(g.min(axis=1), 0), np.maximum(g.max(axis=1), 0)
        s = ((hi - lo) / (k - 1)).astype(np.float32)
        z = np.clip(np.round(-lo / s), 0, k - 1).astype(np.float32)
    cb = export._levels(s, z, k)
    if not per_channel:
        return cb[0], s[0], z[0]
    return cb, s, z


def _model_file(path, config, variables, bits, method="kmeans", per_channel=False, sym=False):
    """A packed model file as ``runs.export_workdir`` writes one (every kernel at ``bits``)."""

    def leaf(kp, w, out):
        if str(kp[-1].key) != "kernel":
            return None
        return _codebook(w, 2**bits, method, per_channel, sym)[out]

    params = variables["params"]
    floats = jax.tree.map(lambda _: None, variables["batch_stats"])
    fields = [
        jax.tree_util.tree_map_with_path(lambda kp, w, i=i: leaf(kp, w, i), params)
        for i in range(3)
    ]
    fields = [{"params": f, "batch_stats": floats} for f in fields]
    if method == "kmeans":
        state = quant.QuantizerState(fields[0])
    else:
        state = uniform.UniformState(*fields)
    meta = runs._model_metadata(config, bits, path)
    export.export_packed(path, variables, state, meta)
    return path


def _jax_embeddings(model_file, x):
    config, variables = runs.load_model_file(model_file)
    return np.asarray(builders.build_encoder(config).apply(variables, jnp.asarray(x)))


def _rel_err(a, b) -> float:
    return float(np.max(np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)))


def _feats(n=3, frames=137, mels=80, seed=1):
    return np.random.default_rng(seed).normal(size=(n, frames, mels)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny():
    config = _config(embed_dim=32)
    return config, _variables(config)


GRIDS = [  # (method, per channel, symmetric)
    ("kmeans", False, False),
    ("kmeans", True, False),
    ("uniform", False, False),
    ("uniform", True, False),
    ("uniform", False, True),
    ("uniform", True, True),
]


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("method, per_channel, sym", GRIDS)
def test_packed_onnx_equals_the_model_file(tiny, tmp_path, bits, method, per_channel, sym):
    config, variables = tiny
    npz = _model_file(tmp_path / "m.npz", config, variables, bits, method, per_channel, sym)
    path = onnx_export.export_model_file(npz)
    x = _feats()
    got = runtime.Encoder(path).run(x)
    assert _rel_err(got, _jax_embeddings(npz, x)) < 1e-4
    # The kernels are stored as packed indices, not floats (at 8 bits, per channel, a
    # 4-channel layer's 256-level codebooks outweigh its kernel).
    inits = onnx.load(path).graph.initializer
    floats = sum(np.prod(i.dims) for i in inits if i.data_type == onnx.TensorProto.FLOAT)
    kernels = sum(np.size(w) for kp, w in jax.tree_util.tree_leaves_with_path(variables)
                  if str(kp[-1].key) == "kernel")  # fmt: skip
    assert bits == 8 or floats < kernels / 4


def test_fp32_and_uint8_indices_and_dynamic_shapes(tiny, tmp_path):
    config, variables = tiny
    fp32 = onnx_export.export_variables(
        variables, runs._model_metadata(config, 32, tmp_path), tmp_path / "fp32.onnx"
    )
    enc = builders.build_encoder(config)
    for frames, batch in ((101, 1), (233, 5)):  # one file, any batch and length
        x = _feats(batch, frames)
        ref = np.asarray(enc.apply(variables, x))
        assert _rel_err(runtime.Encoder(fp32).run(x), ref) < 1e-4
    npz = _model_file(tmp_path / "m3.npz", config, variables, 3)  # 3 bits: 4-bit fields
    x = _feats()
    ref = _jax_embeddings(npz, x)
    for packing in onnx_export.PACKINGS:
        path = onnx_export.export_model_file(npz, tmp_path / f"{packing}.onnx", packing)
        for keep_packed in (False, True):
            assert _rel_err(runtime.Encoder(path, keep_packed).run(x), ref) < 1e-4
    model = onnx.load(tmp_path / "bits.onnx")
    assert model.opset_import[0].version >= 17
    assert {"BitShift", "BitwiseAnd", "Gather"} <= {n.op_type for n in model.graph.node}
    assert "BatchNormalization" not in {n.op_type for n in model.graph.node}


@pytest.mark.parametrize(
    "name, model",
    [
        ("resnet34", {"width": 2, "embed_dim": 16}),  # ResNet34's geometry, 2 channels wide
        ("resnet50", {"width": 2, "embed_dim": 16, "pool_ddof": 1, "pool_eps": 1e-7}),
    ],
)
def test_resnet34_and_bottleneck_geometries(tmp_path, name, model):
    config = _config(name, **model)
    variables = _variables(config, seed=3)
    npz = _model_file(tmp_path / "m.npz", config, variables, 2, per_channel=True)
    x = _feats(2, 160)
    got = runtime.Encoder(onnx_export.export_model_file(npz)).run(x)
    assert _rel_err(got, _jax_embeddings(npz, x)) < 1e-4


def test_two_bit_demo_model_is_under_a_tenth_of_fp32(tmp_path):
    """The demo preset's size (configs/demo.py): resnet_demo, width 8, 128-dim."""
    from sqjax.config import load_config

    config = load_config(str(__import__("pathlib").Path(__file__).parents[1] / "configs/demo.py"))
    variables = _variables(config)
    npz = _model_file(tmp_path / "demo2.npz", config, variables, 2)
    two = onnx_export.export_model_file(npz).stat().st_size
    meta = runs._model_metadata(config, 32, tmp_path)
    fp32 = onnx_export.export_variables(variables, meta, tmp_path / "fp32.onnx").stat().st_size
    assert two <= fp32 / 10, (two, fp32)


def _speechlike(n=2, seconds=2.0, seed=0):
    """Waves in [-1, 1]: amplitude-modulated tones in noise, with a near-silent second
    (1e-4) where the power spectrum is tiny and a log's rounding shows first."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    rows = []
    for i in range(n):
        x = 0.3 * np.sin(2 * np.pi * (180 + 90 * i) * t) * (1 + np.sin(2 * np.pi * 3 * t))
        x = x + 0.05 * rng.normal(size=t.size) + 0.01  # a DC offset, which Kaldi removes
        x[:16000] *= 1e-3
        rows.append(x)
    return np.asarray(rows, np.float32)


@pytest.mark.parametrize("kind", ["logmel", "kaldi"])
def test_frontend_graph_computes_sqjax_features(tmp_path, kind):
    """``--with-frontend``: the graph's features of 16 kHz waves against
    ``sqjax.features`` (librosa; the Kaldi recipe, itself checked against
    kaldi-native-fbank), and its embeddings against the features-input graph's."""
    from sqjax import features

    config = _config(embed_dim=32)
    config.features.kind = kind
    variables = _variables(config, seed=2)
    npz = _model_file(tmp_path / "m.npz", config, variables, 2, per_channel=True)
    wave_file = onnx_export.export_model_file(npz, tmp_path / "w.onnx", frontend=True)
    encoder = runtime.Encoder(wave_file)
    assert encoder.takes_wave
    waves = _speechlike(seconds=3.0)
    emb, feats = encoder.session.run(["embedding", "feats"], {"wave": waves})
    extract = features.logmel if kind == "logmel" else features.kaldi_fbank
    want = np.stack([extract(w, n_mels=80) for w in waves])
    assert feats.shape == want.shape
    np.testing.assert_allclose(feats, want, rtol=0, atol=1e-3)
    plain = runtime.Encoder(onnx_export.export_model_file(npz, tmp_path / "f.onnx"))
    assert _rel_err(emb, plain.run(want)) < 1e-4
    # embed_waves cuts as sqjax's evaluation cuts features: lengths off the ladder (cut
    # to a rung), under 100 frames (repeated), over max_frames (chunks, a short tail
    # dropped), against the features-input graph's embed of sqjax's features.
    frame = 512 if kind == "logmel" else 400
    encoder.max_frames = plain.max_frames = 130  # rungs 100, 110, 121, 130
    lengths = [60, 100, 125, 125, 297]  # frames; 297 = 130 + 130 + a 37-frame tail
    cuts = [waves[i % len(waves), : frame + (n - 1) * hop + 37] for i, (n, hop) in
            enumerate((n, 160) for n in lengths)]  # fmt: skip
    want = plain.embed([extract(w, n_mels=80) for w in cuts])
    assert [extract(w, n_mels=80).shape[0] for w in cuts] == lengths
    assert _rel_err(encoder.embed_waves(cuts), want) < 1e-4
    whole = plain.run(extract(cuts[2], n_mels=80)[None])  # all 125 frames: not sqjax's cut
    assert _rel_err(whole, want[2:3]) > 1e-3
    with pytest.raises(ValueError, match="takes features; export --with-frontend"):
        plain.embed_waves(cuts)


def test_command_line_export_embed_eval(tiny, tiny_config, tmp_path, capsys):
    """``sqjax export --model X.npz --format onnx``, then ``embed`` and ``eval --model
    X.onnx``: the .npz file's embeddings (sqjax, JAX) to 1e-4 and its EER to 4 decimals."""
    from sqjax import data, evaluate, metrics, prepare

    config, variables = tiny
    paths = prepare.resolve_paths(tiny_config)
    npz = _model_file(tmp_path / "m.npz", config, variables, 2)
    onnx_file = tmp_path / "m.onnx"
    main(["export", "--model", str(npz), "--format", "onnx", "--out", str(onnx_file)])
    assert "wrote" in capsys.readouterr().out
    split, ref = runs.embed_model_file(npz, paths.test, trials=paths.test_trials, workers=1)
    main(
        ["embed", "--model", str(onnx_file), "--data", paths.test, "--out", str(tmp_path / "e.npy")]
    )
    got = np.load(tmp_path / "e.npy")
    assert (tmp_path / "e.utts.txt").read_text().split() == list(split.corpus.utts)
    assert _rel_err(got, ref) < 1e-4
    capsys.readouterr()
    main(["eval", "--model", str(onnx_file), "--data", paths.test, "--trials", paths.test_trials])
    printed = [line.split() for line in capsys.readouterr().out.splitlines() if "eer" in line]
    enroll, test = evaluate.trial_indices(split.corpus.utts, split.trials.enroll, split.trials.test)
    labels = data.read_trials(paths.test_trials).labels
    eer = metrics.eer(evaluate.cosine_scores(ref, enroll, test), labels)[0]
    assert printed == [["eer", f"{eer:.4f}"]]

    with pytest.raises(ValueError, match="--model FILE.npz is already a model file"):
        main(["--debug", "export", "--model", str(npz)])

    # --with-frontend: the same model from the waveform; embed reads the audio itself.
    main(["export", "--model", str(npz), "--format", "onnx", "--with-frontend"])
    assert "ONNX from the waveform" in capsys.readouterr().out
    wave_file = tmp_path / "m_wave.onnx"
    main(
        ["embed", "--model", str(wave_file), "--data", paths.test, "--out", str(tmp_path / "w.npy")]
    )
    got = np.load(tmp_path / "w.npy")
    assert (tmp_path / "w.utts.txt").read_text().split() == list(split.corpus.utts)
    waves = [data.load_audio(p) for p in split.corpus.paths]
    assert _rel_err(got, runtime.Encoder(wave_file).embed_waves(waves)) < 1e-6
    with pytest.raises(ValueError, match="--with-frontend goes with --format onnx"):
        main(["--debug", "export", "--cascade", "--with-frontend", "--out", str(tmp_path / "b")])


def _wespeaker_resnet():
    torch = pytest.importorskip("torch")
    try:
        root = importlib.metadata.distribution("wespeaker-unofficial").locate_file("wespeaker")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("wespeaker-unofficial is not installed (.ci/run installs it)")
    saved = {n: sys.modules.pop(n) for n in list(sys.modules) if n.startswith("wespeaker")}
    try:
        for name, folder in (("wespeaker", root), ("wespeaker.models", root / "models")):
            package = types.ModuleType(name)
            package.__path__ = [str(folder)]
            sys.modules[name] = package
        return torch, importlib.import_module("wespeaker.models.resnet")
    finally:
        for n in [n for n in sys.modules if n.startswith("wespeaker")]:
            sys.modules.pop(n)
        sys.modules.update(saved)


def test_imported_wespeaker_model(tmp_path):
    """A WeSpeaker ResNet (its pooling: unbiased std) imported as ``sqjax import-wespeaker``
    does: FP32 ONNX against WeSpeaker's own forward pass, and 2 bits against the JAX one."""
    from sqjax import wespeaker

    torch, ws = _wespeaker_resnet()
    model = ws.ResNet(ws.BasicBlock, [1, 1, 1, 1], m_channels=4, feat_dim=80, embed_dim=32)
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.data = 0.3 * torch.randn(m.num_features, generator=g)
            m.running_var.data = 0.5 + torch.rand(m.num_features, generator=g)
    model.eval()
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    config = _config(**wespeaker.geometry(state))
    config.features.kind = "kaldi"
    variables = wespeaker.to_variables(state, builders.build_encoder(config))
    x = _feats(2, 150)
    meta = runs._model_metadata(config, 32, tmp_path)
    fp32 = onnx_export.export_variables(variables, meta, tmp_path / "ws.onnx")
    with torch.no_grad():
        theirs = model(torch.from_numpy(x))[-1].numpy()
    assert _rel_err(runtime.Encoder(fp32).run(x), theirs) < 1e-4
    npz = _model_file(tmp_path / "ws2.npz", config, variables, 2)
    path = onnx_export.export_model_file(npz)
    assert _rel_err(runtime.Encoder(path).run(x), _jax_embeddings(npz, x)) < 1e-4
    assert runtime.Encoder(path).metadata["features"]["kind"] == "kaldi"
