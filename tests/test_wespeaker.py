"""WeSpeaker import, checked against WeSpeaker's own model code.

The reference is the ResNet of the ``wespeaker-unofficial`` package (installed by
``.ci/run`` with ``--no-deps``, beside a CPU build of torch): its modules are loaded
without the package's ``__init__``, which needs WeSpeaker's whole runtime.
"""

import importlib
import importlib.metadata
import json
import sys
import types

import numpy as np
import pytest

from sqjax import builders, evaluate, runs, wespeaker
from sqjax.cli import main

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def ws_resnet():
    """WeSpeaker's ``wespeaker.models.resnet`` module."""
    try:
        root = importlib.metadata.distribution("wespeaker-unofficial").locate_file("wespeaker")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("wespeaker-unofficial is not installed (.ci/run installs it)")
    names = ("wespeaker", "wespeaker.models", "wespeaker.models.resnet",
             "wespeaker.models.pooling_layers")  # fmt: skip
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    try:
        for name, folder in (("wespeaker", root), ("wespeaker.models", root / "models")):
            package = types.ModuleType(name)
            package.__path__ = [str(folder)]
            sys.modules[name] = package
        yield importlib.import_module("wespeaker.models.resnet")
    finally:
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)


def _randomised(model, seed: int = 0):
    """``model`` in eval mode with BatchNorm affine parameters and running statistics far
    from their initial 1/0, so a mix-up of scale/mean/var cannot go unnoticed."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = 0.5 + torch.rand(n, generator=g)
            m.bias.data = 0.2 * torch.randn(n, generator=g)
            m.running_mean.data = 0.3 * torch.randn(n, generator=g)
            m.running_var.data = 0.5 + torch.rand(n, generator=g)
    return model.eval()


def _embed_both(model, checkpoint, out, feats: np.ndarray):
    """(sqjax's, WeSpeaker's) embeddings of ``feats`` (B, T, F) after importing ``model``."""
    torch.save(model.state_dict(), checkpoint)
    wespeaker.import_wespeaker(checkpoint, out)
    config, state, _ = runs.restore_run(out)
    variables = evaluate.encoder_variables(state)
    ours = np.asarray(builders.build_encoder(config).apply(variables, feats))
    with torch.no_grad():
        theirs = model(torch.from_numpy(feats))[-1].numpy()
    return ours, theirs


def _rel_err(a, b) -> float:
    return float(np.max(np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)))


def test_resnet34_embeddings_equal_wespeakers(ws_resnet, tmp_path):
    model = _randomised(ws_resnet.ResNet34(feat_dim=80, embed_dim=256))
    feats = np.random.default_rng(0).normal(size=(2, 203, 80)).astype(np.float32)
    ours, theirs = _embed_both(model, tmp_path / "avg_model.pt", tmp_path / "run", feats)
    assert ours.shape == theirs.shape == (2, 256)
    assert _rel_err(ours, theirs) < 1e-4
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["name"] == "resnet34" and config["features"]["kind"] == "kaldi"
    assert config["model"]["pool_ddof"] == 1 and config["model"]["pool_eps"] == 1e-7


def test_bottleneck_resnet_at_reduced_depth_equals_wespeakers(ws_resnet, tmp_path):
    """ResNet221's blocks (bottleneck, expansion 4) at depth [2, 2, 3, 1], width 16, 40
    mels, 128-dim embedding: the geometry is read off the checkpoint."""
    model = ws_resnet.ResNet(
        ws_resnet.Bottleneck, [2, 2, 3, 1], m_channels=16, feat_dim=40, embed_dim=128
    )
    feats = np.random.default_rng(1).normal(size=(3, 150, 40)).astype(np.float32)
    ours, theirs = _embed_both(_randomised(model, 1), tmp_path / "m.pt", tmp_path / "run", feats)
    assert _rel_err(ours, theirs) < 1e-4
    model_config = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert model_config["stage_sizes"] == [2, 2, 3, 1] and model_config["width"] == 16
    assert model_config["n_mels"] == 40 and model_config["embed_dim"] == 128


def _tiny_state_dict(ws_resnet, **kw) -> dict:
    model = ws_resnet.ResNet(
        ws_resnet.BasicBlock, [1, 1, 1, 1], m_channels=4, feat_dim=80, embed_dim=32, **kw
    )
    return _randomised(model).state_dict()


def test_safetensors_and_npz_import_as_the_pt_file(ws_resnet, tmp_path):
    from safetensors.numpy import save_file

    sd = _tiny_state_dict(ws_resnet)
    torch.save(sd, tmp_path / "m.pt")
    arrays = {k: v.numpy() for k, v in sd.items()}
    save_file(arrays, str(tmp_path / "m.safetensors"))
    np.savez(tmp_path / "m.npz", **arrays)
    ref = wespeaker.read_state_dict(tmp_path / "m.pt")
    for name in ("m.safetensors", "m.npz"):
        got = wespeaker.read_state_dict(tmp_path / name)
        assert got.keys() == ref.keys()
        assert all(np.array_equal(got[k], ref[k]) for k in ref)
    # Round trip: our variables back to WeSpeaker's names and layouts.
    config = wespeaker.import_wespeaker(tmp_path / "m.npz", tmp_path / "run")
    _, state, _ = runs.restore_run(tmp_path / "run")
    back = wespeaker.to_state_dict(evaluate.encoder_variables(state))
    assert set(back) == {k for k in ref if "num_batches_tracked" not in k}
    assert all(np.array_equal(back[k], ref[k]) for k in back)
    assert config.head.num_classes == 1  # no projection in the file: a placeholder head


def test_importer_refuses_with_the_names(ws_resnet, tmp_path):
    sd = _tiny_state_dict(ws_resnet)
    renamed = dict(sd)
    renamed["layer1.0.convX.weight"] = renamed.pop("layer1.0.conv1.weight")
    torch.save(renamed, tmp_path / "renamed.pt")
    with pytest.raises(ValueError, match=r"missing keys: layer1\.0\.conv1\.weight.*"
                       r"unexpected keys: layer1\.0\.convX\.weight"):  # fmt: skip
        wespeaker.import_wespeaker(tmp_path / "renamed.pt", tmp_path / "a")
    reshaped = dict(sd)
    reshaped["layer2.0.bn1.weight"] = torch.ones(5)
    torch.save(reshaped, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"wrong shapes: layer2\.0\.bn1\.weight \(5,\) "
                       r"\(expected \(8,\)\)"):  # fmt: skip
        wespeaker.import_wespeaker(tmp_path / "shape.pt", tmp_path / "b")
    torch.save({"encoder.weight": torch.ones(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a WeSpeaker ResNet state dict"):
        wespeaker.import_wespeaker(tmp_path / "other.pt", tmp_path / "c")
    (tmp_path / "text.pt").write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match=r"text\.pt: not a PyTorch state dict"):
        wespeaker.import_wespeaker(tmp_path / "text.pt", tmp_path / "d")
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list, not a state dict"):
        wespeaker.import_wespeaker(tmp_path / "list.pt", tmp_path / "e")
    torch.save(sd, tmp_path / "ok.pt")
    with pytest.raises(ValueError, match=r"not --model resnet34"):
        wespeaker.import_wespeaker(tmp_path / "ok.pt", tmp_path / "f", model="resnet34")
    two = _tiny_state_dict(ws_resnet, two_emb_layer=True)
    torch.save(two, tmp_path / "two.pt")
    with pytest.raises(ValueError, match="two_emb_layer"):
        wespeaker.import_wespeaker(tmp_path / "two.pt", tmp_path / "g")
    # Nothing was written for any refused file.
    assert not any((tmp_path / d).exists() for d in "abcdefg")


def test_imported_model_runs_eval_ptq_and_qat_from_the_command_line(
    ws_resnet, tiny_config, tmp_path, capsys
):
    """import-wespeaker -> its test scores equal WeSpeaker's pipeline (Kaldi fbank + CMN,
    its model, cosine) on the built-in corpus; ptq and a QAT study start from it (the QAT
    run inherits the model and features; another speaker count gets a new head)."""
    from sqjax import data, features, prepare

    paths = prepare.resolve_paths(tiny_config)
    model = _randomised(
        ws_resnet.ResNet(
            ws_resnet.BasicBlock, [1, 1, 1, 1], m_channels=4, feat_dim=80, embed_dim=32
        )
    )
    sd = dict(model.state_dict())
    sd["projection.weight"] = torch.randn(7, 32)  # WeSpeaker's AAM head, 7 speakers
    torch.save(sd, tmp_path / "avg_model.pt")
    run = tmp_path / "ws"
    main(["import-wespeaker", str(tmp_path / "avg_model.pt"), "--model", "resnet_tiny",
          "--out", str(run), "--data", paths.test, "--trials", paths.test_trials])  # fmt: skip
    assert "test metrics" in capsys.readouterr().out
    scores = np.load(run / "scores_test.npz")["scores"]

    corpus = data.read_corpus(paths.test)
    trials = data.read_trials(paths.test_trials, corpus)
    # sqjax embeds each utterance cut to the longest rung of its length ladder it covers
    # (so one program serves many lengths); the reference cuts the same frames.
    rungs = evaluate.length_buckets(100, tiny_config.eval.max_frames)
    emb = {}
    with torch.no_grad():
        for utt, path in zip(corpus.utts, corpus.paths, strict=True):
            fb = features.kaldi_fbank(data.load_audio(path, 16000, 0.0))  # mean-normalised
            fb = fb[: rungs[rungs <= len(fb)].max()]
            emb[utt] = model(torch.from_numpy(fb[None]))[-1][0].numpy()
    unit = {u: e / np.linalg.norm(e) for u, e in emb.items()}
    ref = np.array([unit[a] @ unit[b] for a, b in zip(trials.enroll, trials.test, strict=True)])
    np.testing.assert_allclose(scores, ref, atol=1e-5)

    main(["ptq", "--workdir", str(run), "--bits", "2", "--bn-utts", "0"])
    ptq = json.loads((run / "ptq.json").read_text())
    # The packed 2-bit file carries the Kaldi front end and WeSpeaker's pooling with it.
    main(["export", "--workdir", str(run), "--bits", "2"])
    split, emb = runs.embed_model_file(
        run / "encoder_2bit.npz", paths.test, trials=paths.test_trials
    )
    enroll, test = evaluate.trial_indices(split.corpus.utts, split.trials.enroll, split.trials.test)
    alone = evaluate.cosine_scores(emb, enroll, test)
    np.testing.assert_allclose(alone, np.load(run / "scores_ptq2.npz")["scores"], atol=1e-5)
    assert set(ptq) == {"fp32", "2bit"}

    _, state, _ = runs.restore_run(run)
    np.testing.assert_array_equal(state.params["head"]["kernel"], sd["projection.weight"].T)
    main(["qat", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "qat"),
          f"--config.data.synth_dir={tiny_config.data.synth_dir}", "--config.progress=False",
          f"--config.quant.init_from={run}", "--config.quant.bits_list=(2,)",
          "--config.quant.num_steps=2", "--config.quant.warmup_steps=1"])  # fmt: skip
    qat = json.loads((tmp_path / "qat" / "2bit" / "config.json").read_text())
    assert qat["features"]["kind"] == "kaldi" and qat["model"]["pool_ddof"] == 1
    assert qat["model"]["width"] == 4 and qat["head"]["num_classes"] == 8  # the corpus's
