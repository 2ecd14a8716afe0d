"""Tests of the built-in synthetic corpus (sqjax.synth), against NumPy/librosa references."""

import json
import pathlib

import librosa
import numpy as np
import pytest
import soundfile as sf

from sqjax import synth

TINY = {
    "n_train_speakers": 3,
    "n_dev_speakers": 2,
    "n_test_speakers": 3,
    "utts_per_speaker": 3,
    "test_utts_per_speaker": 2,
    "min_duration": 0.5,
    "max_duration": 0.8,
    "n_trials": 20,
    "seed": 7,
    "progress": False,
}


def read_table(path: pathlib.Path) -> dict[str, list[str]]:
    """First field -> remaining fields, one line each (Kaldi text files)."""
    rows = [line.split() for line in path.read_text().splitlines()]
    assert all(rows), f"empty line in {path}"
    return {row[0]: row[1:] for row in rows}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
    return synth.generate_corpus(tmp_path_factory.mktemp("synth") / "corpus", **TINY)


def test_voice_and_utterance_are_deterministic():
    voice = synth.sample_voice(np.random.default_rng(3))
    assert voice == synth.sample_voice(np.random.default_rng(3))
    assert voice != synth.sample_voice(np.random.default_rng(4))
    a = synth.synthesize_utterance(voice, np.random.default_rng(1), 0.7)
    b = synth.synthesize_utterance(voice, np.random.default_rng(1), 0.7)
    c = synth.synthesize_utterance(voice, np.random.default_rng(2), 0.7)
    assert a.dtype == np.float32 and a.shape == (11200,)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


