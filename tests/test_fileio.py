"""Remote paths: data dirs, trial lists, audio and run-directory files on an object store
(a fake ``s3://``: fsspec's in-memory filesystem behind ``etils.epath``), and ``file://``
URLs for a whole run (training, checkpoints, resume, evaluation)."""

import io
import json
import sys

import numpy as np
import pytest
import soundfile as sf
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem

from sqjax import augment, data, features, fileio, pipeline, prepare, runs, workdir


class _FakeS3(MemoryFileSystem):
    """An object store in memory, served for ``s3://`` URLs (as s3fs would)."""

    protocol = ("s3",)
    root_marker = ""

    @classmethod
    def _strip_protocol(cls, path):
        return str(path).removeprefix("s3://").rstrip("/")


@pytest.fixture
def s3(monkeypatch):
    registry = sys.modules["fsspec.registry"]._registry
    monkeypatch.setitem(registry, "s3", _FakeS3)
    monkeypatch.setattr(_FakeS3, "store", {})
    monkeypatch.setattr(_FakeS3, "pseudo_dirs", [""])
    _FakeS3.clear_instance_cache()
    return "s3://bucket"


def _put_wav(url, wave, sr=16000):
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format="WAV", subtype="FLOAT")
    epath.Path(url).parent.mkdir(parents=True, exist_ok=True)
    epath.Path(url).write_bytes(buf.getvalue())


def test_paths_and_file_urls(tmp_path):
    assert fileio.local(f"file://{tmp_path}/x") == f"{tmp_path}/x"
    assert not fileio.is_remote(f"file://{tmp_path}") and fileio.is_remote("gs://b/x")
    assert fileio.join("gs://b/data/", "a/b.wav") == "gs://b/data/a/b.wav"
    assert fileio.join("gs://b/data", "/abs/b.wav") == "/abs/b.wav"
    assert fileio.join(f"file://{tmp_path}", "a.wav") == f"{tmp_path}/a.wav"
    assert fileio.join("rel", "a.wav") == str(tmp_path.cwd() / "rel" / "a.wav")


def test_file_urls_in_a_config_become_local_paths(tmp_path):
    """Where a config enters (a config file's overrides, a run's saved config.json), its
    path settings lose their file:// prefix; other settings and remote URLs are kept."""
    from pathlib import Path

    from sqjax.config import load_config

    tiny = Path(__file__).parents[1] / "configs" / "tiny.py"
    c = load_config(
        tiny,
        [
            f"--config.data.train=file://{tmp_path}/train",
            "--config.data.test=gs://b/test",
            f"--config.data.augment.noise_dir=file://{tmp_path}/musan",
            f"--config.quant.init_from=file://{tmp_path}/fp32",
            "--config.model.name=file://not-a-path",
        ],
    )
    assert c.data.train == f"{tmp_path}/train" and c.data.test == "gs://b/test"
    assert c.data.augment.noise_dir == f"{tmp_path}/musan"
    assert c.quant.init_from == f"{tmp_path}/fp32" and c.model.name == "file://not-a-path"
    saved = {"quant": {"init_from": f"file://{tmp_path}/fp32"}, "data": {"cal": "file:///c"}}
    workdir.write_json(tmp_path / "run" / "config.json", saved)
    run = workdir.load_run_config(tmp_path / "run")
    assert run.quant.init_from == f"{tmp_path}/fp32" and run.data.cal == "/c"


