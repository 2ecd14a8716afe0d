import os
import re

import numpy as np
import pytest
import soundfile as sf

from sqjax import data
from sqjax.data import DataError


def _e(path):
    """A path as a literal regex."""
    return re.escape(str(path))


def _sine(freq=440.0, seconds=0.5, sr=16000, channels=1):
    t = np.arange(int(seconds * sr)) / sr
    x = 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return x if channels == 1 else np.stack([x * (c + 1) / channels for c in range(channels)], 1)


def _write(path, wave, sr=16000):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, wave, sr)
    return str(path)


def _kaldi_dir(tmp_path, wav_lines, spk_lines):
    d = tmp_path / "data"
    d.mkdir(exist_ok=True)
    (d / "wav.scp").write_text("".join(line + "\n" for line in wav_lines))
    if spk_lines is not None:
        (d / "utt2spk").write_text("".join(line + "\n" for line in spk_lines))
    return d


@pytest.fixture
def kaldi_dir(tmp_path):
    abs_wav = _write(str(tmp_path / "elsewhere" / "b.wav"), _sine())
    _write(str(tmp_path / "data" / "audio" / "a.wav"), _sine())
    _write(str(tmp_path / "data" / "audio" / "c.flac"), _sine())
    return _kaldi_dir(
        tmp_path,
        ["uttC audio/c.flac", "", f"uttB {abs_wav}", "uttA audio/a.wav"],
        ["uttA spk2", "uttB spk1", "uttC spk2"],
    )


@pytest.fixture
def vox_root(tmp_path):
    root = tmp_path / "vox"
    for rel in [
        "id10002/vidX/00001.wav",
        "id10001/vidA/00002.flac",
        "id10001/vidA/00001.wav",
        "id10001/vidB/00001.wav",
    ]:
        _write(str(root / rel), _sine())
    (root / "id10001" / "vidA" / "notes.txt").write_text("not audio")
    (root / "README.wav").write_text("wrong depth, ignored")
    return root


def test_read_kaldi_dir_sorts_and_resolves_paths(kaldi_dir, tmp_path):
    corpus = data.read_kaldi_dir(kaldi_dir)
    assert corpus.utts == ("uttA", "uttB", "uttC")
    assert corpus.speakers == ("spk2", "spk1", "spk2")
    assert corpus.paths[0] == str(kaldi_dir / "audio" / "a.wav")  # relative to the data dir
    assert corpus.paths[1] == str(tmp_path / "elsewhere" / "b.wav")  # absolute kept
    assert all(os.path.isfile(p) for p in corpus.paths)
    names, idx = corpus.speaker_ids()
    assert names == ["spk1", "spk2"]
    np.testing.assert_array_equal(idx, [1, 0, 1])
    sub = corpus.subset(["uttC", "uttA", "uttC"])
    assert sub.utts == ("uttA", "uttC") and sub.speakers == ("spk2", "spk2")
    assert sub.paths == (corpus.paths[0], corpus.paths[2])
    assert data.read_corpus(kaldi_dir) == corpus


def test_read_voxceleb_dir(vox_root):
    corpus = data.read_voxceleb_dir(vox_root)
    assert corpus.utts == (
        "id10001/vidA/00001.wav",
        "id10001/vidA/00002.flac",
        "id10001/vidB/00001.wav",
        "id10002/vidX/00001.wav",
    )
    assert corpus.speakers == ("id10001", "id10001", "id10001", "id10002")
    assert corpus.paths[3] == str(vox_root / "id10002" / "vidX" / "00001.wav")
    assert data.read_corpus(vox_root) == corpus
    assert len(corpus) == 4


