"""Run sqjax's ONNX encoders and cascade bundles with onnxruntime and NumPy alone (no JAX).

This module imports nothing from sqjax, so a cascade bundle carries a copy of it
(``BUNDLE/sqjax_runtime.py``): a device needs the bundle, NumPy and onnxruntime only::

    import sys; sys.path.insert(0, "BUNDLE")
    from sqjax_runtime import Verifier
    v = Verifier("BUNDLE")
    v.enroll("alice", [wave])              # 16 kHz float waves, or (frames, n_mels) features
    accept, llr, stage = v.verify("alice", wave)

Embeddings are computed as ``sqjax.evaluate.extract_embeddings`` computes them: each
utterance cut to the longest rung of the same length ladder it covers (shorter than 100
frames: repeated to 100), longer than ``max_frames`` split into chunks averaged by length.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

__all__ = [
    "BUNDLE_FORMAT",
    "Encoder",
    "Verifier",
    "features",
    "length_buckets",
    "session_options",
]

BUNDLE_FORMAT, BUNDLE_VERSION = "sqjax-cascade-bundle", 1
MIN_FRAMES = 100  # sqjax.evaluate.extract_embeddings' default
WRAP_INPUT, SPAN_INPUT = "wrap_frames", "frame_span"  # a front end's optional inputs


def length_buckets(min_frames: int, max_frames: int, ratio: float = 1.1) -> np.ndarray:
    """The crop-length ladder of ``sqjax.evaluate.length_buckets`` (same rungs)."""
    n = math.floor(math.log(max_frames / min_frames) / math.log(ratio)) + 1
    rungs = np.unique(np.round(min_frames * ratio ** np.arange(n)).astype(int))
    return np.append(rungs[rungs < max_frames], max_frames)


def session_options(keep_packed: bool = False, threads: int = 0) -> ort.SessionOptions:
    """onnxruntime session options.

    ``keep_packed``: no constant folding (graph optimisations off), so the packed indices
    stay packed in memory and every run decodes them; by default onnxruntime folds the
    decoding subgraphs at load and holds float32 kernels. ``threads``: intra-op threads
    (0: onnxruntime's default, one per core).
    """
    so = ort.SessionOptions()
    # Errors only: a front end's optional inputs (initializers a caller may override)
    # draw a load-time warning about constant folding, which they do not need.
    so.log_severity_level = 3
    if keep_packed:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
    return so


class Encoder:
    """An ONNX encoder written by ``sqjax export --format onnx``.

    Attributes:
      metadata: the model file's metadata (``model``, ``features``, ``eval``, ``bits``).
    """

    def __init__(self, path: str | os.PathLike, keep_packed: bool = False, threads: int = 0):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(
                f"{self.path}: no such ONNX file (write it with `sqjax export --format onnx`)"
            )
        self.session = ort.InferenceSession(
            str(self.path),
            session_options(keep_packed, threads),
            providers=["CPUExecutionProvider"],
        )
        props = self.session.get_modelmeta().custom_metadata_map
        if "sqjax" not in props:
            raise ValueError(
                f"{self.path}: an ONNX file without sqjax metadata; write it with `sqjax export --format onnx`"
            )
        self.metadata = json.loads(props["sqjax"])
        ev = self.metadata.get("eval", {})
        self.batch_size = int(ev.get("batch_size", 32))
        self.max_frames = int(ev.get("max_frames", 3000))
        self.n_mels = int(self.metadata["features"]["n_mels"])
        # An encoder exported --with-frontend takes 16 kHz waves, not features.
        self.takes_wave = self.session.get_inputs()[0].name == "wave"

    def run(self, x: np.ndarray) -> np.ndarray:
        """Embeddings ``(batch, dim)`` of a batch of equal-length features ``(batch, frames,
        n_mels)``, or of waves ``(batch, samples)`` for an encoder with its front end."""
        x = np.ascontiguousarray(x, np.float32)
        if self.takes_wave:
            if x.ndim != 2:
                raise ValueError(f"{self.path}: expects (batch, samples) waves, got {x.shape}")
            return self.session.run(["embedding"], {"wave": x})[0]
        if x.ndim != 3 or x.shape[-1] != self.n_mels:
            raise ValueError(
                f"{self.path}: expects (batch, frames, {self.n_mels}) features, got {x.shape}"
            )
        return self.session.run(["embedding"], {"feats": x})[0]

    def embed(self, utts: Sequence[np.ndarray]) -> np.ndarray:
        """Embeddings ``(n, dim)`` of utterances: features ``(frames, n_mels)``,
        mean-normalised, cut and batched as ``sqjax.evaluate.extract_embeddings``; or, for
        an encoder with its front end, waves ``(samples,)`` (``embed_waves``)."""
        if self.takes_wave:
            return self.embed_waves(utts)
        segments = sorted(self._feature_segments(utts).items())
        return self._embed_groups([(n, self.run, items) for n, items in segments], len(utts))

    def _feature_segments(self, feats: Sequence[np.ndarray]) -> dict[int, list]:
        rungs = length_buckets(MIN_FRAMES, self.max_frames)
        segments: dict[int, list] = {}
        for i, f in enumerate(feats):
            f = np.asarray(f, np.float32)
            n = f.shape[0]
            if n < MIN_FRAMES:
                f, n = np.pad(f, ((0, MIN_FRAMES - n), (0, 0)), mode="wrap"), MIN_FRAMES
            for start in range(0, n, self.max_frames):
                seg = f[start : start + self.max_frames]
                if start and seg.shape[0] < MIN_FRAMES:
                    break
                rung = int(rungs[np.searchsorted(rungs, seg.shape[0], side="right") - 1])
                segments.setdefault(rung, []).append((i, seg[:rung]))
        return segments

    def embed_waves(self, waves: Sequence[np.ndarray]) -> np.ndarray:
        """Embeddings ``(n, dim)`` of mono waves at the features' rate, with the graph's
        front end, equal to ``embed`` of sqjax's features of the same waves: the features
        are mean-normalised over the whole wave, then repeated to 100 frames, split into
        chunks of ``max_frames`` and cut to length rungs by the graph's optional inputs
        (``wrap_frames``, ``frame_span``). Waves of equal length share batches."""
        if not self.takes_wave:
            raise ValueError(f"{self.path}: takes features; export --with-frontend for waves")
        spec = self.metadata["features"]
        sr, kind = int(spec["sample_rate"]), spec.get("kind", "logmel")
        win, hop = round(sr * spec["win_ms"] / 1000), round(sr * spec["hop_ms"] / 1000)
        frame = win if kind == "kaldi" else 1 << (win - 1).bit_length()
        rungs = length_buckets(MIN_FRAMES, self.max_frames)
        groups: dict[tuple, list] = {}  # (samples, wrap, first, end) -> [(utterance, wave)]
        for i, w in enumerate(waves):
            w = np.asarray(w, np.float32)
            if w.ndim != 1 or len(w) < frame:
                raise ValueError(
                    f"embed_waves: utterance {i} is not a 1-D wave of at least {frame} samples: {w.shape}"
                )
            n = 1 + (len(w) - frame) // hop  # frames of the whole wave
            w = w[: frame + (n - 1) * hop]  # whole frames only
            wrap = max(MIN_FRAMES - n, 0)
            for start in range(0, n + wrap, self.max_frames):
                length = min(self.max_frames, n + wrap - start)
                if start and length < MIN_FRAMES:
                    break
                rung = int(rungs[np.searchsorted(rungs, length, side="right") - 1])
                groups.setdefault((len(w), wrap, start, start + rung), []).append((i, w))
        return self._embed_groups(
            [(end - first, functools.partial(self._run_cut, wrap, first, end), items)
             for (_, wrap, first, end), items in sorted(groups.items())],
            len(waves),
        )  # fmt: skip

    def _run_cut(self, wrap: int, first: int, end: int, x: np.ndarray) -> np.ndarray:
        """Embeddings of equal-length waves ``x``, their features cut to ``[first, end)``
        after ``wrap`` frames appended by repetition."""
        cut = {WRAP_INPUT: np.array([wrap], np.int64), SPAN_INPUT: np.array([first, end], np.int64)}
        return self.session.run(
            ["embedding"], {"wave": np.ascontiguousarray(x, np.float32), **cut}
        )[0]

    def _embed_groups(self, groups, n_utts: int) -> np.ndarray:
        """Length-weighted mean embedding per utterance of ``[(weight, run, [(utt, x)])]``:
        each group's inputs ``x`` share a shape and go through ``run`` in batches."""
        sums, counts = None, np.zeros(n_utts)
        for weight, run, items in groups:
            for lo in range(0, len(items), self.batch_size):
                chunk = items[lo : lo + self.batch_size]
                emb = run(np.stack([x for _, x in chunk]))
                if sums is None:
                    sums = np.zeros((n_utts, emb.shape[-1]), np.float64)
                idx = np.array([i for i, _ in chunk])
                np.add.at(sums, idx, emb * weight)
                np.add.at(counts, idx, weight)
        if sums is None:
            return np.zeros((0, int(self.metadata["model"].get("embed_dim") or 0)), np.float32)
        return (sums / counts[:, None]).astype(np.float32)


# --------------------------------------------------------------------------- front end


def features(wave: np.ndarray, spec: dict, mel: np.ndarray | None = None) -> np.ndarray:
    """Mean-normalised features ``(frames, n_mels)`` of a mono wave, as ``sqjax.features``
    computes them (``spec``: a model file's ``features``). ``kind="logmel"`` needs
    ``mel``, librosa's ``(n_mels, n_fft // 2 + 1)`` filters (a bundle stores them)."""
    sr, n_mels = int(spec["sample_rate"]), int(spec["n_mels"])
    win, hop = round(sr * spec["win_ms"] / 1000), round(sr * spec["hop_ms"] / 1000)
    n_fft = 1 << (win - 1).bit_length()
    wave = np.asarray(wave, np.float32)
    kind = spec.get("kind", "logmel")
    frame = win if kind == "kaldi" else n_fft
    if wave.ndim != 1 or len(wave) < frame:
        raise ValueError(
            f"wave must be 1-D mono with at least {frame} samples at {sr} Hz, got shape {wave.shape}"
        )
    if kind == "kaldi":
        x = wave.astype(np.float64) * 32768.0
        frames = np.lib.stride_tricks.sliding_window_view(x, win)[::hop]
        frames = frames - frames.mean(axis=1, keepdims=True)
        frames = frames - 0.97 * np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
        frames = frames * (0.54 - 0.46 * np.cos(2 * np.pi * np.arange(win) / (win - 1)))
        spectrum = np.fft.rfft(frames, n=n_fft, axis=1)[:, : n_fft // 2]
        power = spectrum.real**2 + spectrum.imag**2
        feats = np.log(
            np.maximum(power @ _kaldi_banks(n_mels, n_fft, sr), np.finfo(np.float32).eps)
        )
    elif kind == "logmel":
        if mel is None:
            raise ValueError("logmel features need the mel filters (a bundle's frontend.npz)")
        # librosa, center=False: frames of n_fft samples, the periodic Hann window of win
        # samples centred in them.
        window = np.zeros(n_fft)
        lo = (n_fft - win) // 2
        window[lo : lo + win] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
        frames = np.lib.stride_tricks.sliding_window_view(wave, n_fft)[::hop]
        spectrum = np.fft.rfft(frames * window.astype(np.float32), axis=1)
        power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
        feats = np.log(power @ mel.T.astype(np.float32) + 1e-6)
    else:
        raise ValueError(f"features kind {kind!r}: expected 'logmel' or 'kaldi'")
    if spec.get("mean_norm", True):
        feats = feats - feats.mean(axis=0, keepdims=True)
    return feats.astype(np.float32)


def _kaldi_banks(n_mels: int, padded: int, sr: int) -> np.ndarray:
    mel = lambda f: 1127.0 * np.log1p(np.asarray(f, np.float64) / 700.0)
    low, high = mel(20.0), mel(sr / 2)
    delta = (high - low) / (n_mels + 1)
    left = low + delta * np.arange(n_mels)
    center, right = left + delta, left + 2 * delta
    bins = mel(np.arange(padded // 2) * sr / padded)[:, None]
    w = np.where(bins <= center, (bins - left) / (center - left), (right - bins) / (right - center))
    return np.where((bins > left) & (bins < right), w, 0.0)


# ---------------------------------------------------------------------------- verifier


class Verifier:
    """The calibrated multi-precision cascade of a bundle (``sqjax export --cascade``).

    ``enroll`` stores a speaker's embedding at every stage; ``verify`` embeds the test
    utterance at the first stage, scores it against the enrollment (cosine, then the
    stage's calibration ``a * s + b``), and escalates to the next stage while
    ``|llr - eta| < tau``; the last stage always decides. Accept when ``llr >= eta``.
    """

    def __init__(self, bundle: str | os.PathLike, keep_packed: bool = False, threads: int = 0):
        self.bundle = Path(bundle)
        manifest = self.bundle / "manifest.json"
        if not manifest.is_file():
            raise FileNotFoundError(
                f"{manifest}: not a cascade bundle (write one with `sqjax export --cascade`)"
            )
        m = json.loads(manifest.read_text())
        if m.get("format") != BUNDLE_FORMAT or m.get("version") != BUNDLE_VERSION:
            raise ValueError(
                f"{manifest}: not a {BUNDLE_FORMAT} manifest of version {BUNDLE_VERSION} (got {m.get('format')!r} {m.get('version')!r})"
            )
        self.manifest = m
        self.stages = [s["name"] for s in m["stages"]]
        self.encoders = [
            Encoder(self.bundle / s["file"], keep_packed, threads) for s in m["stages"]
        ]
        self.ab = [(float(s["a"]), float(s["b"])) for s in m["stages"]]
        self.taus = [float(s["tau"]) for s in m["stages"][:-1]]
        self.eta = float(m["eta"])
        self.frontend = m["features"]
        fe = self.bundle / "frontend.npz"
        self.mel = np.load(fe)["mel"] if fe.is_file() else None
        self.speakers: dict[str, list[np.ndarray]] = {}
        self.embedded = np.zeros(len(self.stages), np.int64)  # embeddings computed per stage

    def _feats(self, x) -> np.ndarray:
        x = np.asarray(x, np.float32)
        return features(x, self.frontend, self.mel) if x.ndim == 1 else x

    def _unit(self, p: int, utts: Sequence) -> np.ndarray:
        emb = self.encoders[p].embed([self._feats(u) for u in utts])
        self.embedded[p] += len(utts)
        return emb

    def enroll(self, speaker: str, utterances: Sequence) -> None:
        """Enrolls ``speaker`` from waves ``(samples,)`` or features ``(frames, n_mels)``:
        at each stage, the mean of the utterances' embeddings (one utterance: its own)."""
        if not len(utterances):
            raise ValueError(f"enroll({speaker!r}): give at least one utterance")
        self.speakers[speaker] = [
            self._unit(p, utterances).mean(axis=0) for p in range(len(self.stages))
        ]

    def verify(self, speaker: str, utterance) -> tuple[bool, float, int]:
        """``(accept, llr, stage index)`` of the claim that ``utterance`` is ``speaker``'s."""
        if speaker not in self.speakers:
            raise KeyError(f"verify: {speaker!r} is not enrolled (call enroll first)")
        feats = self._feats(utterance)
        for p, (a, b) in enumerate(self.ab):
            t = self._unit(p, [feats])[0]
            e = self.speakers[speaker][p]
            cos = float(np.dot(e, t) / (np.linalg.norm(e) * np.linalg.norm(t)))
            llr = a * cos + b
            if p == len(self.ab) - 1 or abs(llr - self.eta) >= self.taus[p]:
                return bool(llr >= self.eta), float(llr), p
        raise AssertionError("unreachable: the last stage decides")
