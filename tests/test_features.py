import json
import os
import re

import librosa
import numpy as np
import pytest
import soundfile as sf

from sqjax import data, features
from sqjax.data import DataError


def _wave(seconds=1.0, sr=16000, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.2 * np.sin(2 * np.pi * 3100 * t)
    return (x + 0.05 * rng.normal(size=t.size)).astype(np.float32)


def _reference_logmel(wave, sr=16000, n_mels=80):
    # Frame t = 512 samples from t * 160 with a periodic Hann of 400 centred in it
    # (offset 56), i.e. 400 windowed samples from t * 160 + 56, zero-padded to 512.
    n_fft, win, hop = 512, 400, 160
    offset = (n_fft - win) // 2
    n_frames = 1 + (len(wave) - n_fft) // hop
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
    idx = offset + hop * np.arange(n_frames)[:, None] + np.arange(win)[None, :]
    frames = wave.astype(np.float64)[idx] * hann
    power = np.abs(np.fft.rfft(frames, n=n_fft, axis=1)) ** 2  # (frames, 257)
    mel_basis = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels)  # (n_mels, 257)
    return np.log(power @ mel_basis.T + 1e-6)


@pytest.mark.parametrize("n", [512, 16000, 16159, 16160, 24321])
def test_logmel_shape(n):
    feats = features.logmel(_wave(seconds=n / 16000))
    assert feats.shape == (1 + (n - 512) // 160, 80) and feats.dtype == np.float32


def test_logmel_matches_numpy_reference():
    wave = _wave(seconds=1.3)
    ref = _reference_logmel(wave)
    np.testing.assert_allclose(features.logmel(wave, mean_norm=False), ref, atol=2e-3)
    np.testing.assert_allclose(
        features.logmel(wave, n_mels=40, mean_norm=False),
        _reference_logmel(wave, n_mels=40),
        atol=2e-3,
    )
    normed = features.logmel(wave)
    np.testing.assert_allclose(normed, ref - ref.mean(axis=0), atol=2e-3)
    np.testing.assert_allclose(normed.mean(axis=0), 0.0, atol=1e-4)


def test_logmel_rejects_bad_waves():
    with pytest.raises(ValueError, match=r"wave must be 1-D"):
        features.logmel(np.zeros((2, 16000)))
    with pytest.raises(ValueError, match=r"wave has 300 samples, fewer than one frame"):
        features.logmel(np.zeros(300))


@pytest.fixture
def corpus(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    lengths = {"spkA/u1": 0.5, "spkA/u2": 0.8, "spkB/u1": 1.1}
    for i, sec in enumerate(lengths.values()):
        sf.write(d / f"{i}.wav", _wave(sec, seed=i), 16000, subtype="FLOAT")
    (d / "wav.scp").write_text("".join(f"{u} {i}.wav\n" for i, u in enumerate(lengths)))
    (d / "utt2spk").write_text("".join(f"{u} {u.split('/')[0]}\n" for u in lengths))
    return data.read_kaldi_dir(d)


def test_extract_features_order_and_values(corpus):
    feats = features.extract_features(corpus, progress=False)
    assert [f.shape[0] for f in feats] == [1 + (n - 512) // 160 for n in (8000, 12800, 17600)]
    for f, path in zip(feats, corpus.paths, strict=True):
        np.testing.assert_array_equal(f, features.logmel(data.load_audio(path)))


def test_cache_round_trip_without_recomputing(corpus, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = features.extract_features(corpus, cache_dir=cache, progress=False)
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["n_mels"] == 80 and meta["mean_norm"] is True and meta["sample_rate"] == 16000
    npys = [os.path.join(r, f) for r, _, fs in os.walk(cache) for f in fs if f.endswith(".npy")]
    assert len(npys) == len(corpus)
    assert not [f for _, _, fs in os.walk(cache) for f in fs if f.endswith(".tmp")]

    def fail(*args, **kwargs):
        raise AssertionError("audio was decoded although features are cached")

    monkeypatch.setattr(features, "load_audio", fail)
    second = features.extract_features(corpus, cache_dir=cache, progress=False)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    # Other parameters: refused, not silently mixed.
    with pytest.raises(DataError, match=rf"{re.escape(str(cache / 'meta.json'))}: .*n_mels"):
        features.extract_features(corpus, cache_dir=cache, n_mels=40, progress=False)
    # A stricter min_seconds still applies to cached utterances.
    with pytest.raises(DataError, match=r"shorter than min_seconds=0.6"):
        features.extract_features(corpus, cache_dir=cache, min_seconds=0.6, progress=False)


def test_workers_give_the_same_features(corpus, tmp_path):
    serial = features.extract_features(corpus, progress=False)
    # The workers key and write the cache; the serial pass then reads what they wrote.
    cache = tmp_path / "cache"
    parallel = features.extract_features(corpus, workers=2, cache_dir=cache, progress=False)
    cached = features.extract_features(corpus, cache_dir=cache, progress=False)
    assert len(_npys(cache)) == len(corpus)
    for a, b, c in zip(serial, parallel, cached, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    # Half the cache deleted: the pool computes those, the rest is read here, in order.
    for npy in _npys(cache)[::2]:
        os.remove(npy)
    mixed = features.extract_features(corpus, workers=2, cache_dir=cache, progress=False)
    assert len(_npys(cache)) == len(corpus)
    for a, b in zip(serial, mixed, strict=True):
        np.testing.assert_array_equal(a, b)


def test_errors_in_workers_name_the_file(corpus):
    with pytest.raises(DataError, match=r"0\.wav: 0\.500 s of audio, shorter than min_seconds"):
        features.extract_features(corpus, min_seconds=0.6, workers=2, progress=False)


def _npys(cache):
    return sorted(
        os.path.join(r, f) for r, _, fs in os.walk(cache) for f in fs if f.endswith(".npy")
    )


def _copy_corpus(corpus, tmp_path, name, seed):
    """Same utterance ids and speakers as ``corpus``, other audio (lengths kept)."""
    d = tmp_path / name
    d.mkdir()
    for i, path in enumerate(corpus.paths):
        n = sf.info(path).frames
        sf.write(d / f"{i}.wav", _wave(n / 16000, seed=seed + i), 16000, subtype="FLOAT")
    (d / "wav.scp").write_text("".join(f"{u} {i}.wav\n" for i, u in enumerate(corpus.utts)))
    (d / "utt2spk").write_text("".join(f"{u} {s}\n" for u, s in zip(corpus.utts, corpus.speakers)))
    return data.read_kaldi_dir(d)


def test_cache_tells_apart_equal_utterance_ids(corpus, tmp_path):
    # A noisy copy of a test set keeps its utterance ids: the cache must not serve the
    # first corpus's features for the second.
    other = _copy_corpus(corpus, tmp_path, "other", seed=10)
    assert other.utts == corpus.utts
    cache = tmp_path / "cache"
    first = features.extract_features(corpus, cache_dir=cache, progress=False)
    second = features.extract_features(other, cache_dir=cache, progress=False)
    for a, b, pa, pb in zip(first, second, corpus.paths, other.paths, strict=True):
        np.testing.assert_array_equal(a, features.logmel(sf.read(pa, dtype="float32")[0]))
        np.testing.assert_array_equal(b, features.logmel(sf.read(pb, dtype="float32")[0]))
        assert not np.allclose(a, b)
    assert len(_npys(cache)) == 2 * len(corpus)


def test_cache_refuses_audio_rewritten_in_place(corpus, tmp_path):
    cache = tmp_path / "cache"
    before = features.extract_features(corpus, cache_dir=cache, progress=False)
    path = corpus.paths[1]
    stat = os.stat(path)
    new_wave = _wave(0.8, seed=99)
    sf.write(path, new_wave, 16000, subtype="FLOAT")  # same length, so the same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    assert os.stat(path).st_size == stat.st_size
    after = features.extract_features(corpus, cache_dir=cache, progress=False)
    np.testing.assert_array_equal(after[1], features.logmel(new_wave))
    assert not np.allclose(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[2], before[2])


def test_cache_key_holds_the_feature_parameters(corpus, tmp_path):
    # meta.json refuses other parameters; without it (deleted, or two processes racing to
    # write it), the per-file key still keeps the settings apart.
    cache = tmp_path / "cache"
    features.extract_features(corpus, cache_dir=cache, progress=False)
    os.remove(cache / "meta.json")
    feats = features.extract_features(corpus, cache_dir=cache, n_mels=40, progress=False)
    for f, path in zip(feats, corpus.paths, strict=True):
        np.testing.assert_array_equal(
            f, features.logmel(sf.read(path, dtype="float32")[0], n_mels=40)
        )


def test_missing_audio_with_a_cache_names_the_file(corpus, tmp_path):
    os.remove(corpus.paths[2])
    with pytest.raises(DataError, match=rf"{re.escape(corpus.paths[2])}: audio file not found"):
        features.extract_features(corpus, cache_dir=tmp_path / "cache", progress=False)
