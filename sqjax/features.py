"""Log-mel filterbank features of two kinds, with an optional per-utterance on-disk cache.

``kind="logmel"`` (``logmel``, the default): framing follows librosa with
``center=False``: frame t is ``n_fft`` samples starting at ``t * hop``, with the Hann
window of ``win`` samples centred in it, so an utterance of ``n`` samples gives
``1 + (n - n_fft) // hop`` frames (no padding, as Kaldi's ``snip_edges``). Mel filters are
librosa's defaults (Slaney scale and area norm, 0 to sample_rate / 2). These choices are
ours, not the paper's.

``kind="kaldi"`` (``kaldi_fbank``): Kaldi's ``compute-fbank-feats`` as WeSpeaker calls it
(int16-scaled input, DC removal, pre-emphasis 0.97, Hamming window, HTK-style mel banks
from 20 Hz, log floored at float32 eps, no dither), so ``1 + (n - win) // hop`` frames.
Both subtract each bin's mean over time by default (WeSpeaker's CMN).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import multiprocessing
import os
import re

import librosa
import numpy as np
from tqdm.auto import tqdm

from sqjax import fileio
from sqjax.data import Corpus, DataError, load_audio
from sqjax.workdir import atomic_write

_CACHE_VERSION = 2  # bump when the feature code or cache layout changes: old caches are refused


def _frame_params(sample_rate: int, win_ms: float, hop_ms: float) -> tuple[int, int, int]:
    """(n_fft, win_length, hop_length) in samples; n_fft = next power of two >= window."""
    win = round(sample_rate * win_ms / 1000)
    hop = round(sample_rate * hop_ms / 1000)
    return 1 << (win - 1).bit_length(), win, hop


def logmel(
    wave: np.ndarray,
    sample_rate: int = 16000,
    n_mels: int = 80,
    win_ms: float = 25.0,
    hop_ms: float = 10.0,
    mean_norm: bool = True,
) -> np.ndarray:
    """Log-mel filterbank of one utterance.

    Args:
      wave: (samples,) mono audio at ``sample_rate``.
      mean_norm: subtract each mel bin's mean over time (per-utterance CMN).

    Returns:
      (frames, n_mels) float32 ``log(mel power + 1e-6)``, frames = 1 + (samples - n_fft) // hop
      (n_fft = 512, hop = 160 at 16 kHz).
    """
    n_fft, win, hop = _frame_params(sample_rate, win_ms, hop_ms)
    wave = _check_wave(wave, n_fft, sample_rate)
    mel = librosa.feature.melspectrogram(
        y=wave,
        sr=sample_rate,
        n_fft=n_fft,
        win_length=win,
        hop_length=hop,
        window="hann",
        center=False,
        power=2.0,
        n_mels=n_mels,
    )
    feats = np.log(mel + 1e-6).T  # (frames, n_mels)
    if mean_norm:
        feats = feats - feats.mean(axis=0, keepdims=True)
    return feats.astype(np.float32)


def _check_wave(wave: np.ndarray, frame_length: int, sample_rate: int) -> np.ndarray:
    """wave as float32 (samples,); ValueError if it is not 1-D or shorter than one frame."""
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim != 1:
        raise ValueError(
            f"wave must be 1-D mono (samples,), got shape {wave.shape}; average the channels first"
        )
    if len(wave) < frame_length:
        raise ValueError(
            f"wave has {len(wave)} samples, fewer than one frame ({frame_length} samples "
            f"at {sample_rate} Hz); pass a longer wave"
        )
    return wave


@functools.lru_cache(maxsize=8)
def _kaldi_mel_banks(n_mels: int, padded: int, sample_rate: int) -> np.ndarray:
    """(padded // 2, n_mels) Kaldi mel triangles, 20 Hz to Nyquist, on FFT bins 0..padded/2-1.

    The triangles are linear in mel (1127 ln(1 + f / 700)), not in Hz, and unnormalised;
    Kaldi leaves out the Nyquist bin.
    """

    def mel(f):
        return 1127.0 * np.log1p(np.asarray(f, dtype=np.float64) / 700.0)

    low, high = mel(20.0), mel(sample_rate / 2)
    delta = (high - low) / (n_mels + 1)
    left = low + delta * np.arange(n_mels)  # (n_mels,)
    center, right = left + delta, left + 2 * delta
    bins = mel(np.arange(padded // 2) * sample_rate / padded)[:, None]  # (padded // 2, 1)
    up = (bins - left) / (center - left)
    down = (right - bins) / (right - center)
    weights = np.where(bins <= center, up, down)
    return np.where((bins > left) & (bins < right), weights, 0.0)


def kaldi_fbank(
    wave: np.ndarray,
    sample_rate: int = 16000,
    n_mels: int = 80,
    win_ms: float = 25.0,
    hop_ms: float = 10.0,
    mean_norm: bool = True,
) -> np.ndarray:
    """Kaldi log-mel filterbank of one utterance, as WeSpeaker computes it.

    Matches ``compute-fbank-feats`` / ``torchaudio.compliance.kaldi.fbank`` with
    WeSpeaker's options: the wave is scaled to int16 range (x 32768); frames of ``win``
    samples every ``hop`` (400 / 160 at 16 kHz) with ``snip_edges`` (no padding); dither 0
    (test-time features must be deterministic, and they are cached); per-frame DC offset
    removal; pre-emphasis 0.97 (the first sample against itself); Hamming window
    ``0.54 - 0.46 cos(2 pi n / (win - 1))``; zero-padded to the next power of two; power
    spectrum; Kaldi mel banks (see ``_kaldi_mel_banks``); no energy term;
    ``log(max(e, float32 eps))``.

    Args:
      wave: (samples,) mono audio in [-1, 1] at ``sample_rate``.
      mean_norm: subtract each mel bin's mean over time (WeSpeaker's CMN, no variance norm).

    Returns:
      (frames, n_mels) float32, frames = 1 + (samples - win) // hop.
    """
    padded, win, hop = _frame_params(sample_rate, win_ms, hop_ms)
    wave = _check_wave(wave, win, sample_rate).astype(np.float64) * 32768.0
    frames = np.lib.stride_tricks.sliding_window_view(wave, win)[::hop]  # (frames, win)
    frames = frames - frames.mean(axis=1, keepdims=True)
    previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = frames - 0.97 * previous
    frames = frames * (0.54 - 0.46 * np.cos(2 * np.pi * np.arange(win) / (win - 1)))
    spectrum = np.fft.rfft(frames, n=padded, axis=1)[:, : padded // 2]  # no Nyquist bin
    power = spectrum.real**2 + spectrum.imag**2
    energies = power @ _kaldi_mel_banks(n_mels, padded, sample_rate)  # (frames, n_mels)
    feats = np.log(np.maximum(energies, np.finfo(np.float32).eps))
    if mean_norm:
        feats = feats - feats.mean(axis=0, keepdims=True)
    return feats.astype(np.float32)


_EXTRACTORS = {"logmel": logmel, "kaldi": kaldi_fbank}


def _frame_samples(params: dict) -> tuple[int, int]:
    """(frame length, hop) in samples of the feature kind in ``params``.

    A frame spans n_fft samples in librosa's ``center=False`` framing, the window itself
    in Kaldi's.
    """
    n_fft, win, hop = _frame_params(params["sample_rate"], params["win_ms"], params["hop_ms"])
    return (win if params.get("kind", "logmel") == "kaldi" else n_fft), hop


def _cache_file(cache_dir: str, utt: str, path: str, params: dict) -> str:
    """Cache path of one utterance's features: keyed by what determines them.

    The key hashes the resolved audio path, its size and mtime_ns (of an object on a
    store: its size and version, ``fileio.version``), and the feature parameters, so equal utterance ids of two data dirs, audio rewritten in place, and
    other settings all get their own entry (the old one is left behind, never served). The
    id only makes the name readable. Stats the file: a missing one is a DataError.
    Stat, not a content hash, so a cache hit never reads the audio; a rewrite that keeps
    both size and mtime (``rsync -t`` of other audio of equal length, or a filesystem with
    coarse timestamps within one tick) goes unnoticed: delete the cache then.
    """
    try:
        if fileio.is_remote(path):  # an object's URL, size and version (fileio.version)
            real, size, mtime = os.fspath(path), 0, fileio.version(path)
        else:
            real = os.path.realpath(path)
            st = os.stat(real)
            size, mtime = st.st_size, st.st_mtime_ns
    except FileNotFoundError as err:
        raise DataError(f"{path}: audio file not found; check the corpus paths") from err
    except OSError as err:
        raise DataError(
            f"{path}: cannot stat the audio file ({err}); check its permissions"
        ) from err
    key = json.dumps([real, size, mtime, params], sort_keys=True)
    digest = hashlib.sha1(key.encode("utf-8")).hexdigest()
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", utt)[-60:]
    # 256 shards keep directories small for million-utterance corpora.
    return os.path.join(cache_dir, digest[:2], f"{safe}-{digest[:16]}.npy")


def _prepare_cache(cache_dir: str, params: dict) -> None:
    """Creates cache_dir/meta.json, or checks that an existing one has the same params."""
    meta = os.path.join(cache_dir, "meta.json")
    if os.path.exists(meta):
        with open(meta, encoding="utf-8") as f:
            try:
                old = json.load(f)
            except json.JSONDecodeError as err:
                raise DataError(f"{meta}: not valid JSON ({err}); delete the cache dir") from err
        if old != params:
            # Over the keys of both: "kind" is absent from one side when it is "logmel".
            diff = {
                k: (old.get(k), params.get(k))
                for k in sorted(old.keys() | params.keys())
                if old.get(k) != params.get(k)
            }
            raise DataError(
                f"{meta}: cached features were made with other parameters "
                f"(cached, requested): {diff}; use another cache_dir or delete "
                f"this one"
            )
        return
    atomic_write(meta, json.dumps(params, indent=2))


def _one_utterance(job: tuple) -> np.ndarray:
    """Features of one utterance, from the cache when present. Top level for pickling."""
    utt, path, cache_dir, params, min_seconds = job
    # Keyed on the file's stat taken before it is read: audio rewritten meanwhile is cached
    # under the old stat, which no longer matches, so it is never served as the new audio.
    cache_file = None if cache_dir is None else _cache_file(cache_dir, utt, path, params)
    if cache_file is not None and os.path.exists(cache_file):
        try:
            feats = np.load(cache_file)
        except (OSError, ValueError) as err:
            raise DataError(
                f"{cache_file}: unreadable cached features of {utt!r} ({err}); "
                f"delete the file to recompute it"
            ) from err
        # Cached features passed min_seconds when written; recheck at frame resolution for
        # a stricter call (an utterance within one hop of the limit can slip through).
        frame, hop = _frame_samples(params)
        min_samples = math.ceil(min_seconds * params["sample_rate"])
        if min_samples > frame and feats.shape[0] < 1 + (min_samples - frame) // hop:
            raise DataError(
                f"{path}: {feats.shape[0]} frames cached in {cache_file}, shorter "
                f"than min_seconds={min_seconds}; drop short utterances or lower "
                f"min_seconds"
            )
        return feats
    wave = load_audio(path, params["sample_rate"], min_seconds)
    frame = _frame_samples(params)[0]
    if len(wave) < frame:
        raise DataError(
            f"{path}: {len(wave)} samples, fewer than one frame ({frame}); drop it from the corpus"
        )
    feats = _EXTRACTORS[params.get("kind", "logmel")](
        wave,
        params["sample_rate"],
        params["n_mels"],
        params["win_ms"],
        params["hop_ms"],
        params["mean_norm"],
    )
    if cache_file is not None:
        atomic_write(cache_file, lambda f: np.save(f, feats))
    return feats


def extract_features(
    corpus: Corpus,
    *,
    sample_rate: int = 16000,
    n_mels: int = 80,
    mean_norm: bool = True,
    kind: str = "logmel",
    cache_dir: str | os.PathLike | None = None,
    min_seconds: float = 0.0,
    workers: int = 1,
    progress: bool = True,
) -> list[np.ndarray]:
    """Log-mel features of every utterance of a corpus.

    Args:
      kind: ``"logmel"`` (``logmel``) or ``"kaldi"`` (``kaldi_fbank``, WeSpeaker's).
      cache_dir: if set, ``meta.json`` holding the feature parameters plus one
        ``<2 hex>/<utt tail>-<16 hex>.npy`` per utterance, keyed by the resolved audio
        path, its size and mtime_ns and the parameters (see ``_cache_file``). Entries are
        reused while the audio file is unchanged; another parameter setting is an error
        (use one cache dir per feature setting). Entries of rewritten or deleted audio
        stay on disk unused; delete the cache dir to reclaim the space.
      min_seconds: utterances shorter than this raise a DataError.
      workers: > 1 computes in a process pool ('spawn', so it is safe next to JAX threads).

    Returns:
      One (frames, n_mels) float32 array per utterance, in ``corpus.utts`` order.
    """
    params = {
        "version": _CACHE_VERSION,
        "sample_rate": sample_rate,
        "n_mels": n_mels,
        "win_ms": 25.0,
        "hop_ms": 10.0,
        "mean_norm": mean_norm,
    }
    if kind not in _EXTRACTORS:
        raise ValueError(
            f"features.kind must be one of {sorted(_EXTRACTORS)}, got {kind!r}; fix the config"
        )
    if kind != "logmel":
        # Only when set, so the meta.json of caches made before kinds existed stays valid.
        params["kind"] = kind
    if cache_dir is not None:
        cache_dir = os.fspath(cache_dir)
        _prepare_cache(cache_dir, params)
    # Cache paths are worked out in the workers: each one stats its audio file.
    jobs = [
        (utt, path, cache_dir, params, min_seconds)
        for utt, path in zip(corpus.utts, corpus.paths, strict=True)
    ]
    # A pool only for what the cache lacks: cached features are read here (a pool started
    # for a fully cached split cost its workers' start-up, every run).
    todo = range(len(jobs))
    if workers > 1 and cache_dir is not None:
        cached = lambda utt, path: os.path.exists(_cache_file(cache_dir, utt, path, params))
        todo = [i for i, (utt, path, *_) in enumerate(jobs) if not cached(utt, path)]
    out = [None] * len(jobs)
    bar = tqdm(total=len(jobs), unit="utt", desc="features", disable=not progress)
    with bar:
        if workers > 1 and len(todo) > 1:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                # chunks amortise the inter-process overhead
                chunk = max(1, min(64, len(todo) // (4 * workers)))
                computed = pool.imap(_one_utterance, [jobs[i] for i in todo], chunksize=chunk)
                for i, feats in zip(todo, computed, strict=True):
                    out[i] = feats
                    bar.update()
        for i, job in enumerate(jobs):
            if out[i] is None:
                out[i] = _one_utterance(job)
                bar.update()
    return out
