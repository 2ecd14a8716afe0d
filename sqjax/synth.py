"""Built-in synthetic speaker corpus.

No speech corpus can be downloaded here, so speakers are synthesised: a source-filter voice
per speaker (vocal-tract length, formant idiosyncrasies, F0, glottal pulse shape, tilt,
jitter, shimmer, breathiness, nasality), utterances of random syllables with pitch contours
and coarticulation, and a random recording channel per utterance whose strength is one
`difficulty` knob (0 = clean). Everything is NumPy, deterministic per seed.

The vocal tract is a time-varying filter applied by weighted overlap-add: each 32 ms Hann
frame of the source is zero-padded, multiplied by that frame's tract response and added
back, an exact linear convolution per frame that cross-fades between frames.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import pathlib
from typing import NamedTuple

import numpy as np
import scipy.fft
import soundfile as sf
from tqdm.auto import tqdm

from sqjax.workdir import atomic_write

SYNTH_VERSION = 2  # bump whenever the same arguments would give different audio or trials

_WIN, _HOP, _NFFT = 512, 128, 1024  # frame, hop and zero-padded FFT length (samples)

# Adult male F1-F3 (Hz) of ten English vowels (Hillenbrand et al., 1995, rounded).
_VOWELS = np.array(
    [
        [270, 2290, 3010],  # i (beet)
        [390, 1990, 2550],  # I (bit)
        [530, 1840, 2480],  # E (bet)
        [660, 1720, 2410],  # ae (bat)
        [730, 1090, 2440],  # a (father)
        [570, 840, 2410],  # o (bought)
        [440, 1020, 2240],  # U (book)
        [300, 870, 2240],  # u (boot)
        [640, 1190, 2390],  # V (but)
        [490, 1350, 1690],  # er (bird)
    ],
    dtype=np.float64,
)
_SCHWA = np.array([500.0, 1500.0, 2500.0])
# F4-F8 of a neutral male tract: poles up to Nyquist keep the spectrum from falling off
# too fast above F3 (what Fant's higher-pole correction does for a 5-formant cascade).
_F_HIGH = np.array([3500.0, 4500.0, 5500.0, 6500.0, 7500.0])
_BANDWIDTHS = np.array([60.0, 90.0, 150.0, 200.0, 280.0, 400.0, 500.0, 600.0])


# Consonants: manner, voiced, F2 and F3 loci (Hz, male), burst/frication centre or nasal
# zero (Hz), frication bandwidth (octaves), frication gain. 0 Hz = velar: from the vowel.
_CONSONANTS = (
    ("stop", False, 900, 2200, 1200, 1.5, 0.3),  # p
    ("stop", False, 1750, 2700, 4000, 0.7, 0.4),  # t
    ("stop", False, 0, 0, 0, 0.3, 0.4),  # k
    ("stop", True, 900, 2200, 1200, 1.5, 0.2),  # b
    ("stop", True, 1750, 2700, 4000, 0.7, 0.25),  # d
    ("stop", True, 0, 0, 0, 0.3, 0.25),  # g
    ("nasal", True, 900, 2200, 1000, 0, 0),  # m
    ("nasal", True, 1750, 2700, 1800, 0, 0),  # n
    ("nasal", True, 0, 0, 3000, 0, 0),  # ng
    ("fric", False, 1750, 2700, 5500, 0.3, 0.25),  # s
    ("fric", True, 1750, 2700, 5500, 0.3, 0.15),  # z
    ("fric", False, 2000, 2400, 3100, 0.3, 0.25),  # sh
    ("fric", False, 900, 2200, 6000, 1.0, 0.06),  # f
    ("fric", True, 900, 2200, 6000, 1.0, 0.04),  # v
    ("fric", False, 1400, 2600, 6500, 0.8, 0.05),  # th
    ("h", False, 0, 0, 0, 0, 0),  # h (must stay last: never a coda)
)


@dataclasses.dataclass(frozen=True)
class Voice:
    """Per-speaker parameters, shared by all utterances of the speaker (Hz unless noted)."""

    vtl_scale: float  # 1 / vocal-tract length, relative to an average male
    formant_offsets: tuple[float, ...]  # factor per formant F1..F8
    vowel_offsets: tuple[tuple[float, ...], ...]  # per vowel, relative F1..F3 shift (accent)
    vowel_reach: float  # how far unstressed vowels get from schwa (0..1)
    bandwidth_scale: float
    f0_mean: float
    f0_range: float  # accent height (semitones)
    open_quotient: float  # open fraction of the glottal cycle
    speed_quotient: float  # opening / closing time of the glottal pulse (skew)
    tilt: float  # pole of a one-pole low-pass (0 = flat, < 0 = brighter)
    jitter: float  # relative period perturbation
    shimmer: float  # relative amplitude perturbation
    breathiness: float  # aspiration noise relative to the pulses
    nasality: float  # nasal coupling in vowels (0..1)
    nasal_pole: float
    nasal_zero: float
    fossa: tuple[float, float]  # piriform-fossa antiresonance: frequency, bandwidth
    sibilant_scale: float  # factor on fricative centre frequencies
    rate: float  # speaking-rate factor (1.3 is about 5 syllables/s)


def sample_voice(rng: np.random.Generator) -> Voice:
    """Draws a random adult speaker; sex-linked parameters are correlated."""
    female = rng.random() < 0.5
    vtl = (1.17 if female else 1.0) * np.exp(rng.normal(0.0, 0.07))
    breath = float(np.exp(rng.normal(np.log(0.06 if female else 0.04), 0.7)))
    sd = [0.08, 0.07, 0.06, 0.08, 0.08, 0.05, 0.05, 0.05]
    return Voice(
        vtl_scale=float(vtl),
        formant_offsets=tuple(np.exp(rng.normal(0.0, sd)).tolist()),
        vowel_offsets=tuple(map(tuple, rng.normal(0.0, 0.06, (len(_VOWELS), 3)).tolist())),
        vowel_reach=float(rng.uniform(0.4, 0.9)),
        bandwidth_scale=float(np.exp(rng.normal(0.0, 0.35))),
        f0_mean=float((205.0 if female else 115.0) * np.exp(rng.normal(0.0, 0.16))),
        f0_range=float(rng.uniform(1.0, 4.0)),
        # Breathy voices stay open longer; the correlation keeps voices plausible.
        open_quotient=float(np.clip(rng.normal(0.45 + 2.0 * breath, 0.1), 0.35, 0.9)),
        speed_quotient=float(rng.uniform(1.2, 4.0)),
        tilt=float(rng.uniform(-0.3, 0.6)),
        jitter=float(rng.uniform(0.003, 0.02)),
        shimmer=float(rng.uniform(0.02, 0.12)),
        breathiness=breath,
        nasality=float(rng.uniform(0.0, 0.6)),
        nasal_pole=float(rng.normal(280.0, 25.0) * vtl),
        nasal_zero=float(rng.normal(600.0, 80.0) * vtl),
        fossa=(float(rng.uniform(3800.0, 5500.0) * vtl), float(rng.uniform(500.0, 1200.0))),
        sibilant_scale=float(np.exp(rng.normal(0.0, 0.15))),
        rate=float(1.3 * np.exp(rng.normal(0.0, 0.12))),
    )


class _Plan(NamedTuple):
    """Segment targets of an utterance, one row per segment (S segments)."""

    length: np.ndarray  # (S,) samples
    formants: np.ndarray  # (S, 8) Hz; NaN = no target, interpolated through
    amps: np.ndarray  # (S, 3) voicing, aspiration and frication amplitudes
    fric: np.ndarray  # (S, 2) frication centre (Hz) and bandwidth (octaves)
    nasal: np.ndarray  # (S, 2) nasal coupling (0..1) and nasal zero (Hz)
    bw: np.ndarray  # (S,) formant bandwidth factor
    accents: np.ndarray  # (A, 2) accent time (samples) and height (semitones)
    phrases: np.ndarray  # (P,) phrase start times (samples), for declination


def _plan_utterance(voice: Voice, rng: np.random.Generator, n: int, sr: int) -> _Plan:
    """Random (C)V(C) syllables and pauses as segments with articulatory targets."""
    scale = voice.vtl_scale * np.asarray(voice.formant_offsets)
    rows, accents, phrases, t = [], [], [0.0], 0.0

    def add(
        dur, formants=None, av=0.0, ah=0.0, af=0.0, fric=(4000.0, 1.0), nasal=(0.0, 1000.0), bw=1.0
    ):
        nonlocal t
        length = max(1, int(dur * sr / voice.rate))
        f = np.full(len(_BANDWIDTHS), np.nan) if formants is None else formants
        rows.append((length, f, (av, ah, af), fric, nasal, bw))
        t += length
        return t - length / 2  # segment midpoint

    def consonant(manner, voiced, f2, f3, fc, width, gain, vowel_f):
        if f2 == 0:  # a velar locus follows the vowel's F2 (front and back /k/ differ)
            f2, f3 = vowel_f[1] * 1.1, vowel_f[1] * 1.25
        else:
            f2, f3 = f2 * scale[1], f3 * scale[2]
        f1 = (270.0 if manner == "nasal" else 320.0) * scale[0]
        locus = np.array([f1, f2, f3, *(_F_HIGH * scale[3:])])
        centre = (vowel_f[1] * 1.2 if fc == 0 else fc * voice.vtl_scale) * voice.sibilant_scale
        if manner == "h":
            add(rng.uniform(0.05, 0.08), ah=0.5)
        elif manner == "nasal":
            add(rng.uniform(0.05, 0.09), locus, av=0.45, nasal=(1.0, fc * voice.vtl_scale), bw=2.0)
        elif manner == "fric":
            add(rng.uniform(0.07, 0.14), locus, av=0.3 * voiced, af=gain, fric=(centre, width))
        else:  # stop: closure (voice bar if voiced), burst, aspiration if voiceless
            add(rng.uniform(0.04, 0.08), locus, av=0.12 * voiced)
            add(rng.uniform(0.008, 0.015), locus, af=gain, fric=(centre, width))
            if not voiced:
                add(rng.uniform(0.03, 0.06), ah=0.35)

    add(rng.uniform(0.05, 0.2))  # leading silence
    while True:  # at least one syllable, so every track has a target
        accented = rng.random() < 0.3
        v = rng.integers(len(_VOWELS))
        # Unstressed vowels undershoot toward schwa, by a speaker-specific amount.
        reach = 1.0 if accented else voice.vowel_reach * rng.uniform(0.8, 1.0)
        target = _SCHWA + reach * (_VOWELS[v] * (1 + np.asarray(voice.vowel_offsets[v])) - _SCHWA)
        vowel_f = np.concatenate([target, _F_HIGH]) * scale
        if rng.random() < 0.8:
            consonant(*_CONSONANTS[rng.integers(len(_CONSONANTS))], vowel_f)
        mid = add(
            rng.uniform(0.08, 0.16) * (1.5 if accented else 1.0),
            vowel_f,
            av=1.0,
            nasal=(voice.nasality, voice.nasal_zero),
        )
        if accented:
            accents.append((mid, voice.f0_range * rng.uniform(0.4, 1.0)))
        if rng.random() < 0.35:
            consonant(*_CONSONANTS[rng.integers(len(_CONSONANTS) - 1)], vowel_f)
        if t >= n:
            break
        if rng.random() < 0.1:
            add(rng.uniform(0.1, 0.35))
            phrases.append(t)

    length, f, amps, fric, nasal, bw = map(np.array, zip(*rows))
    length = np.diff(np.minimum(np.cumsum(length), n), prepend=0)  # cut at the duration
    return _Plan(
        length, f, amps, fric, nasal, bw, np.array(accents).reshape(-1, 2), np.array(phrases)
    )


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    """Moving average along axis 0 with edge padding (cumulative sum, O(n))."""
    pad = np.pad(x, [(width // 2, width - 1 - width // 2)] + [(0, 0)] * (x.ndim - 1), "edge")
    c = np.concatenate([np.zeros((1,) + x.shape[1:]), np.cumsum(pad, axis=0)])
    return (c[width:] - c[:-width]) / width


def _glottal_source(
    f0: np.ndarray, voice: Voice, oq: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Rosenberg glottal flow derivative (per unit phase, so its level does not depend on
    F0) and flow, both (n,), with jitter and shimmer; f0: (n,) in cycles per sample."""
    # Jitter perturbs each period's length; periods are indexed by the unperturbed phase.
    phase0 = np.cumsum(f0)
    jitter = 1.0 + voice.jitter * rng.standard_normal(int(phase0[-1]) + 1)
    step = f0 * jitter[phase0.astype(np.int64)]
    phase = np.cumsum(step)
    period = phase.astype(np.int64)
    frac = phase - period
    tp = oq * voice.speed_quotient / (1.0 + voice.speed_quotient)  # opening; closing = oq - tp
    flow = np.where(
        frac < tp,
        0.5 - 0.5 * np.cos(np.pi * frac / tp),
        np.where(frac < oq, np.cos(0.5 * np.pi * (frac - tp) / (oq - tp)), 0.0),
    )
    shimmer = np.maximum(1.0 + voice.shimmer * rng.standard_normal(period[-1] + 1), 0.2)
    return np.diff(flow, prepend=0.0) / step * shimmer[period], flow


