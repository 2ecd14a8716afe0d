"""WeSpeaker-style waveform augmentation in JAX: reverberation and additive noise.

Pure, jit-able functions of a PRNG key and a (batch, samples) wave, for the training step
on the accelerator; hosts only decode audio. The noise and RIR banks are plain arrays,
made once: from audio folders (``load_bank`` on MUSAN or RIRS_NOISES) or synthetic
(``synthetic_noises``, ``synthetic_rirs``) when no such corpus is at hand.

As WeSpeaker: an RIR is normalised to unit energy and the convolution is truncated to the
input length (no delay compensation, no rescaling of the output); a noise is scaled to a
random SNR drawn uniformly per example. Unlike WeSpeaker, SNRs are exact (no 1e-5 floor in
the powers) and one SNR range serves the whole noise bank.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from sqjax import fileio
from sqjax.data import DataError, load_audio

_AUDIO_EXTENSIONS = (".wav", ".flac")
_EPS = 1e-10  # guards the power ratios of silent rows; far below any audible power


def _unit_rms(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True))


def _coloured(rng: np.random.Generator, samples: int, exponent: float) -> np.ndarray:
    """(samples,) Gaussian noise with power spectrum ~ 1 / f**exponent (DC removed)."""
    spectrum = rng.normal(size=samples // 2 + 1) + 1j * rng.normal(size=samples // 2 + 1)
    f = np.arange(samples // 2 + 1, dtype=np.float64)
    spectrum[1:] *= f[1:] ** (-exponent / 2)
    spectrum[0] = 0.0
    return np.fft.irfft(spectrum, n=samples)


def _babble(rng: np.random.Generator, samples: int, sample_rate: int) -> np.ndarray:
    """(samples,) a few 'talkers': band-limited noise gated by slow syllable-rate envelopes."""
    out = np.zeros(samples)
    t = np.arange(samples) / sample_rate
    f = np.fft.rfftfreq(samples, 1 / sample_rate)
    for _ in range(rng.integers(3, 8)):
        # A speech-like band (a few hundred Hz to a few kHz) with a 1/f tilt.
        low, high = rng.uniform(100, 300), rng.uniform(2500, 4500)
        band = (f > low) & (f < high)
        spectrum = rng.normal(size=f.size) + 1j * rng.normal(size=f.size)
        spectrum *= band / np.maximum(f, 1.0) ** 0.5
        voice = np.fft.irfft(spectrum, n=samples)
        # Syllables at 3-6 Hz: a half-wave rectified sine with a random phase.
        rate, phase = rng.uniform(3, 6), rng.uniform(0, 2 * np.pi)
        envelope = np.maximum(np.sin(2 * np.pi * rate * t + phase), 0.0) ** 2
        out += _unit_rms(voice) * envelope * rng.uniform(0.5, 1.0)
    return out


def synthetic_noises(n: int, samples: int, sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A bank of varied synthetic noises, for when no MUSAN is at hand.

    Rows cycle through white-, pink- and brown-like noise (spectral exponents jittered
    around 0, 1 and 2) and babble-like noise (3 to 7 band-limited noise 'talkers', each
    gated at a syllable rate of 3 to 6 Hz).

    Returns:
      (n, samples) float32, each row of unit RMS; the same for the same seed.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        kind = i % 4
        if kind == 3:
            row = _babble(rng, samples, sample_rate)
        else:
            row = _coloured(rng, samples, kind + rng.uniform(-0.25, 0.25))
        rows.append(_unit_rms(row))
    return np.asarray(rows, dtype=np.float32).reshape(n, samples)


def synthetic_rirs(n: int, samples: int, sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A bank of synthetic room impulse responses, for when no RIRS_NOISES is at hand.

    Each is a unit direct-path impulse at sample 0, then after 1 to 5 ms a tail of Gaussian
    noise whose energy decays by 60 dB over an RT60 drawn uniformly in 0.2-0.8 s, with a
    direct-to-reverberant energy ratio drawn in -3 to 9 dB.

    Returns:
      (n, samples) float32, truncated to ``samples``; the same for the same seed.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / sample_rate
    rirs = np.zeros((n, samples))
    for i in range(n):
        rt60 = rng.uniform(0.2, 0.8)
        start = int(rng.uniform(0.001, 0.005) * sample_rate)
        # Amplitude exp(-6.908 t / rt60) is energy down 60 dB (10**-6) at t = rt60.
        tail = rng.normal(size=samples) * np.exp(-np.log(1e3) * t / rt60)
        tail[: max(start, 1)] = 0.0
        drr_db = rng.uniform(-3, 9)
        tail *= np.sqrt(10 ** (-drr_db / 10) / max(np.sum(tail**2), 1e-30))
        rirs[i] = tail
        rirs[i, 0] = 1.0
    return rirs.astype(np.float32)


def load_bank(
    folder: str | os.PathLike,
    *,
    sample_rate: int,
    samples: int,
    max_files: int | None = 2000,
    fill: str = "tile",
) -> np.ndarray:
    """Every .wav/.flac file under ``folder`` (recursive, sorted) as one fixed-length bank.

    For MUSAN (noise, music, speech folders) or RIRS_NOISES (``simulated_rirs``, or
    ``real_rirs_isotropic_noises`` filtered to the RIR files). Files are read with
    ``sqjax.data.load_audio`` (mono, resampled to ``sample_rate``).

    Args:
      samples: row length: longer files are cut to their first ``samples`` samples.
      max_files: at most this many files, evenly spaced over the sorted list (RIRS_NOISES
        holds 60,000 RIRs); None for all.
      fill: how a shorter file is lengthened: ``"tile"`` (repeat it; for noises) or
        ``"zeros"`` (pad with zeros; for RIRs, where a repeat would be a second echo).

    Returns:
      (files, samples) float32.
    """
    folder = os.fspath(folder)
    if max_files is not None and max_files < 1:
        raise ValueError(f"max_files must be >= 1 or None, got {max_files}")
    if fill not in ("tile", "zeros"):
        raise ValueError(f"fill must be 'tile' or 'zeros', got {fill!r}")
    if not fileio.as_path(folder).is_dir():
        raise DataError(f"{folder}: not a directory; pass the folder holding the audio files")
    if fileio.is_remote(folder):  # the store's walk names folders without the scheme
        scheme = folder.split("://", 1)[0]
        walk = (
            (f"{scheme}://{str(r).split('://')[-1]}", d, n)
            for r, d, n in fileio.as_path(folder).walk()
        )
    else:
        walk = os.walk(folder)
    found = (f"{r.rstrip('/')}/{name}" for r, _, names in walk for name in names)
    paths = sorted(f for f in found if f.lower().endswith(_AUDIO_EXTENSIONS))
    if not paths:
        raise DataError(
            f"{folder}: no .wav or .flac files under it; point it at the unpacked MUSAN or "
            f"RIRS_NOISES folder (or use synthetic_noises / synthetic_rirs)"
        )
    if max_files is not None and len(paths) > max_files:
        paths = [paths[i] for i in np.linspace(0, len(paths) - 1, max_files).round().astype(int)]
    bank = np.zeros((len(paths), samples), dtype=np.float32)
    for row, path in zip(bank, paths, strict=True):
        wave = load_audio(path, sample_rate, upsample=True)[:samples]
        row[:] = (
            np.resize(wave, samples) if fill == "tile" else np.pad(wave, (0, samples - len(wave)))
        )
    return bank


def add_noise(
    key: jax.Array, wave: jax.Array, noises: jax.Array, snr_db: tuple[float, float]
) -> jax.Array:
    """Adds a random noise of the bank to each example at a random SNR.

    Per example: a random row of ``noises``, a random crop of it (tiled when shorter than
    the wave), an SNR uniform in ``snr_db``; the noise is scaled so that 10 log10 of the
    mean-square ratio of wave to added noise is that SNR. A silent wave or noise row adds
    nothing.

    Args:
      wave: (batch, samples) float32.
      noises: (n_noises, noise_samples) float32.
      snr_db: (low, high) in dB.

    Returns:
      (batch, samples) float32.
    """
    noises = jnp.asarray(noises)
    batch, samples = wave.shape
    n_noises, noise_samples = noises.shape
    k_row, k_offset, k_snr = jax.random.split(key, 3)
    row = jax.random.randint(k_row, (batch,), 0, n_noises)
    # A crop within the row when it is long enough, else a tiling from a random phase.
    max_offset = noise_samples - samples + 1 if noise_samples >= samples else noise_samples
    offset = jax.random.randint(k_offset, (batch,), 0, max_offset)
    position = (offset[:, None] + jnp.arange(samples)[None, :]) % noise_samples
    noise = noises[row[:, None], position]  # (batch, samples)
    snr = jax.random.uniform(k_snr, (batch,), minval=snr_db[0], maxval=snr_db[1])
    p_wave = jnp.mean(wave**2, axis=1)
    p_noise = jnp.mean(noise**2, axis=1)
    scale = jnp.sqrt(p_wave / (p_noise * 10.0 ** (snr / 10.0) + _EPS))
    return wave + scale[:, None] * noise


def reverberate(key: jax.Array, wave: jax.Array, rirs: jax.Array) -> jax.Array:
    """Convolves each example with a random RIR of the bank, normalised to unit energy.

    As WeSpeaker: ``rir / sqrt(sum rir**2)``, the full linear convolution (by FFT) cut to
    the first ``samples`` samples.

    Args:
      wave: (batch, samples) float32.
      rirs: (n_rirs, rir_samples) float32.

    Returns:
      (batch, samples) float32.
    """
    rirs = jnp.asarray(rirs)
    batch, samples = wave.shape
    rir = rirs[jax.random.randint(key, (batch,), 0, rirs.shape[0])]  # (batch, rir_samples)
    rir = rir / jnp.sqrt(jnp.sum(rir**2, axis=1, keepdims=True) + _EPS)
    # Only the first `samples` outputs are kept, so later RIR samples never reach them.
    rir = rir[:, :samples]
    size = 1 << (samples + rir.shape[1] - 2).bit_length()  # power of two >= full length
    spectrum = jnp.fft.rfft(wave, n=size, axis=1) * jnp.fft.rfft(rir, n=size, axis=1)
    return jnp.fft.irfft(spectrum, n=size, axis=1)[:, :samples].astype(wave.dtype)


def augment(
    key: jax.Array,
    wave: jax.Array,
    noises: jax.Array | None,
    rirs: jax.Array | None,
    *,
    p_noise: float,
    p_reverb: float,
    snr_db: tuple[float, float],
) -> jax.Array:
    """Per example: reverberation with probability ``p_reverb``, then noise with ``p_noise``.

    Examples not chosen for a step pass through it bit-identical. The probabilities are
    Python floats (static under jit): 0 skips that step, and its bank may then be None.

    Args:
      wave: (batch, samples) float32.
      noises: (n_noises, noise_samples) bank for ``add_noise``.
      rirs: (n_rirs, rir_samples) bank for ``reverberate``.
      snr_db: (low, high) SNR range of ``add_noise``.

    Returns:
      (batch, samples) float32.
    """
    for name, p, bank in (("p_noise", p_noise, noises), ("p_reverb", p_reverb, rirs)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {p}")
        if p > 0 and bank is None:
            bank_name = "noises" if name == "p_noise" else "rirs"
            raise ValueError(f"{name}={p} needs a {bank_name} bank, got None")
    batch = wave.shape[0]
    k_reverb, k_choose_reverb, k_noise, k_choose_noise = jax.random.split(key, 4)
    if p_reverb > 0:
        chosen = jax.random.bernoulli(k_choose_reverb, p_reverb, (batch,))
        wave = jnp.where(chosen[:, None], reverberate(k_reverb, wave, rirs), wave)
    if p_noise > 0:
        chosen = jax.random.bernoulli(k_choose_noise, p_noise, (batch,))
        wave = jnp.where(chosen[:, None], add_noise(k_noise, wave, noises, snr_db), wave)
    return wave