def test_read_trials_both_formats(tmp_path, vox_root):
    corpus = data.read_voxceleb_dir(vox_root)
    path = tmp_path / "trials.txt"
    a, b, c = corpus.utts[0], corpus.utts[2], corpus.utts[3]
    path.write_text(f"1 {a} {b}\n\n0 {a} {c}\n{b} {c} nontarget\n{b} {a} target\n")
    trials = data.read_trials(path, corpus)
    assert len(trials) == 4
    assert trials.enroll.tolist() == [a, a, b, b]
    assert trials.test.tolist() == [b, c, c, a]
    assert trials.labels.dtype == bool and trials.labels.tolist() == [True, False, False, True]
    # Without a corpus, any ids are accepted (with one, these raise: see below).
    path.write_text("1 id9/x/1.wav id8/y/2.wav\nu7 u8 nontarget\n")
    trials = data.read_trials(path)
    assert trials.enroll.tolist() == ["id9/x/1.wav", "u7"]
    assert trials.test.tolist() == ["id8/y/2.wav", "u8"]
    assert trials.labels.tolist() == [True, False]


def test_load_audio_resamples_down_and_keeps_frequency(tmp_path):
    path = _write(str(tmp_path / "32k.wav"), _sine(freq=1000.0, seconds=1.0, sr=32000), sr=32000)
    wave = data.load_audio(path, sample_rate=16000)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - 16000) <= 1
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    peak_hz = np.argmax(spectrum) * 16000 / len(wave)
    assert abs(peak_hz - 1000.0) < 2.0


def test_load_audio_refuses_lower_rates_unless_asked(tmp_path):
    path = _write(str(tmp_path / "8k.wav"), _sine(freq=1000.0, seconds=1.0, sr=8000), sr=8000)
    with pytest.raises(data.DataError, match=r"8k.wav: 8000 Hz audio, below data.sample_rate"):
        data.load_audio(path, sample_rate=16000)
    wave = data.load_audio(path, sample_rate=16000, upsample=True)  # what noise banks ask
    assert abs(len(wave) - 16000) <= 1
    # Nothing above the old Nyquist (4 kHz) was invented by the resampler.
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    freqs = np.fft.rfftfreq(len(wave), 1 / 16000)
    assert abs(freqs[np.argmax(spectrum)] - 1000.0) < 2.0
    assert spectrum[freqs > 4200].max() < 1e-3 * spectrum.max()


def test_load_audio_refuses_more_than_two_channels(tmp_path):
    path = str(tmp_path / "three.wav")
    sf.write(path, np.zeros((1600, 3), np.float32), 16000)
    with pytest.raises(data.DataError, match=r"three.wav: 3 channels"):
        data.load_audio(path)


def test_load_audio_reads_24_bit_pcm_exactly(tmp_path):
    # 24-bit PCM is lossless audio (studio corpora): read as int / 2^23, no refusal.
    ints = np.random.default_rng(0).integers(-(2**23), 2**23, size=4000)
    path = str(tmp_path / "24.wav")
    sf.write(path, (ints << 8).astype(np.int32), 16000, subtype="PCM_24")  # top 24 bits
    np.testing.assert_array_equal(data.load_audio(path), (ints / 2.0**23).astype(np.float32))


def test_load_audio_stereo_is_mean(tmp_path):
    stereo = _sine(channels=2)  # channels x/2 and x
    path = _write(str(tmp_path / "st.wav"), stereo)
    wave = data.load_audio(path)
    expected = sf.read(path, dtype="float32")[0].mean(axis=1)
    np.testing.assert_allclose(wave, expected, atol=1e-7)
    np.testing.assert_allclose(wave, 0.75 * _sine(), atol=1e-4)  # 16-bit PCM rounding


# --- Bad inputs: each message names the file (and line) and says what is wrong. ---


def test_corrupt_audio(tmp_path):
    path = tmp_path / "corrupt.wav"
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(DataError, match=rf"{_e(path)}: cannot read audio.*corrupt"):
        data.load_audio(path)


def test_empty_audio(tmp_path):
    path = _write(str(tmp_path / "empty.wav"), np.zeros(0, np.float32))
    with pytest.raises(DataError, match=rf"{_e(path)}: empty audio \(0 samples\)"):
        data.load_audio(path)


def test_too_short_audio(tmp_path):
    path = _write(str(tmp_path / "short.wav"), _sine(seconds=0.5))
    assert len(data.load_audio(path, min_seconds=0.5)) == 8000
    with pytest.raises(DataError, match=rf"{_e(path)}: 0.500 s.*shorter than min_seconds=1.0"):
        data.load_audio(path, min_seconds=1.0)


