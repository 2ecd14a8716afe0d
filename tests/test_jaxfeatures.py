"""jaxfeatures against the NumPy/librosa features of sqjax.features, row by row."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sqjax import features, jaxfeatures

# Measured max abs difference (log units) to librosa (sqjax.features.logmel) on the waves
# below: 1.1e-4, on a pure sine's far-from-the-tone bins (power ~1e-5, where float32
# rounding of the FFT is relatively largest); 2e-6 on noise. Both sides are float32.
LOGMEL_ATOL = 3e-4
# Measured max abs difference to features.kaldi_fbank (float64): 2.3e-4, on noise
# (log energies up to ~25; float32 here).
KALDI_ATOL = 5e-4


def _waves(n, seed=0):
    """(4, n): noise, a 440 Hz sine, a speech-like chirp plus tone plus noise, silence."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    chirp = 0.3 * np.sin(2 * np.pi * 220 * t * (1 + 0.3 * t)) + 0.1 * np.sin(2 * np.pi * 3000 * t)
    return np.stack(
        [
            0.1 * rng.normal(size=n),
            0.5 * np.sin(2 * np.pi * 440 * t),
            chirp + 0.05 * rng.normal(size=n),
            np.zeros(n),
        ]
    ).astype(np.float32)


@pytest.mark.parametrize("n", [512, 1000, 24037])
def test_logmel_matches_librosa(n):
    waves = _waves(n)
    for n_mels in (40, 80):
        for mean_norm in (True, False):
            got = np.asarray(jaxfeatures.logmel(waves, n_mels=n_mels, mean_norm=mean_norm))
            want = np.stack([features.logmel(w, n_mels=n_mels, mean_norm=mean_norm) for w in waves])
            assert got.dtype == np.float32
            assert got.shape == want.shape == (4, 1 + (n - 512) // 160, n_mels)
            np.testing.assert_allclose(got, want, rtol=0, atol=LOGMEL_ATOL)


@pytest.mark.parametrize("n", [400, 16037])
def test_kaldi_fbank_matches_numpy(n):
    waves = _waves(n, seed=1)
    for n_mels in (40, 80):
        for mean_norm in (True, False):
            got = np.asarray(jaxfeatures.kaldi_fbank(waves, n_mels=n_mels, mean_norm=mean_norm))
            want = np.stack(
                [features.kaldi_fbank(w, n_mels=n_mels, mean_norm=mean_norm) for w in waves]
            )
            assert got.shape == want.shape == (4, 1 + (n - 400) // 160, n_mels)
            np.testing.assert_allclose(got, want, rtol=0, atol=KALDI_ATOL)


def test_under_jit_other_rate():
    """Jitted, at 8 kHz (n_fft 256, hop 80), batch of 3: still librosa's numbers."""
    waves = _waves(8000)[:3]
    f = jax.jit(functools.partial(jaxfeatures.logmel, sample_rate=8000, n_mels=40))
    got = np.asarray(f(jnp.asarray(waves)))
    want = np.stack([features.logmel(w, sample_rate=8000, n_mels=40) for w in waves])
    assert got.shape == (3, 1 + (8000 - 256) // 80, 40)
    np.testing.assert_allclose(got, want, rtol=0, atol=LOGMEL_ATOL)
    k = jax.jit(jaxfeatures.kaldi_fbank)
    want = np.stack([features.kaldi_fbank(w) for w in waves])
    np.testing.assert_allclose(np.asarray(k(waves)), want, rtol=0, atol=KALDI_ATOL)


@pytest.mark.parametrize(("sample_rate", "hop_ms"), [(16000, 10.0), (8000, 10.0), (16000, 12.5)])
def test_frames_to_samples_round_trip(sample_rate, hop_ms):
    n_fft, _, hop = features._frame_params(sample_rate, 25.0, hop_ms)
    for n_frames in (1, 2, 50, 200):
        samples = jaxfeatures.frames_to_samples(n_frames, sample_rate=sample_rate, hop_ms=hop_ms)
        # The shortest crop with n_frames frames: hop - 1 more keep it, one fewer drops one.
        for extra, frames in ((0, n_frames), (hop - 1, n_frames), (-1, n_frames - 1)):
            count = 1 + (samples + extra - n_fft) // hop if samples + extra >= n_fft else 0
            assert count == frames
        # Shapes only (eval_shape traces, computes nothing): the numbers are tested above.
        logmel = functools.partial(jaxfeatures.logmel, sample_rate=sample_rate, hop_ms=hop_ms)
        wave = jax.ShapeDtypeStruct((1, samples), jnp.float32)
        assert jax.eval_shape(logmel, wave).shape == (1, n_frames, 80)


def test_errors_name_the_parameter():
    with pytest.raises(ValueError, match=r"wave must be \(batch, samples\).*\(1000,\)"):
        jaxfeatures.logmel(np.zeros(1000, np.float32))
    with pytest.raises(ValueError, match="511 samples, fewer than one frame \\(512"):
        jaxfeatures.logmel(np.zeros((2, 511), np.float32))
    with pytest.raises(ValueError, match="399 samples, fewer than one frame \\(400"):
        jaxfeatures.kaldi_fbank(np.zeros((2, 399), np.float32))
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="n_frames must be a positive integer"):
            jaxfeatures.frames_to_samples(bad)