@pytest.mark.parametrize("sample_rate", [8000, 16000, 22050])
def test_clean_output_is_finite_bounded_and_at_nominal_level(sample_rate):
    voice = synth.sample_voice(np.random.default_rng(0))
    wave = synth.synthesize_utterance(voice, np.random.default_rng(0), 0.5, sample_rate, 0.0)
    assert wave.shape == (sample_rate // 2,)
    assert np.all(np.isfinite(wave)) and np.max(np.abs(wave)) <= 1.0
    rms_db = 20 * np.log10(np.sqrt(np.mean(wave.astype(np.float64) ** 2)))
    assert rms_db == pytest.approx(-23.0, abs=0.1)


def test_apply_channel_level_range_and_clean_is_a_pure_gain():
    t = np.arange(16000) / 16000
    tone = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.1 * np.sin(2 * np.pi * 2500 * t)
    original = tone.copy()
    clean = synth.apply_channel(tone, np.random.default_rng(0), 0.0, 16000)
    np.testing.assert_allclose(
        clean / np.sqrt(np.mean(clean**2)), tone / np.sqrt(np.mean(tone**2)), atol=1e-5
    )
    levels = []
    for seed in range(10):
        out = synth.apply_channel(tone, np.random.default_rng(seed), 1.0, 16000)
        assert out.dtype == np.float32 and out.shape == tone.shape
        assert np.all(np.isfinite(out)) and np.max(np.abs(out)) <= 1.0
        assert not np.allclose(out / np.std(out), tone / np.std(tone), atol=1e-2)
        levels.append(20 * np.log10(np.sqrt(np.mean(out.astype(np.float64) ** 2))))
    np.testing.assert_array_equal(tone, original)  # the input is not modified
    assert min(levels) >= -27.01 and max(levels) <= -18.99
    assert np.ptp(levels) > 2.0  # the level really is random per utterance


def test_speaker_identity_is_in_the_signal():
    # Independent reference: z-scored mean MFCCs from librosa, cosine similarity.
    n_spk, n_utt = 6, 4
    feats, labels = [], []
    for spk in range(n_spk):
        voice = synth.sample_voice(np.random.default_rng([11, spk]))
        for utt in range(n_utt):
            wave = synth.synthesize_utterance(voice, np.random.default_rng([12, spk, utt]), 2.0)
            mfcc = librosa.feature.mfcc(y=wave, sr=16000, n_mfcc=20, n_fft=512, hop_length=160)
            feats.append(np.concatenate([mfcc[1:].mean(1), mfcc[1:].std(1)]))
            labels.append(spk)
    x = np.array(feats)
    x = (x - x.mean(0)) / x.std(0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cos = x @ x.T
    same = np.equal.outer(labels, labels) & ~np.eye(len(labels), dtype=bool)
    diff = ~np.equal.outer(labels, labels)
    assert cos[same].mean() > cos[diff].mean() + 0.3
    # Nearest other utterance is from the same speaker well above chance (1/6).
    np.fill_diagonal(cos, -np.inf)
    assert np.mean(np.array(labels)[cos.argmax(1)] == np.array(labels)) > 0.6


def test_corpus_layout(corpus):
    splits = {}
    for split in ("train", "dev", "test"):
        scp = read_table(corpus / split / "wav.scp")
        utt2spk = read_table(corpus / split / "utt2spk")
        spk2utt = read_table(corpus / split / "spk2utt")
        assert list(scp) == sorted(scp) and list(utt2spk) == sorted(utt2spk)
        assert set(scp) == set(utt2spk)
        assert {u: s for s, us in spk2utt.items() for u in us} == {
            u: s for u, (s,) in utt2spk.items()
        }
        for utt, (spk,) in utt2spk.items():
            assert utt.startswith(spk + "-")
            path = pathlib.Path(scp[utt][0])
            assert path.is_absolute() and path == corpus / "wav" / spk / f"{utt}.wav"
            info = sf.info(path)
            assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
            assert 0.5 * 16000 - 1 <= info.frames <= 0.8 * 16000 + 1
        n_utt = TINY["utts_per_speaker"] if split == "train" else TINY["test_utts_per_speaker"]
        assert all(len(us) == n_utt for us in spk2utt.values())
        splits[split] = (set(spk2utt), {u: s for u, (s,) in utt2spk.items()})
    assert [len(splits[s][0]) for s in splits] == [3, 2, 3]
    speakers = [splits[s][0] for s in ("train", "dev", "test")]
    assert not (speakers[0] & speakers[1] or speakers[0] & speakers[2] or speakers[1] & speakers[2])

    for split in ("dev", "test"):
        utt2spk = splits[split][1]
        trials = [line.split() for line in (corpus / split / "trials").read_text().splitlines()]
        assert len(trials) == TINY["n_trials"]
        assert sum(label == "target" for _, _, label in trials) == TINY["n_trials"] // 2
        for enroll, test, label in trials:
            assert enroll != test and enroll in utt2spk and test in utt2spk
            assert label == ("target" if utt2spk[enroll] == utt2spk[test] else "nontarget")
    meta = json.loads((corpus / "synth.json").read_text())
    assert meta["version"] == synth.SYNTH_VERSION and meta["seed"] == TINY["seed"]
    assert not list(corpus.rglob("*.tmp*"))  # atomic writes leave no temporary files


def test_target_trials_are_distinct_unordered_pairs_until_they_run_out():
    utts = {s: [f"{s}-{u}" for u in range(4)] for s in ("a", "b", "c")}  # 3 x 6 target pairs
    for n_targets in (18, 30):
        lines = synth._sample_trials(utts, 2 * n_targets, np.random.default_rng(0))
        pairs = [frozenset(x.split()[:2]) for x in lines if x.endswith(" target")]
        assert len(pairs) == n_targets and len(set(pairs)) == 18
        # cycled evenly: each unordered pair as often as the others (+-1)
        counts = [pairs.count(p) for p in set(pairs)]
        assert max(counts) - min(counts) <= 1
        sides = [x.split()[0] for x in lines if x.endswith(" target")]
        assert 0 < sum(s.endswith(("-0", "-1")) for s in sides) < n_targets  # both orders


def test_rerun_is_a_no_op_and_other_arguments_raise(corpus):
    wav = next((corpus / "wav").rglob("*.wav"))
    stamps = [(corpus / "synth.json").stat().st_mtime_ns, wav.stat().st_mtime_ns]
    assert synth.generate_corpus(corpus, **TINY) == corpus
    assert [(corpus / "synth.json").stat().st_mtime_ns, wav.stat().st_mtime_ns] == stamps
    with pytest.raises(ValueError, match=str(corpus)):
        synth.generate_corpus(corpus, **{**TINY, "difficulty": 0.5})


def test_workers_give_identical_files(corpus, tmp_path):
    other = synth.generate_corpus(tmp_path / "parallel", **{**TINY, "workers": 2})
    wavs = sorted(p.relative_to(corpus) for p in (corpus / "wav").rglob("*.wav"))
    assert wavs == sorted(p.relative_to(other) for p in (other / "wav").rglob("*.wav"))
    for rel in wavs:
        assert (corpus / rel).read_bytes() == (other / rel).read_bytes()
    for rel in ("train/utt2spk", "train/spk2utt", "dev/trials", "test/trials", "synth.json"):
        assert (corpus / rel).read_text() == (other / rel).read_text()
    assert (corpus / "test/wav.scp").read_text().replace(str(corpus), str(other)) == (
        other / "test/wav.scp"
    ).read_text()


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="min_duration"):
        synth.generate_corpus(tmp_path, **{**TINY, "min_duration": 2.0, "max_duration": 1.0})
    with pytest.raises(ValueError, match="difficulty"):
        synth.apply_channel(np.zeros(100), np.random.default_rng(0), -1.0, 16000)


def test_synth_command_sizes_every_split(tmp_path, capsys):
    """``sqjax synth`` passes each size to the corpus: speakers per split, utterances per
    speaker, trials per list (counted in the files, not read back from synth.json)."""
    from sqjax import cli

    out = tmp_path / "c"
    cli.main(["synth", "--out", str(out), "--speakers", "2", "--utts", "1", "--dev-speakers", "3",
              "--test-speakers", "4", "--test-utts", "2", "--trials", "10", "--workers", "1"])  # fmt: skip
    assert "corpus in" in capsys.readouterr().out
    for split, n_spk, n_utt in (("train", 2, 1), ("dev", 3, 2), ("test", 4, 2)):
        spk = [line.split()[1] for line in (out / split / "utt2spk").read_text().splitlines()]
        assert len(set(spk)) == n_spk and len(spk) == n_spk * n_utt, split
    for split in ("dev", "test"):
        assert len((out / split / "trials").read_text().splitlines()) == 10
