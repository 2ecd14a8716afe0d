"""kaldi_fbank against kaldi-native-fbank, and the "kaldi" kind through the feature cache."""

import numpy as np
import pytest
import soundfile as sf

from sqjax import data, features
from sqjax.data import DataError

from . import test_features

corpus = test_features.corpus  # the same three-utterance corpus (0.5, 0.8 and 1.1 s)

# Measured max abs difference to kaldi-native-fbank 1.23 on these waves: 1.5e-4 (float32
# arithmetic there, float64 here, on log energies of magnitude up to ~30).
ATOL = 5e-4


def _speech_like(n, seed):
    """Noise plus a gliding and a fixed tone: energy in every mel bin, varying over time."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    x = 0.3 * np.sin(2 * np.pi * 220 * t * (1 + 0.3 * t)) + 0.1 * np.sin(2 * np.pi * 3000 * t)
    return (x + 0.05 * rng.normal(size=n)).astype(np.float32)


def _knf_fbank(wave, n_mels=80):
    knf = pytest.importorskip("kaldi_native_fbank")
    opts = knf.FbankOptions()
    opts.frame_opts.dither = 0
    opts.frame_opts.window_type = "hamming"
    opts.frame_opts.samp_freq = 16000
    opts.mel_opts.num_bins = n_mels
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(16000, (wave * 32768).tolist())
    fb.input_finished()
    return np.stack([fb.get_frame(i) for i in range(fb.num_frames_ready)])


@pytest.mark.parametrize(("n", "seed"), [(400, 0), (559, 1), (16037, 2), (24123, 3), (47999, 4)])
def test_kaldi_fbank_matches_kaldi_native_fbank(n, seed):
    wave = _speech_like(n, seed)
    ref = _knf_fbank(wave)
    feats = features.kaldi_fbank(wave, mean_norm=False)
    assert feats.dtype == np.float32
    assert feats.shape == ref.shape == (1 + (n - 400) // 160, 80)
    np.testing.assert_allclose(feats, ref, rtol=0, atol=ATOL)


def test_kaldi_fbank_log_floor_on_silence_with_40_bins():
    rng = np.random.default_rng(5)
    wave = (0.1 * rng.normal(size=20000)).astype(np.float32)
    wave[5000:12000] = 0.0  # whole frames of digital silence: log(float32 eps)
    ref = _knf_fbank(wave, n_mels=40)
    feats = features.kaldi_fbank(wave, n_mels=40, mean_norm=False)
    assert feats.shape == ref.shape == (1 + (20000 - 400) // 160, 40)
    np.testing.assert_allclose(feats, ref, rtol=0, atol=ATOL)
    floor = np.log(np.finfo(np.float32).eps)
    assert np.isclose(feats.min(), floor) and (ref == ref.min()).sum() >= 40 * 10


def test_kaldi_fbank_mean_norm_subtracts_the_time_mean():
    wave = _speech_like(17000, 6)
    raw = features.kaldi_fbank(wave, mean_norm=False).astype(np.float64)
    normed = features.kaldi_fbank(wave)
    np.testing.assert_allclose(normed, raw - raw.mean(axis=0), atol=1e-5)


def test_kaldi_fbank_rejects_bad_waves():
    with pytest.raises(ValueError, match=r"wave must be 1-D"):
        features.kaldi_fbank(np.zeros((2, 16000)))
    with pytest.raises(ValueError, match=r"wave has 399 samples, fewer than one frame \(400"):
        features.kaldi_fbank(np.zeros(399))


def test_extract_features_kaldi_through_the_cache(corpus, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = features.extract_features(corpus, kind="kaldi", cache_dir=cache, progress=False)
    assert [f.shape[0] for f in first] == [1 + (n - 400) // 160 for n in (8000, 12800, 17600)]
    for f, path in zip(first, corpus.paths, strict=True):
        np.testing.assert_array_equal(f, features.kaldi_fbank(data.load_audio(path)))
    assert len(test_features._npys(cache)) == len(corpus)

    def fail(*args, **kwargs):
        raise AssertionError("audio was decoded although features are cached")

    monkeypatch.setattr(features, "load_audio", fail)
    second = features.extract_features(corpus, kind="kaldi", cache_dir=cache, progress=False)
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    # The cached 0.5 s utterance (8000 samples, 48 frames) passes its own length, but a
    # minimum of 8100 samples needs 1 + (8100 - 400) // 160 = 49 frames; counting frames
    # as logmel does (512 samples) would let it through.
    features.extract_features(
        corpus, kind="kaldi", cache_dir=cache, min_seconds=0.5, progress=False
    )
    with pytest.raises(DataError, match=r"48 frames cached in .*shorter than min_seconds"):
        features.extract_features(
            corpus, kind="kaldi", cache_dir=cache, min_seconds=8100 / 16000, progress=False
        )
    # The default kind on the same cache: refused, not served Kaldi features.
    with pytest.raises(DataError, match=r"meta\.json: .*'kind': \('kaldi', None\)"):
        features.extract_features(corpus, cache_dir=cache, progress=False)


def test_logmel_cache_meta_has_no_kind(corpus, tmp_path):
    # Caches made before kinds existed hold no "kind" and must stay valid for logmel.
    cache = tmp_path / "cache"
    features.extract_features(corpus, cache_dir=cache, progress=False)
    assert "kind" not in (cache / "meta.json").read_text()
    with pytest.raises(DataError, match=r"meta\.json: .*'kind': \(None, 'kaldi'\)"):
        features.extract_features(corpus, kind="kaldi", cache_dir=cache, progress=False)


def test_extract_features_frame_length_per_kind(tmp_path):
    # 450 samples: one Kaldi frame (400), but less than one logmel frame (512); 300: neither.
    d = tmp_path / "short"
    d.mkdir()
    sf.write(d / "0.wav", _speech_like(450, 7), 16000, subtype="FLOAT")
    sf.write(d / "1.wav", _speech_like(300, 8), 16000, subtype="FLOAT")
    (d / "wav.scp").write_text("a 0.wav\n")
    (d / "utt2spk").write_text("a s\n")
    (feats,) = features.extract_features(data.read_kaldi_dir(d), kind="kaldi", progress=False)
    assert feats.shape == (1, 80)
    with pytest.raises(DataError, match=r"0\.wav: 450 samples, fewer than one frame \(512\)"):
        features.extract_features(data.read_kaldi_dir(d), progress=False)
    (d / "wav.scp").write_text("a 1.wav\n")
    with pytest.raises(DataError, match=r"1\.wav: 300 samples, fewer than one frame \(400\)"):
        features.extract_features(data.read_kaldi_dir(d), kind="kaldi", progress=False)


def test_extract_features_rejects_an_unknown_kind(corpus):
    with pytest.raises(ValueError, match=r"features\.kind must be one of .*got 'mfcc'"):
        features.extract_features(corpus, kind="mfcc", progress=False)