def _resonators(z1: np.ndarray, f: np.ndarray, bw: np.ndarray, sr: int):
    """D(z) = 1 - 2r cos(theta) z^-1 + r^2 z^-2, (frames, bins), and D(1), (frames,), of
    2-pole resonators at f with bandwidth bw (frames,) Hz; z1 = exp(-jw), (bins,)."""
    r = np.where(f < 0.47 * sr, np.exp(-np.pi * bw / sr), 0.0)  # no poles above Nyquist
    c = 2.0 * r * np.cos(2.0 * np.pi * f / sr)
    d = (r * r).astype(np.float32)[:, None] * z1  # complex64 throughout: this is the hot loop
    d -= c.astype(np.float32)[:, None]
    d *= z1
    d += 1.0
    return d, 1.0 - c + r * r


def _tract_response(formants, bw, nasal, tilt: float, voice: Voice, sr: int) -> np.ndarray:
    """Vocal-tract response per frame, (frames, bins): formants and bw (frames, 8) Hz,
    nasal coupling and zero (frames, 2), fossa and tilt; unit gain at DC."""
    z1 = np.exp(-2j * np.pi * np.arange(_NFFT // 2 + 1) / _NFFT).astype(np.complex64)
    const = np.ones(len(formants))
    poles = [(formants[:, k], bw[:, k]) for k in range(formants.shape[1])]
    poles.append((voice.nasal_pole * const, 100.0 * const))
    # Nasal coupling moves a zero away from the nasal pole, which it cancels when closed;
    # the piriform fossae add a stable, speaker-specific dip above F4.
    zeros = [
        (voice.nasal_pole + nasal[:, 0] * (nasal[:, 1] - voice.nasal_pole), 100.0 * const),
        (voice.fossa[0] * const, voice.fossa[1] * const),
    ]
    den = np.tile(((1.0 - tilt * z1) / (1.0 - tilt)).astype(np.complex64), (len(const), 1))
    num, gain = np.ones_like(den), const.copy()
    for f, b in poles:
        d, dc = _resonators(z1, f, b, sr)
        den *= d
        gain *= dc
    for f, b in zeros:
        d, dc = _resonators(z1, f, b, sr)
        num *= d
        gain /= dc
    return num * gain.astype(np.float32)[:, None] / den


def _frames(x: np.ndarray) -> np.ndarray:
    """Spectra of Hann frames of x, padded by one window on both sides: (frames, bins)."""
    n_frames = (len(x) + _WIN) // _HOP + 2
    padded = np.zeros((n_frames - 1) * _HOP + _WIN, np.float32)
    padded[_WIN : _WIN + len(x)] = x
    frames = np.lib.stride_tricks.sliding_window_view(padded, _WIN)[::_HOP]
    window = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(_WIN) / _WIN)).astype(np.float32)
    return scipy.fft.rfft(frames * window, _NFFT, axis=1)


