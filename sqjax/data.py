"""Corpora (Kaldi data dirs and VoxCeleb trees), trial lists and audio loading.

A corpus is a sorted list of utterances with their audio path and speaker. Utterance ids
are what trial lists refer to: the wav.scp key for a Kaldi dir, and the path relative to
the root (``id10270/5r0dWxy17C8/00001.wav``) for a VoxCeleb tree, as in the official lists.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Iterable

import librosa
import numpy as np

from sqjax import fileio

AUDIO_EXTENSIONS = (".wav", ".flac")


class DataError(ValueError):
    """Bad input data; the message names the file (and line) at fault and what to do."""


@dataclasses.dataclass(frozen=True)
class Corpus:
    """One entry per utterance, sorted by utterance id."""

    utts: tuple[str, ...]
    paths: tuple[str, ...]
    speakers: tuple[str, ...]

    def __post_init__(self):
        if not len(self.utts) == len(self.paths) == len(self.speakers):
            raise ValueError(
                f"Corpus fields must have equal lengths, got {len(self.utts)} "
                f"utts, {len(self.paths)} paths, {len(self.speakers)} speakers"
            )

    def __len__(self) -> int:
        return len(self.utts)

    def speaker_ids(self) -> tuple[list[str], np.ndarray]:
        """(sorted unique speakers, (n_utts,) int index of each utterance's speaker)."""
        names, index = np.unique(np.asarray(self.speakers, dtype=str), return_inverse=True)
        return names.tolist(), index.astype(np.int64)

    def subset(self, utts: Iterable[str]) -> Corpus:
        """The corpus restricted to ``utts`` (still sorted by id; duplicates ignored)."""
        position = {u: i for i, u in enumerate(self.utts)}
        wanted = sorted(set(utts))
        missing = [u for u in wanted if u not in position]
        if missing:
            raise ValueError(
                f"subset: {len(missing)} utterances are not in the corpus, e.g. "
                f"{missing[:3]}; pass ids from corpus.utts"
            )
        idx = [position[u] for u in wanted]
        return Corpus(
            tuple(self.utts[i] for i in idx),
            tuple(self.paths[i] for i in idx),
            tuple(self.speakers[i] for i in idx),
        )


def _make_corpus(entries: dict[str, tuple[str, str]]) -> Corpus:
    """Corpus from {utt: (path, speaker)}, sorted by utt."""
    utts = tuple(sorted(entries))
    return Corpus(utts, tuple(entries[u][0] for u in utts), tuple(entries[u][1] for u in utts))


def _read_table(path: str, what: str) -> dict[str, tuple[str, int]]:
    """Reads a Kaldi table ``key value...``: {key: (rest of the line, line number)}."""
    table: dict[str, tuple[str, int]] = {}
    with fileio.as_path(path).open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.strip().split(maxsplit=1)
            if len(parts) != 2:
                raise DataError(
                    f"{path}:{lineno}: expected '{what}', got {line.strip()!r}; "
                    f"fix or remove that line"
                )
            key, value = parts
            if key in table:
                raise DataError(
                    f"{path}:{lineno}: duplicate utterance id {key!r} (first on "
                    f"line {table[key][1]}); utterance ids must be unique"
                )
            table[key] = (value.strip(), lineno)
    return table


def read_kaldi_dir(path: str | os.PathLike) -> Corpus:
    """Reads a Kaldi data dir: ``wav.scp`` (``utt path``) and ``utt2spk`` (``utt speaker``).

    Relative audio paths are resolved against the data dir itself (not the working
    directory, as Kaldi would), so a data dir can be moved with its audio. Piped commands
    and archive offsets are not supported. ``path`` may be a URL (``gs://``, ``file://``).
    """
    wav_scp, utt2spk = fileio.join(path, "wav.scp"), fileio.join(path, "utt2spk")
    if not fileio.as_path(wav_scp).is_file():
        raise DataError(
            f"{wav_scp}: not found; a Kaldi data dir needs wav.scp ('<utt> <path>' per line)"
        )
    if not fileio.as_path(utt2spk).is_file():
        raise DataError(
            f"{utt2spk}: not found; create it with one '<utt> <speaker>' line per "
            f"utterance of {wav_scp}"
        )
    wavs = _read_table(wav_scp, "<utt> <path>")
    spks = _read_table(utt2spk, "<utt> <speaker>")
    entries = {}
    for utt, (audio, lineno) in wavs.items():
        if audio.endswith("|"):
            raise DataError(
                f"{wav_scp}:{lineno}: piped command {audio!r} is not supported; "
                f"write the audio to files (e.g. with sox or ffmpeg) and list "
                f"their paths"
            )
        if utt not in spks:
            raise DataError(
                f"{wav_scp}:{lineno}: utterance {utt!r} has no speaker in "
                f"{utt2spk}; add it there or remove it from wav.scp"
            )
        speaker, spk_line = spks[utt]
        if len(speaker.split()) != 1:
            raise DataError(
                f"{utt2spk}:{spk_line}: expected '<utt> <speaker>', got "
                f"{utt} {speaker!r}; speaker ids cannot contain spaces"
            )
        entries[utt] = (fileio.join(path, audio), speaker)  # absolute paths are kept
    for utt, (_, lineno) in spks.items():
        if utt not in wavs:
            raise DataError(
                f"{utt2spk}:{lineno}: utterance {utt!r} is not in {wav_scp}; "
                f"add its audio there or remove it from utt2spk"
            )
    if not entries:
        raise DataError(f"{wav_scp}: no utterances; list one '<utt> <path>' per line")
    return _make_corpus(entries)


def read_voxceleb_dir(root: str | os.PathLike) -> Corpus:
    """Reads a VoxCeleb tree ``root/<speaker>/<video>/<utt>.wav`` (or ``.flac``).

    Utterance id = the path relative to root with ``/`` separators; speaker = its first
    component. ``root``: a local path or an object store's URL (``gs://``; ``read_corpus``
    also takes ``file://`` URLs).
    """
    if fileio.is_remote(root):
        root = os.fspath(root).rstrip("/")
        files = [str(f) for f in fileio.as_path(root).glob("*/*/*")]
        is_file = lambda f: True  # an object store lists objects only
    else:
        root = os.path.abspath(root)
        files = glob.glob(os.path.join(glob.escape(root), "*", "*", "*"))
        is_file = os.path.isfile
    entries = {}
    for f in files:
        if f.lower().endswith(AUDIO_EXTENSIONS) and is_file(f):
            utt = f[len(root) + 1 :].replace(os.sep, "/")
            entries[utt] = (f, utt.split("/", 1)[0])
    if not entries:
        hint = ""
        if any(f.lower().endswith(".m4a") for f in files):
            hint = " It holds .m4a files (VoxCeleb2): convert them to .wav first (e.g. ffmpeg)."
        raise DataError(
            f"{root}: no .wav or .flac files at <speaker>/<video>/<utt> depth; "
            f"point to the VoxCeleb root (the folder holding the id* folders) or "
            f"to a Kaldi data dir with wav.scp.{hint}"
        )
    return _make_corpus(entries)


def read_corpus(path: str | os.PathLike) -> Corpus:
    """A Kaldi data dir if ``path/wav.scp`` exists, else a VoxCeleb tree."""
    path = fileio.local(path)
    folder = fileio.as_path(path)
    if not folder.is_dir():
        what = "not a directory" if folder.exists() else "does not exist"
        raise DataError(
            f"{path}: {what}; pass a Kaldi data dir (with wav.scp and utt2spk) or a VoxCeleb root"
        )
    if fileio.as_path(fileio.join(path, "wav.scp")).exists():
        return read_kaldi_dir(path)
    return read_voxceleb_dir(path)


@dataclasses.dataclass(frozen=True)
class Trials:
    """A trial list: ``(n,)`` arrays of enrollment and test utterance ids, bool labels."""

    enroll: np.ndarray
    test: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        if not len(self.enroll) == len(self.test) == len(self.labels):
            raise ValueError(
                f"Trials fields must have equal lengths, got {len(self.enroll)}, "
                f"{len(self.test)}, {len(self.labels)}"
            )

    def __len__(self) -> int:
        return len(self.labels)


_KALDI_LABELS = {"target": True, "nontarget": False}
_VOX_LABELS = {"1": True, "0": False}


def read_trials(path: str | os.PathLike, corpus: Corpus | None = None) -> Trials:
    """Reads a trial list, VoxCeleb (``1 enroll test``) or Kaldi (``enroll test target``).

    The format is detected per line; blank lines are skipped. With ``corpus``, every
    utterance must be in it.
    """
    path = fileio.local(path)
    if not fileio.as_path(path).is_file():
        raise DataError(f"{path}: trial list not found; check the path")
    known = set(corpus.utts) if corpus is not None else None
    enroll, test, labels = [], [], []
    with fileio.as_path(path).open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            # Kaldi first: a VoxCeleb test id is never the word 'target'/'nontarget'.
            if len(parts) == 3 and parts[2] in _KALDI_LABELS:
                e, t, label = parts[0], parts[1], _KALDI_LABELS[parts[2]]
            elif len(parts) == 3 and parts[0] in _VOX_LABELS:
                e, t, label = parts[1], parts[2], _VOX_LABELS[parts[0]]
            else:
                raise DataError(
                    f"{path}:{lineno}: expected '<0|1> <enroll> <test>' (VoxCeleb) "
                    f"or '<enroll> <test> <target|nontarget>' (Kaldi), got "
                    f"{line.strip()!r}"
                )
            if known is not None:
                for utt in (e, t):
                    if utt not in known:
                        raise DataError(
                            f"{path}:{lineno}: utterance {utt!r} is not in the "
                            f"corpus ({len(known)} utterances); the data dir may "
                            f"not match this trial list"
                        )
            enroll.append(e)
            test.append(t)
            labels.append(label)
    if not labels:
        raise DataError(f"{path}: no trials; the file is empty")
    return Trials(np.asarray(enroll), np.asarray(test), np.asarray(labels, dtype=bool))


MAX_CHANNELS = 2  # mono, or stereo averaged to mono; more is refused (check_format)


def check_format(
    path: str, rate: int, channels: int, sample_rate: int, upsample: bool = False
) -> None:
    """Refuses speech audio a model would take in silently mismatched (a ``DataError``
    naming the file and the fix).

    - A rate below ``sample_rate`` (8 kHz telephone audio for a 16 kHz model): resampling
      up invents no band above the file's Nyquist frequency, so every such utterance would
      reach the model band-limited. Convert the corpus knowingly (``sox in.wav -r 16000
      out.wav``) or train a model at its rate (``data.sample_rate``). Noise banks pass
      ``upsample=True``: their band matters less than their level.
    - More than two channels (a microphone array, a multitrack file): which channel or
      mix is the speaker's is the user's choice (``sox in.wav out.wav remix 1``).

    Higher rates are resampled down; 24- and 32-bit PCM and float files are read exactly.
    """
    if rate < sample_rate and not upsample:
        raise DataError(
            f"{path}: {rate} Hz audio, below data.sample_rate={sample_rate}: resampling up "
            f"would feed the model band-limited speech; convert the corpus to "
            f"{sample_rate} Hz yourself or set data.sample_rate={rate} for a model at its rate"
        )
    if channels > MAX_CHANNELS:
        raise DataError(
            f"{path}: {channels} channels; sqjax reads mono or stereo (averaged): pick the "
            f"speaker's channel first (sox in.wav out.wav remix 1)"
        )


def load_audio(
    path: str | os.PathLike,
    sample_rate: int = 16000,
    min_seconds: float = 0.0,
    upsample: bool = False,
) -> np.ndarray:
    """Reads an audio file as float32 mono at ``sample_rate``: shape (samples,).

    Stereo is averaged; higher rates are resampled with librosa (soxr_hq); lower rates
    and more than two channels are refused unless ``upsample`` (see ``check_format``).
    ``path`` may be a URL (``gs://``, ``file://``).
    """
    path = fileio.local(path)
    if not fileio.as_path(path).is_file():
        raise DataError(f"{path}: audio file not found; check the corpus paths")
    try:
        with fileio.sound_file(path) as f:
            sr, wave = f.samplerate, f.read(dtype="float32", always_2d=True)
    except (RuntimeError, OSError, TypeError) as err:  # libsndfile: not audio / truncated
        raise DataError(
            f"{path}: cannot read audio ({err}); the file is corrupt or not "
            f"WAV/FLAC: re-convert or remove it"
        ) from err
    check_format(str(path), sr, wave.shape[1], sample_rate, upsample)
    if wave.shape[0] == 0:
        raise DataError(f"{path}: empty audio (0 samples); remove it from the corpus")
    wave = wave.mean(axis=1, dtype=np.float32)
    if not np.isfinite(wave).all():
        raise DataError(f"{path}: audio holds NaN or inf samples; re-convert it")
    if sr != sample_rate:
        wave = librosa.resample(wave, orig_sr=sr, target_sr=sample_rate, res_type="soxr_hq")
    seconds = len(wave) / sample_rate
    if seconds < min_seconds:
        raise DataError(
            f"{path}: {seconds:.3f} s of audio, shorter than min_seconds="
            f"{min_seconds}; drop short utterances or lower min_seconds"
        )
    return wave.astype(np.float32, copy=False)
