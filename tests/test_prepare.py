"""Tests of sqjax.prepare: data dirs to features, with one feature cache for several dirs."""

import os

import numpy as np
import pytest
import soundfile as sf

from sqjax import features, prepare

UTTS = {"spkA-1": "spkA", "spkA-2": "spkA", "spkB-1": "spkB"}


def _data_dir(root, seed):
    """A Kaldi data dir with the utterance ids of UTTS; audio depends on ``seed``."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for utt in UTTS:
        wave = 0.1 * rng.normal(size=int(rng.integers(6000, 9000))).astype(np.float32)
        sf.write(root / f"{utt}.wav", wave, 16000, subtype="FLOAT")
    (root / "wav.scp").write_text("".join(f"{u} {u}.wav\n" for u in UTTS))
    (root / "utt2spk").write_text("".join(f"{u} {s}\n" for u, s in UTTS.items()))
    (root / "trials").write_text("spkA-1 spkA-2 target\nspkA-1 spkB-1 nontarget\n")
    return root


def _load(data_dir, cache, trials=None):
    return prepare.load_split(
        str(data_dir),
        trials,
        sample_rate=16000,
        n_mels=40,
        cache_dir=str(cache),
        min_seconds=0.0,
        workers=1,
        progress=False,
    )


def _reference(path):
    # Independent of the cache and of load_audio: the file as written, straight to logmel.
    return features.logmel(sf.read(path, dtype="float32")[0], n_mels=40, mean_norm=False)


def test_data_dirs_with_equal_utterance_ids_share_a_cache(tmp_path):
    clean = _data_dir(tmp_path / "clean" / "test", seed=0)
    noisy = _data_dir(tmp_path / "noisy" / "test", seed=1)  # same name, same ids
    cache = tmp_path / "cache"
    a = _load(clean, cache, str(clean / "trials"))
    b = _load(noisy, cache, str(noisy / "trials"))
    assert a.corpus.utts == b.corpus.utts == tuple(sorted(UTTS))
    for fa, fb, utt in zip(a.raw_feats, b.raw_feats, a.corpus.utts, strict=True):
        np.testing.assert_array_equal(fa, _reference(clean / f"{utt}.wav"))
        np.testing.assert_array_equal(fb, _reference(noisy / f"{utt}.wav"))
        assert fa.shape != fb.shape or not np.allclose(fa, fb)
    # Each data dir has its own folder, named after it.
    subdirs = sorted(os.listdir(cache))
    assert len(subdirs) == 2 and all(s.startswith("test-") for s in subdirs)
    for s in subdirs:
        assert os.path.isfile(cache / s / "meta.json")


def test_cached_features_are_reused(tmp_path, monkeypatch):
    d = _data_dir(tmp_path / "dev", seed=2)
    cache = tmp_path / "cache"
    first = _load(d, cache)

    def fail(*args, **kwargs):
        raise AssertionError("audio was decoded although its features are cached")

    monkeypatch.setattr(features, "load_audio", fail)
    # The same dir by another spelling of its path: still the same cache entries.
    again = _load(tmp_path / "dev" / ".." / "dev", cache)
    for f1, f2 in zip(first.raw_feats, again.raw_feats, strict=True):
        np.testing.assert_array_equal(f1, f2)
    with pytest.raises(AssertionError, match="decoded"):
        _load(_data_dir(tmp_path / "new", seed=3), cache)


def test_warns_of_a_cache_in_the_old_layout(tmp_path, caplog):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "meta.json").write_text('{"version": 1}')
    with caplog.at_level("WARNING", logger="sqjax"):
        _load(_data_dir(tmp_path / "dev", seed=4), cache)
    assert f"{cache} holds features cached by an older sqjax" in caplog.text