def _overlap_add(spectra: np.ndarray, n: int) -> np.ndarray:
    """Inverse of `_frames` after filtering: overlap-adds the zero-padded frames."""
    frames = scipy.fft.irfft(spectra, _NFFT, axis=1).reshape(len(spectra), -1, _HOP)
    out = np.zeros((len(spectra) + frames.shape[1] - 1, _HOP), np.float32)
    for k in range(frames.shape[1]):
        out[k : k + len(spectra)] += frames[:, k]
    return out.ravel()[_WIN : _WIN + n] / (_WIN / (2 * _HOP))  # Hann windows sum to this


def _synthesize_clean(voice: Voice, rng: np.random.Generator, n: int, sr: int) -> np.ndarray:
    """The dry voice, (n,) float64 at a nominal -23 dBFS: plan, source and tract."""
    plan = _plan_utterance(voice, rng, n, sr)
    mids = np.cumsum(plan.length) - plan.length / 2
    times = np.arange((n + _WIN) // _HOP + 2) * _HOP - _WIN / 2  # frame centres (samples)

    def track(values):  # targets meet by interpolation (coarticulation)
        ok = ~np.isnan(values)
        return np.interp(times, mids[ok], values[ok])

    formants = _smooth(np.stack([track(f) for f in plan.formants.T], 1), 5)  # ~40 ms glides
    bw = track(plan.bw)[:, None] * _BANDWIDTHS * voice.bandwidth_scale
    nasal = _smooth(np.stack([track(x) for x in plan.nasal.T], 1), 3)
    fric = np.stack([track(x) for x in plan.fric.T], 1)

    # Pitch: declination within phrases, accents, slow wander and a per-utterance shift.
    start = plan.phrases[np.maximum(np.searchsorted(plan.phrases, times, "right") - 1, 0)]
    semis = rng.normal(0.0, 0.4) - rng.uniform(0.8, 2.5) * (times - start) / sr
    semis += _smooth(rng.normal(0.0, 1.5, len(times)), 25)
    for when, height in plan.accents:
        semis += height * np.exp(-0.5 * ((times - when) / (0.07 * sr)) ** 2)
    f0 = voice.f0_mean / sr * 2.0 ** (np.interp(np.arange(n), times, semis) / 12.0)
    # Voice quality drifts a little between recordings of the same speaker.
    tilt = np.clip(voice.tilt + rng.normal(0.0, 0.05), -0.5, 0.9)
    oq = np.clip(voice.open_quotient + rng.normal(0.0, 0.03), 0.3, 0.95)

    # Amplitudes at the sample rate with ~4 ms ramps, so that bursts stay sharp.
    av, ah, af = _smooth(np.repeat(plan.amps, plan.length, axis=0), max(1, sr // 250)).T
    dflow, flow = _glottal_source(f0, voice, oq, rng)
    noise = rng.standard_normal((2, n))
    # Aspiration is pulsed by the glottal opening (breathiness) or steady (/h/, stops).
    glottal = 0.1 * av * (dflow + 12.0 * voice.breathiness * (0.3 + flow) * noise[0])
    glottal += ah * noise[0]

    # Glottal and frication sources need different filters: filter both, add the frames.
    octaves = np.log2(np.maximum(np.fft.rfftfreq(_NFFT, 1.0 / sr), 50.0) / fric[:, :1])
    shape = (np.exp(-0.5 * (octaves / fric[:, 1:]) ** 2) + 0.01).astype(np.float32)
    tract = _tract_response(formants, bw, nasal, tilt, voice, sr)
    wave = _overlap_add(_frames(glottal) * tract + _frames(af * noise[1]) * shape, n)
    wave = wave / max(np.sqrt(np.mean(wave.astype(np.float64) ** 2)), 1e-8)
    # A faint floor (-40 dB), as in any real recording: digital silence would make the
    # share of silent frames, not the voice, dominate pooled log-mel statistics.
    return 0.07 * (wave + 1e-2 * rng.standard_normal(n))


def synthesize_utterance(
    voice: Voice,
    rng: np.random.Generator,
    duration: float,
    sample_rate: int = 16000,
    difficulty: float = 1.0,
) -> np.ndarray:
    """One utterance of `voice` through a random channel: (round(duration * sample_rate),)
    float32 in [-1, 1]."""
    n = round(duration * sample_rate)
    if n < 1:
        raise ValueError(f"duration={duration} gives no samples at {sample_rate} Hz")
    return apply_channel(
        _synthesize_clean(voice, rng, n, sample_rate), rng, difficulty, sample_rate
    )


def _room_response(rng: np.random.Generator, d: float, sr: int) -> np.ndarray:
    """A short synthetic room impulse response: direct path plus a decaying noise tail."""
    rt60 = d * rng.uniform(0.05, 0.25)
    t = np.arange(int(rt60 * sr) + 1) / sr
    h = rng.standard_normal(len(t)) * np.exp(-6.9 * t / max(rt60, 1e-3))
    h[: int(0.002 * sr) + 1] = 0.0  # the first reflections arrive a few ms late
    drr_db = rng.uniform(0.0, 15.0) + 12.0 * max(0.0, 1.0 - d)  # direct-to-reverberant
    h *= np.sqrt(10 ** (-drr_db / 10) / max(np.sum(h**2), 1e-12))
    h[0] = 1.0
    return h


def _eq_curve(hz: np.ndarray, rng: np.random.Generator, d: float, sr: int) -> np.ndarray:
    """A random channel magnitude: band limits, tilt and a smooth ripple, scaled by d."""
    octaves = np.log2(np.maximum(hz, 20.0) / 1000.0)
    knots = np.linspace(np.log2(50 / 1000), np.log2(sr / 2000), 8)
    db = np.interp(octaves, knots, rng.normal(0.0, d, len(knots)))
    db += d * rng.uniform(-0.75, 0.75) * octaves
    low = 20.0 + d * rng.uniform(0.0, 150.0)
    high = max(2000.0, 0.5 * sr * (1.0 - d * rng.uniform(0.0, 0.4)))
    band = 1.0 / np.sqrt((1.0 + (low / np.maximum(hz, 1.0)) ** 4) * (1.0 + (hz / high) ** 8))
    return band * 10 ** (db / 20)


def apply_channel(
    wave: np.ndarray, rng: np.random.Generator, difficulty: float, sample_rate: int
) -> np.ndarray:
    """A random recording channel: reverberation, EQ and band limits, noise, level.

    `difficulty` scales every impairment: 0 = clean (only the level is set), 1 = default
    (RT60 up to 0.25 s, 1 dB ripple, SNR 28-40 dB, level -23 +- 4 dBFS), more = harder.
    The chain is one FFT: room and EQ multiply the spectrum, and coloured noise is drawn
    as a spectrum, so it passes the same microphone EQ as the speech.

    Args:
      wave: (n,) float waveform.
    Returns:
      (n,) float32 in [-1, 1].
    """
    if difficulty < 0:
        raise ValueError(f"difficulty must be >= 0, got {difficulty}")
    d, sr, n = float(difficulty), sample_rate, len(wave)
    wave = np.array(wave, np.float64)  # a copy: the caller's array is left alone
    if d > 0:
        rir = _room_response(rng, d, sr)
        m = scipy.fft.next_fast_len(n + len(rir))
        hz = np.fft.rfftfreq(m, 1.0 / sr)
        eq = _eq_curve(hz, rng, d, sr)
        speech = scipy.fft.rfft(wave, m) * scipy.fft.rfft(rir, m) * eq
        colour = (np.maximum(hz, 50.0) / 1000.0) ** -rng.uniform(0.5, 1.0)  # pink..brown
        noise = (rng.standard_normal(len(hz)) + 1j * rng.standard_normal(len(hz))) * colour * eq
        snr_db = max(-5.0, 60.0 - d * rng.uniform(20.0, 32.0))
        # The noise spans all m samples but only the first n are kept.
        gain = np.sqrt(
            np.sum(np.abs(speech) ** 2) / np.sum(np.abs(noise) ** 2) * m / n * 10 ** (-snr_db / 10)
        )
        wave = scipy.fft.irfft(speech + gain * noise, m)[:n]
    # The level is random per utterance, so loudness carries no speaker identity; its
    # range is kept moderate because it shifts every raw log-mel band at once.
    level_db = -23.0 + d * rng.uniform(-4.0, 4.0)
    wave *= 10 ** (level_db / 20) / max(np.sqrt(np.mean(wave**2)), 1e-8)
    return (wave / max(1.0, np.max(np.abs(wave)) / 0.99)).astype(np.float32)


def _utterance_task(task: tuple) -> None:
    """Synthesises and writes one file; seeded by (seed, speaker, utterance) alone, so the
    output does not depend on the number of workers."""
    path, seed, spk, utt, min_dur, max_dur, sr, difficulty = task
    voice = sample_voice(np.random.default_rng([seed, 1, spk]))
    rng = np.random.default_rng([seed, 2, spk, utt])
    wave = synthesize_utterance(voice, rng, rng.uniform(min_dur, max_dur), sr, difficulty)
    atomic_write(path, lambda f: sf.write(f, wave, sr, subtype="PCM_16", format="WAV"))


def _write_text(path: pathlib.Path, lines: list[str]) -> None:
    atomic_write(path, "".join(line + "\n" for line in lines))


def _sample_trials(
    utts: dict[str, list[str]], n_trials: int, rng: np.random.Generator
) -> list[str]:
    """Kaldi trials, half target and half non-target, never an utterance with itself.

    Target pairs are unordered (a cosine score is symmetric: (a, b) and (b, a) would be one
    trial twice), drawn without replacement while distinct ones last (then cycled evenly),
    each side first at random; non-target pairs are drawn uniformly.
    """
    targets = [
        (a, b) for s in sorted(utts) for i, a in enumerate(utts[s]) for b in utts[s][i + 1 :]
    ]
    order = np.resize(rng.permutation(len(targets)), n_trials // 2)
    flip = rng.random(len(order)) < 0.5
    trials = [
        f"{targets[i][f]} {targets[i][1 - f]} target" for i, f in zip(order, flip.astype(int))
    ]
    flat = [(s, u) for s in sorted(utts) for u in utts[s]]
    while len(trials) < n_trials:
        i, j = rng.integers(len(flat), size=2)
        if flat[i][0] != flat[j][0]:
            trials.append(f"{flat[i][1]} {flat[j][1]} nontarget")
    return [trials[i] for i in rng.permutation(len(trials))]


def generate_corpus(
    out_dir: str | os.PathLike,
    *,
    n_train_speakers: int = 100,
    n_dev_speakers: int = 100,
    n_test_speakers: int = 500,
    utts_per_speaker: int = 16,
    test_utts_per_speaker: int = 16,
    min_duration: float = 2.0,
    max_duration: float = 4.0,
    sample_rate: int = 16000,
    difficulty: float = 1.0,
    seed: int = 0,
    n_trials: int = 120_000,
    workers: int = 1,
    progress: bool = True,
) -> pathlib.Path:
    """Writes a synthetic speaker corpus in Kaldi layout and returns its directory.

    Layout: `wav/<spk>/<utt>.wav` (mono PCM_16), `{train,dev,test}/{wav.scp,utt2spk,spk2utt}`
    (absolute paths), `{dev,test}/trials` (`enroll test target|nontarget`) and, written
    last, `synth.json` with the arguments. If `synth.json` holds the same arguments the
    corpus is complete and is returned as is; other arguments raise ValueError. Speakers of
    train, dev and test are disjoint; dev and test have `test_utts_per_speaker` each.
    `workers` and `progress` do not change the output and are not recorded.
    """
    if not 0 < min_duration <= max_duration:
        raise ValueError(
            f"need 0 < min_duration <= max_duration, got {min_duration}, {max_duration}"
        )
    if n_train_speakers < 2 or utts_per_speaker < 1:
        raise ValueError(
            f"n_train_speakers={n_train_speakers}, utts_per_speaker={utts_per_speaker}: "
            "training needs 2+ speakers with 1+ utterance each"
        )
    if min(n_dev_speakers, n_test_speakers, test_utts_per_speaker) < 2:
        raise ValueError("trials need n_dev_speakers, n_test_speakers, test_utts_per_speaker >= 2")
    out = pathlib.Path(out_dir).resolve()
    # Plain ints and floats, so that 1 and 1.0 (or numpy scalars) compare equal.
    args = {
        "version": SYNTH_VERSION,
        "n_train_speakers": int(n_train_speakers),
        "n_dev_speakers": int(n_dev_speakers),
        "n_test_speakers": int(n_test_speakers),
        "utts_per_speaker": int(utts_per_speaker),
        "test_utts_per_speaker": int(test_utts_per_speaker),
        "min_duration": float(min_duration),
        "max_duration": float(max_duration),
        "sample_rate": int(sample_rate),
        "difficulty": float(difficulty),
        "seed": int(seed),
        "n_trials": int(n_trials),
    }
    meta = out / "synth.json"
    if meta.exists():
        if json.loads(meta.read_text()) == args:
            return out
        raise ValueError(
            f"{out} holds a synthetic corpus made with other arguments (see "
            f"{meta}); delete that directory or choose another out_dir"
        )

    sizes = {
        "train": (n_train_speakers, utts_per_speaker),
        "dev": (n_dev_speakers, test_utts_per_speaker),
        "test": (n_test_speakers, test_utts_per_speaker),
    }
    splits, tasks, first = {}, [], 0
    for split, (n_spk, n_utt) in sizes.items():
        splits[split] = {
            f"spk{s:05d}": [f"spk{s:05d}-{u:04d}" for u in range(n_utt)]
            for s in range(first, first + n_spk)
        }
        first += n_spk
        for s, (spk, utts) in enumerate(splits[split].items(), first - n_spk):
            (out / "wav" / spk).mkdir(parents=True, exist_ok=True)
            tasks += [
                (
                    str(out / "wav" / spk / f"{utt}.wav"),
                    seed,
                    s,
                    u,
                    min_duration,
                    max_duration,
                    sample_rate,
                    difficulty,
                )
                for u, utt in enumerate(utts)
            ]

    with tqdm(total=len(tasks), unit="utt", desc="synth", disable=not progress) as bar:
        if workers > 1:
            # spawn, not fork: the parent may run JAX threads, which fork can deadlock.
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for _ in pool.imap_unordered(_utterance_task, tasks, chunksize=4):
                    bar.update()
        else:
            for task in tasks:
                _utterance_task(task)
                bar.update()

    for i, (split, utts) in enumerate(splits.items()):
        (out / split).mkdir(exist_ok=True)
        pairs = sorted((u, s) for s, us in utts.items() for u in us)
        _write_text(out / split / "wav.scp", [f"{u} {out / 'wav' / s / u}.wav" for u, s in pairs])
        _write_text(out / split / "utt2spk", [f"{u} {s}" for u, s in pairs])
        _write_text(out / split / "spk2utt", [f"{s} {' '.join(us)}" for s, us in utts.items()])
        if split != "train":
            trials = _sample_trials(utts, n_trials, np.random.default_rng([seed, 3, i]))
            _write_text(out / split / "trials", trials)
    _write_text(meta, [json.dumps(args, indent=1, sort_keys=True)])
    return out
