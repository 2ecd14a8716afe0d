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


def test_first_speakers_keeps_their_utterances_and_the_trials_among_them():
    from sqjax import data as data_lib

    speakers = ("b", "a", "c", "a", "c", "b", "a")
    utts = tuple(f"u{i}" for i in range(len(speakers)))
    corpus = data_lib.Corpus(utts, tuple(f"/{u}.wav" for u in utts), speakers)
    raw = [np.full((2, 3), i, np.float32) for i in range(len(utts))]
    pairs = [("u1", "u3", 1), ("u0", "u6", 0), ("u2", "u4", 1), ("u5", "u0", 1), ("u3", "u5", 0)]
    enroll, test, labels = (np.array(x) for x in zip(*pairs))
    trials = data_lib.Trials(enroll, test, labels.astype(bool))
    split = prepare.Split(corpus, raw, trials)

    sub = split.first_speakers(2)  # speakers a and b, by name
    assert sub.corpus.utts == ("u0", "u1", "u3", "u5", "u6")
    assert [int(f[0, 0]) for f in sub.raw_feats] == [0, 1, 3, 5, 6]
    kept = [(e, t) for e, t, _ in pairs if e != "u2" and e != "u4" and t not in ("u2", "u4")]
    assert list(zip(sub.trials.enroll, sub.trials.test)) == kept
    assert sub.trials.labels.tolist() == [True, False, True, False]
    assert split.first_speakers(0) is split and split.first_speakers(3) is split
    only_c = data_lib.Trials(np.array(["u2"]), np.array(["u4"]), np.array([True]))
    with pytest.raises(ValueError, match="no trial"):
        prepare.Split(corpus, raw, only_c).first_speakers(1)
