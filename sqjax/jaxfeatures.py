"""Log-mel features in JAX, batch-first, for use inside a jitted training step.

The same features as ``sqjax.features`` (see its docstring for the framing and filters),
computed on the accelerator so hosts only decode audio. Every size is static: a batch of
equal-length crops compiles once per crop length; ``frames_to_samples`` gives the crop
length that yields a wanted number of frames.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import scipy.signal

from sqjax.features import _frame_params, _kaldi_mel_banks


def frames_to_samples(
    n_frames: int, *, sample_rate: int = 16000, win_ms: float = 25.0, hop_ms: float = 10.0
) -> int:
    """Samples of a crop that ``logmel`` turns into exactly ``n_frames`` frames.

    The inverse of frames = 1 + (samples - n_fft) // hop: ``n_fft + (n_frames - 1) * hop``
    (the shortest such crop; up to ``hop - 1`` more samples give the same count). For
    ``kaldi_fbank``, whose frames span ``win`` samples, subtract ``n_fft - win``.
    """
    if int(n_frames) != n_frames or n_frames < 1:
        raise ValueError(f"n_frames must be a positive integer, got {n_frames!r}")
    n_fft, _, hop = _frame_params(sample_rate, win_ms, hop_ms)
    return n_fft + (int(n_frames) - 1) * hop


def _check_wave(wave: jax.Array, frame_length: int, sample_rate: int) -> jax.Array:
    """wave as float32 (batch, samples); ValueError if not 2-D or shorter than one frame."""
    wave = jnp.asarray(wave, dtype=jnp.float32)
    if wave.ndim != 2:
        raise ValueError(
            f"wave must be (batch, samples), got shape {wave.shape}; add a batch axis "
            f"(wave[None]) for one utterance"
        )
    if wave.shape[1] < frame_length:
        raise ValueError(
            f"wave has {wave.shape[1]} samples, fewer than one frame ({frame_length} "
            f"samples at {sample_rate} Hz); pass longer crops (see frames_to_samples)"
        )
    return wave


def _frames(wave: jax.Array, length: int, hop: int, n_frames: int) -> jax.Array:
    """(batch, n_frames, length): frame t is ``wave[:, t * hop : t * hop + length]``.

    A gather with a constant index array. On a 2-core CPU, for 32 x 2 s at 16 kHz under
    jit, it took 1.5 ms against 3.4 ms for stacking hop-sized chunks (a reshape and
    shifted slices); within a whole ``logmel`` (about 10 ms, mostly the FFT) the two were
    within noise of each other.
    """
    index = hop * np.arange(n_frames)[:, None] + np.arange(length)[None, :]
    return wave[:, index]


@functools.lru_cache(maxsize=16)
def _hann(win: int, n_fft: int) -> np.ndarray:
    """(n_fft,) periodic Hann window of ``win`` samples centred in zeros, as librosa's."""
    window = np.zeros(n_fft, dtype=np.float32)
    left = (n_fft - win) // 2
    window[left : left + win] = scipy.signal.get_window("hann", win, fftbins=True)
    window.flags.writeable = False  # cached and shared
    return window


@functools.lru_cache(maxsize=16)
def _mel_matrix(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """(n_fft // 2 + 1, n_mels) librosa's default (Slaney) mel filters, transposed."""
    mel = librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels)
    mel = np.ascontiguousarray(mel.T, dtype=np.float32)
    mel.flags.writeable = False  # cached and shared
    return mel


def _power(frames: jax.Array, n_fft: int) -> jax.Array:
    spectrum = jnp.fft.rfft(frames, n=n_fft, axis=-1)
    return spectrum.real**2 + spectrum.imag**2


def _mean_norm(feats: jax.Array) -> jax.Array:
    return feats - feats.mean(axis=1, keepdims=True)


def logmel(
    wave: jax.Array,
    *,
    sample_rate: int = 16000,
    n_mels: int = 80,
    win_ms: float = 25.0,
    hop_ms: float = 10.0,
    mean_norm: bool = True,
) -> jax.Array:
    """Log-mel filterbank of a batch of equal-length waves: ``sqjax.features.logmel`` per row.

    Args:
      wave: (batch, samples) float mono audio at ``sample_rate``.
      mean_norm: subtract each mel bin's mean over time (per-utterance CMN).

    Returns:
      (batch, frames, n_mels) float32 ``log(mel power + 1e-6)``,
      frames = 1 + (samples - n_fft) // hop (n_fft = 512, hop = 160 at 16 kHz).
    """
    n_fft, win, hop = _frame_params(sample_rate, win_ms, hop_ms)
    wave = _check_wave(wave, n_fft, sample_rate)
    n_frames = 1 + (wave.shape[1] - n_fft) // hop
    # Whole n_fft-sample frames, as librosa: cutting only the win samples under the window
    # (and letting rfft pad) gives the same power spectrum but measured no faster.
    frames = _frames(wave, n_fft, hop, n_frames) * _hann(win, n_fft)[None, None, :]
    mel = _power(frames, n_fft) @ _mel_matrix(sample_rate, n_fft, n_mels)
    feats = jnp.log(mel + 1e-6)
    return _mean_norm(feats) if mean_norm else feats


def kaldi_fbank(
    wave: jax.Array,
    *,
    sample_rate: int = 16000,
    n_mels: int = 80,
    win_ms: float = 25.0,
    hop_ms: float = 10.0,
    mean_norm: bool = True,
) -> jax.Array:
    """Kaldi log-mel filterbank of a batch of equal-length waves: ``features.kaldi_fbank``.

    The same steps (int16 scaling, DC removal, pre-emphasis 0.97, Hamming window, no
    Nyquist bin, Kaldi mel banks, log floored at float32 eps), in float32.

    Args:
      wave: (batch, samples) float mono audio in [-1, 1] at ``sample_rate``.
      mean_norm: subtract each mel bin's mean over time (WeSpeaker's CMN).

    Returns:
      (batch, frames, n_mels) float32, frames = 1 + (samples - win) // hop.
    """
    padded, win, hop = _frame_params(sample_rate, win_ms, hop_ms)
    wave = _check_wave(wave, win, sample_rate) * 32768.0
    frames = _frames(wave, win, hop, 1 + (wave.shape[1] - win) // hop)
    frames = frames - frames.mean(axis=2, keepdims=True)
    previous = jnp.concatenate([frames[:, :, :1], frames[:, :, :-1]], axis=2)
    hamming = 0.54 - 0.46 * np.cos(2 * np.pi * np.arange(win) / (win - 1))
    frames = (frames - 0.97 * previous) * hamming.astype(np.float32)[None, None, :]
    power = _power(frames, padded)[:, :, : padded // 2]  # no Nyquist bin
    banks = _kaldi_mel_banks(n_mels, padded, sample_rate).astype(np.float32)
    feats = jnp.log(jnp.maximum(power @ banks, np.finfo(np.float32).eps))
    return _mean_norm(feats) if mean_norm else feats
