"""augment against independent NumPy/SciPy references: convolution, SNR, noise crops."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.signal
import soundfile as sf

from sqjax import augment
from sqjax.data import DataError


def _waves(batch, samples, seed=0):
    """(batch, samples) float32 noise at row levels spanning 40 dB."""
    rng = np.random.default_rng(seed)
    level = np.geomspace(0.01, 1.0, batch)[:, None]
    return (level * rng.normal(size=(batch, samples))).astype(np.float32)


@pytest.mark.parametrize(("samples", "rir_samples"), [(3000, 800), (1000, 2500)])
def test_reverberate_matches_fftconvolve(samples, rir_samples):
    wave = _waves(8, samples)
    # Unnormalised and distinct: the scale must not matter, the choice must be visible.
    rirs = 3.0 * augment.synthetic_rirs(3, rir_samples, seed=1)
    got = np.asarray(augment.reverberate(jax.random.key(0), jnp.asarray(wave), rirs))
    units = rirs.astype(np.float64) / np.sqrt(np.sum(rirs.astype(np.float64) ** 2, axis=1))[:, None]
    used = set()
    for x, y in zip(wave.astype(np.float64), got, strict=True):
        refs = [scipy.signal.fftconvolve(x, rir)[:samples] for rir in units]
        errors = [np.abs(y - ref).max() / np.abs(ref).max() for ref in refs]
        assert min(errors) < 1e-5, errors  # float32 FFT against float64
        used.add(int(np.argmin(errors)))
    assert len(used) > 1  # RIRs are drawn per example
    # And np.convolve, direct summation, for one example.
    rir = units[used.pop()]
    matches = [
        np.allclose(y, np.convolve(wave[i], rir)[:samples], atol=1e-5) for i, y in enumerate(got)
    ]
    assert any(matches)


def _snr_db(wave, out):
    wave = wave.astype(np.float64)
    noise = out.astype(np.float64) - wave
    return 10 * np.log10(np.mean(wave**2, axis=1) / np.mean(noise**2, axis=1))


def test_add_noise_exact_snr():
    wave = _waves(16, 4000)
    noises = augment.synthetic_noises(4, 6000, seed=2) * np.float32(0.3)  # any level
    for snr in (-5.0, 0.0, 12.5, 30.0):
        out = np.asarray(augment.add_noise(jax.random.key(1), wave, noises, (snr, snr)))
        np.testing.assert_allclose(_snr_db(wave, out), snr, atol=1e-3)


def test_add_noise_snr_range_and_crops():
    """SNRs spread over the range; what is added is a scaled crop of one bank row."""
    batch, samples = 32, 1000
    wave = _waves(batch, samples, seed=3)
    rng = np.random.default_rng(4)
    for noise_samples in (1300, 300):  # crop within a longer row; tile a shorter one
        noises = rng.normal(size=(3, noise_samples)).astype(np.float32)
        out = np.asarray(augment.add_noise(jax.random.key(5), wave, noises, (0.0, 20.0)))
        snr = _snr_db(wave, out)
        assert snr.min() >= -1e-3 and snr.max() <= 20 + 1e-3
        assert snr.max() - snr.min() > 10
        rows_used, offsets = set(), set()
        for x, y in zip(wave, out, strict=True):
            added = y.astype(np.float64) - x
            best = None
            for r, row in enumerate(noises.astype(np.float64)):
                # Every crop the row offers: within it, or of it tiled from any offset.
                tiled = (
                    row if noise_samples >= samples else np.resize(row, noise_samples + samples - 1)
                )
                windows = np.lib.stride_tricks.sliding_window_view(tiled, samples)
                scale = windows @ added / np.sum(windows**2, axis=1)
                residual = np.abs(added[None, :] - scale[:, None] * windows).max(axis=1)
                o = int(np.argmin(residual))
                if best is None or residual[o] < best[0]:
                    best = (residual[o], r, o)
            assert best[0] < 1e-4 * np.abs(added).max()
            rows_used.add(best[1])
            offsets.add(best[2])
        assert len(rows_used) == 3 and len(offsets) > 10


def test_add_noise_silent_rows_stay_finite():
    wave = _waves(4, 800)
    wave[1] = 0.0
    noises = augment.synthetic_noises(2, 800)
    noises[0] = 0.0
    out = np.asarray(augment.add_noise(jax.random.key(0), wave, noises, (5.0, 5.0)))
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[1], 0.0)  # nothing to scale a noise against


@pytest.fixture(scope="module")
def banks():
    return augment.synthetic_noises(6, 3000, seed=7), augment.synthetic_rirs(4, 800, seed=8)


WAVE = _waves(48, 2000, seed=9)  # one shape for every augment test: eager ops compile once


def _augment(key, banks, p_noise, p_reverb):
    return np.asarray(
        augment.augment(key, WAVE, *banks, p_noise=p_noise, p_reverb=p_reverb, snr_db=(0, 15))
    )


def _changed(out):
    """Rows clearly changed (not only by rounding); asserts the others are bit-identical."""
    same = np.all(out == WAVE, axis=1)
    changed = np.abs(out - WAVE).max(axis=1) > 1e-3 * np.abs(WAVE).max(axis=1)
    assert np.all(same ^ changed)
    return changed


def test_augment_chosen_examples_only(banks):
    for p_noise, p_reverb in ((0.5, 0.0), (0.0, 0.5), (0.4, 0.4)):
        changed = _changed(_augment(jax.random.key(2), banks, p_noise, p_reverb))
        expected = 1 - (1 - p_noise) * (1 - p_reverb)
        assert abs(changed.mean() - expected) < 0.25, (p_noise, p_reverb, changed.mean())


def test_augment_probability_zero_and_one(banks):
    np.testing.assert_array_equal(_augment(jax.random.key(0), banks, 0.0, 0.0), WAVE)
    out = augment.augment(jax.random.key(0), WAVE, None, None, p_noise=0, p_reverb=0, snr_db=(0, 1))
    np.testing.assert_array_equal(np.asarray(out), WAVE)
    for p_noise, p_reverb in ((1.0, 0.0), (0.0, 1.0), (1.0, 1.0)):
        assert np.all(_changed(_augment(jax.random.key(3), banks, p_noise, p_reverb)))


def test_augment_jitted_deterministic_in_key(banks):
    f = jax.jit(functools.partial(augment.augment, p_noise=0.5, p_reverb=0.5, snr_db=(0.0, 15.0)))
    a, b, c = (np.asarray(f(jax.random.key(k), WAVE, *banks)) for k in (4, 4, 5))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert 0 < _changed(a).sum() < len(WAVE)


def test_augment_checks_arguments(banks):
    wave = _waves(2, 1000)
    with pytest.raises(ValueError, match="p_noise=0.5 needs a noises bank"):
        augment.augment(
            jax.random.key(0), wave, None, banks[1], p_noise=0.5, p_reverb=0.5, snr_db=(0, 5)
        )
    with pytest.raises(ValueError, match="p_reverb=0.1 needs a rirs bank"):
        augment.augment(
            jax.random.key(0), wave, banks[0], None, p_noise=0.5, p_reverb=0.1, snr_db=(0, 5)
        )
    with pytest.raises(ValueError, match=r"p_noise must be in \[0, 1\], got 1.5"):
        augment.augment(jax.random.key(0), wave, *banks, p_noise=1.5, p_reverb=0.0, snr_db=(0, 5))


def test_synthetic_noises():
    noises = augment.synthetic_noises(8, 16000, seed=3)
    assert noises.shape == (8, 16000) and noises.dtype == np.float32
    assert np.isfinite(noises).all()
    np.testing.assert_allclose(
        np.sqrt(np.mean(noises.astype(np.float64) ** 2, axis=1)), 1.0, rtol=1e-5
    )
    np.testing.assert_array_equal(noises, augment.synthetic_noises(8, 16000, seed=3))
    assert not np.array_equal(noises, augment.synthetic_noises(8, 16000, seed=4))
    # Varied colours: the share of power below 500 Hz is ~1/16 for white noise (row 0),
    # most of it for brown (row 2).
    power = np.abs(np.fft.rfft(noises, axis=1)) ** 2
    low = power[:, np.fft.rfftfreq(16000, 1 / 16000) < 500].sum(axis=1) / power.sum(axis=1)
    assert low[0] < 0.1 and low[2] > 0.9 and 0.1 < low[1] < 0.9
    # Babble (row 3) is modulated: its short-time power varies far more than white noise's.
    frame_power = (noises[[0, 3]].reshape(2, -1, 400) ** 2).mean(axis=2)
    spread = frame_power.std(axis=1) / frame_power.mean(axis=1)
    assert spread[1] > 3 * spread[0]


def test_synthetic_rirs():
    rirs = augment.synthetic_rirs(16, 8000, seed=5)
    assert rirs.shape == (16, 8000) and rirs.dtype == np.float32
    assert np.isfinite(rirs).all()
    np.testing.assert_array_equal(rirs[:, 0], 1.0)  # the direct path
    energy = rirs.astype(np.float64) ** 2
    first, last = energy[:, :2000].sum(axis=1), energy[:, -2000:].sum(axis=1)
    # Even at the longest RT60 (0.8 s) the last quarter (0.375-0.5 s) is ~30 dB down.
    assert np.all(last < 1e-2 * first)
    np.testing.assert_array_equal(rirs, augment.synthetic_rirs(16, 8000, seed=5))
    assert np.abs(rirs[:, 1:]).max() > 0  # there is a tail


def test_load_bank(tmp_path):
    rng = np.random.default_rng(0)
    short = rng.uniform(-0.5, 0.5, 300).astype(np.float32)
    long = rng.uniform(-0.5, 0.5, 1500).astype(np.float32)
    (tmp_path / "b" / "deep").mkdir(parents=True)
    sf.write(tmp_path / "b" / "deep" / "short.wav", short, 16000, subtype="FLOAT")
    sf.write(tmp_path / "a_long.flac", long, 16000, subtype="PCM_24")
    sf.write(tmp_path / "c_8k.wav", long[:500], 8000, subtype="FLOAT")  # resampled to 1000
    (tmp_path / "notes.txt").write_text("not audio")
    bank = augment.load_bank(tmp_path, sample_rate=16000, samples=1000)
    assert bank.shape == (3, 1000) and bank.dtype == np.float32
    np.testing.assert_allclose(bank[0], long[:1000], atol=2**-22)  # cut (24-bit FLAC)
    np.testing.assert_array_equal(bank[1], np.tile(short, 4)[:1000])  # b/deep/short.wav
    assert np.abs(bank[2]).max() > 0.1  # c_8k.wav, resampled from 500 samples
    zeros = augment.load_bank(tmp_path, sample_rate=16000, samples=1000, fill="zeros")
    np.testing.assert_array_equal(zeros[1, :300], short)
    np.testing.assert_array_equal(zeros[1, 300:], 0.0)
    two = augment.load_bank(tmp_path, sample_rate=16000, samples=1000, max_files=2)
    np.testing.assert_array_equal(two, bank[[0, 2]])  # evenly spaced: first and last


def test_load_bank_errors(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no audio")
    with pytest.raises(DataError, match=r"empty: no \.wav or \.flac files under it; point it"):
        augment.load_bank(tmp_path / "empty", sample_rate=16000, samples=100)
    with pytest.raises(DataError, match="missing: not a directory"):
        augment.load_bank(tmp_path / "missing", sample_rate=16000, samples=100)