def test_missing_audio(tmp_path):
    with pytest.raises(DataError, match=rf"{_e(tmp_path / 'nope.wav')}: audio file not found"):
        data.load_audio(tmp_path / "nope.wav")


def test_unknown_utt_in_trials(tmp_path, vox_root):
    corpus = data.read_voxceleb_dir(vox_root)
    path = tmp_path / "trials.txt"
    path.write_text(f"1 {corpus.utts[0]} {corpus.utts[1]}\n0 {corpus.utts[0]} id9/x/1.wav\n")
    with pytest.raises(
        DataError,
        match=rf"{_e(path)}:2: utterance 'id9/x/1\.wav' is not in the "
        rf"corpus.*data dir may not match",
    ):
        data.read_trials(path, corpus)


@pytest.mark.parametrize("line", ["1 a", "2 a b", "a b maybe", "1 a b c"])
def test_malformed_trial_line(tmp_path, line):
    path = tmp_path / "trials.txt"
    path.write_text(f"a b target\n\n{line}\n")
    with pytest.raises(DataError, match=rf"{_e(path)}:3: expected .*got '{line}'"):
        data.read_trials(path)


def test_empty_trial_list(tmp_path):
    path = tmp_path / "trials.txt"
    path.write_text("\n\n")
    with pytest.raises(DataError, match=rf"{_e(path)}: no trials"):
        data.read_trials(path)


def test_malformed_wav_scp_line(tmp_path):
    d = _kaldi_dir(tmp_path, ["u1 a.wav", "u2"], ["u1 s", "u2 s"])
    expected = rf"{_e(d / 'wav.scp')}:2: expected '<utt> <path>', got 'u2'"
    with pytest.raises(DataError, match=expected):
        data.read_kaldi_dir(d)


def test_duplicate_utt_in_wav_scp(tmp_path):
    d = _kaldi_dir(tmp_path, ["u1 a.wav", "u1 b.wav"], ["u1 s"])
    with pytest.raises(DataError, match=rf"{_e(d / 'wav.scp')}:2: duplicate utterance id 'u1'"):
        data.read_kaldi_dir(d)


def test_missing_utt2spk(tmp_path):
    d = _kaldi_dir(tmp_path, ["u1 a.wav"], None)
    with pytest.raises(DataError, match=rf"{_e(d / 'utt2spk')}: not found"):
        data.read_corpus(d)


def test_utt_sets_must_match(tmp_path):
    d = _kaldi_dir(tmp_path, ["u1 a.wav", "u2 b.wav"], ["u1 s"])
    with pytest.raises(DataError, match=rf"{_e(d / 'wav.scp')}:2: utterance 'u2' has no speaker"):
        data.read_kaldi_dir(d)
    d = _kaldi_dir(tmp_path, ["u1 a.wav"], ["u1 s", "u3 s"])
    with pytest.raises(DataError, match=rf"{_e(d / 'utt2spk')}:2: utterance 'u3' is not in"):
        data.read_kaldi_dir(d)


def test_piped_wav_scp(tmp_path):
    d = _kaldi_dir(tmp_path, ["u1 a.wav", "u2 sox b.flac -t wav - |"], ["u1 s", "u2 s"])
    with pytest.raises(DataError, match=rf"{_e(d / 'wav.scp')}:2: piped command.*not supported"):
        data.read_kaldi_dir(d)


def test_nonexistent_path(tmp_path):
    with pytest.raises(DataError, match=rf"{_e(tmp_path / 'missing')}: does not exist"):
        data.read_corpus(tmp_path / "missing")
    with pytest.raises(DataError, match=rf"{_e(tmp_path / 'missing.txt')}: trial list not found"):
        data.read_trials(tmp_path / "missing.txt")


def test_voxceleb_without_audio(tmp_path):
    root = tmp_path / "vox2"
    (root / "id1" / "vid").mkdir(parents=True)
    (root / "id1" / "vid" / "00001.m4a").write_bytes(b"")
    with pytest.raises(DataError, match=rf"{_e(root)}: no .wav or .flac files.*m4a"):
        data.read_corpus(root)