def test_remote_corpora_trials_and_audio(s3, tmp_path):
    rng = np.random.default_rng(0)
    waves = {u: rng.normal(size=1600 * (i + 1)).astype(np.float32) for i, u in enumerate("abc")}
    for u, w in waves.items():
        _put_wav(f"{s3}/kaldi/wav/{u}.wav", w)
        _put_wav(f"{s3}/vox/id{u}/video/00001.wav", w)
    epath.Path(f"{s3}/kaldi/wav.scp").write_text("".join(f"{u} wav/{u}.wav\n" for u in waves))
    epath.Path(f"{s3}/kaldi/utt2spk").write_text("a s1\nb s1\nc s2\n")
    epath.Path(f"{s3}/trials").write_text("a c nontarget\na b target\n")

    corpus = data.read_corpus(f"{s3}/kaldi")
    assert corpus.paths == tuple(f"{s3}/kaldi/wav/{u}.wav" for u in "abc")
    assert corpus.speakers == ("s1", "s1", "s2")
    trials = data.read_trials(f"{s3}/trials", corpus)
    assert trials.labels.tolist() == [False, True]
    for path, w in zip(corpus.paths, waves.values(), strict=True):
        np.testing.assert_array_equal(data.load_audio(path), w)
    crop = pipeline.read_crop(corpus.paths[2], 1000, 16000, np.random.default_rng(0))
    assert crop.shape == (1000,) and np.isin(crop, waves["c"]).all()
    vox = data.read_corpus(f"{s3}/vox")
    assert vox.utts == ("ida/video/00001.wav", "idb/video/00001.wav", "idc/video/00001.wav")
    assert vox.speakers == ("ida", "idb", "idc")

    # Features of remote audio, cached locally, keyed by the object's size and mtime.
    cache = prepare.data_cache_dir(tmp_path / "cache", f"{s3}/kaldi")
    got = features.extract_features(corpus, cache_dir=cache, workers=1, progress=False)
    ref = [features.logmel(w) for w in waves.values()]
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g, r, atol=1e-5)
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 3
    with pytest.raises(ValueError, match="must be a local folder"):
        prepare.data_cache_dir(f"{s3}/cache", f"{s3}/kaldi")
    # An object rewritten with other audio of the same size is not served from the cache.
    _put_wav(corpus.paths[0], -waves["a"])
    again = features.extract_features(corpus, cache_dir=cache, workers=1, progress=False)
    np.testing.assert_allclose(again[0], features.logmel(-waves["a"]), atol=1e-5)
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 4

    # A noise bank from a folder on the store (every audio object below it, sorted).
    bank = augment.load_bank(f"{s3}/vox", sample_rate=16000, samples=2000)
    np.testing.assert_array_equal(bank[1], np.resize(waves["b"], 2000))
    assert bank.shape == (3, 2000)

    with pytest.raises(data.DataError, match=r"s3://bucket/nope/wav.scp: not found"):
        data.read_kaldi_dir(f"{s3}/nope")
    with pytest.raises(data.DataError, match=r"s3://bucket/kaldi/wav/zz.wav: audio file not found"):
        data.load_audio(f"{s3}/kaldi/wav/zz.wav")


def test_commands_on_local_runs_only_name_the_url(s3):
    for fn in (runs.ptq_workdir, runs.export_workdir):
        with pytest.raises(ValueError, match=r"--workdir=s3://bucket/run: this command works"):
            fn(f"{s3}/run")


def test_remote_run_directory_files(s3):
    run = f"{s3}/runs/r1"
    workdir.write_json(f"{run}/config.json", {"seed": 7, "train": {"num_steps": 3}})
    config = workdir.load_run_config(run)
    assert config.seed == 7 and config.train.num_steps == 3 and config.train.batch_size == 128
    workdir.atomic_write(f"{run}/blob.npz", lambda f: np.savez(f, x=np.arange(3)))
    with epath.Path(f"{run}/blob.npz").open("rb") as f:
        np.testing.assert_array_equal(np.load(f)["x"], np.arange(3))
    for step in (1, 2, 3):
        workdir.append_line(f"{run}/metrics.jsonl", json.dumps({"step": step}))
    workdir.truncate_log(f"{run}/metrics.jsonl", 2)
    assert epath.Path(f"{run}/metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'


def test_file_urls_train_resume_and_evaluate(tiny_config, tmp_path):
    c = tiny_config.copy_and_resolve_references()
    d = prepare.resolve_paths(c)  # the built-in corpus, named by file:// URLs below
    c.data.synth = False
    c.data.train, c.data.test = f"file://{d.train}", f"file://{d.test}"
    c.data.test_trials, c.data.feature_cache = f"file://{d.test_trials}", d.feature_cache
    c.train.num_steps, c.train.checkpoint_every = 2, 1
    url = f"file://{tmp_path}/run"
    first = runs.train_and_evaluate(c, url)
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()
    assert json.loads((tmp_path / "run" / "metrics_test.json").read_text())["eer"] == first["eer"]
    c.train.num_steps = 3  # the run is found through its URL: other settings are refused
    with pytest.raises(ValueError, match="changed: train.num_steps"):
        runs.train_and_evaluate(c, url)
    c.train.num_steps = 2
    assert runs.train_and_evaluate(c, url)["eer"] == first["eer"]
