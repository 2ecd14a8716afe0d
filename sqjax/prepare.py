"""From a config to arrays: the built-in corpus or the user's data dirs, as features.

This is the one place that reads ``config.data``; library functions below it take plain
arguments. Features are extracted once without mean normalisation and cached; the model
input is the per-utterance mean-normalised version (cheap to derive), and the
raw-feature baseline uses the unnormalised statistics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from collections.abc import Sequence

import ml_collections
import numpy as np

from sqjax import data as data_lib
from sqjax import features, fileio, synth

log = logging.getLogger("sqjax")


class MeanNormalised(Sequence):
    """A lazy view of feature arrays minus their per-utterance means (works on memmaps)."""

    def __init__(self, raw: Sequence[np.ndarray]):
        self.raw = raw

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, i: int) -> np.ndarray:
        f = np.asarray(self.raw[i], np.float32)
        return f - f.mean(0, keepdims=True)


@dataclasses.dataclass(frozen=True)
class Split:
    """One data dir's utterances as features, with its trial list (if any)."""

    corpus: data_lib.Corpus
    # (frames, n_mels) log-mel, not mean-normalised; None for streamed training input
    raw_feats: Sequence[np.ndarray] | None
    trials: data_lib.Trials | None = None

    @property
    def feats(self) -> MeanNormalised:
        """Model input: per-utterance mean-normalised log-mel."""
        if self.raw_feats is None:
            raise ValueError("this split is streamed (data.input='stream'): it has no features")
        return MeanNormalised(self.raw_feats)

    @property
    def labels(self) -> np.ndarray:
        return self.corpus.speaker_ids()[1]

    @property
    def n_speakers(self) -> int:
        return len(self.corpus.speaker_ids()[0])

    def trial_speakers(self) -> tuple[np.ndarray, np.ndarray]:
        """The speakers of the enrollment and the test side of each trial: two ``(T,)``."""
        if self.trials is None:
            raise ValueError("this split has no trial list")
        spk = dict(zip(self.corpus.utts, self.corpus.speakers))
        return (
            np.array([spk[u] for u in self.trials.enroll]),
            np.array([spk[u] for u in self.trials.test]),
        )

    def first_speakers(self, n: int) -> Split:
        """The split restricted to its first ``n`` speakers (sorted by name) and the
        trials among them; ``n`` <= 0 or at least the split's speakers: the split itself."""
        names, index = self.corpus.speaker_ids()
        if n <= 0 or n >= len(names):
            return self
        keep = np.flatnonzero(index < n)
        corpus = self.corpus.subset(self.corpus.utts[i] for i in keep)
        trials = self.trials
        if trials is not None:
            m = np.isin(trials.enroll, corpus.utts) & np.isin(trials.test, corpus.utts)
            if not m.any():
                raise ValueError(f"no trial lies among the first {n} speakers of the split")
            trials = data_lib.Trials(trials.enroll[m], trials.test[m], trials.labels[m])
        raw = None if self.raw_feats is None else [self.raw_feats[i] for i in keep]
        return Split(corpus, raw, trials)


def resolve_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config.data`` with the built-in corpus generated and its paths filled in."""
    d = ml_collections.ConfigDict(config.data.to_dict())
    if d.synth:
        root = synth.generate_corpus(
            d.synth_dir, **d.synth_args.to_dict(), progress=config.progress
        )
        d.train = d.train or str(root / "train")
        d.test = d.test or str(root / "test")
        d.test_trials = d.test_trials or str(root / "test" / "trials")
        d.cal = d.get("cal") or str(root / "dev")  # runs older than data.cal lack it
        d.cal_trials = d.get("cal_trials") or str(root / "dev" / "trials")
        d.feature_cache = d.feature_cache or str(root / "features")
    return d


def data_cache_dir(
    cache_dir: str | os.PathLike, data_dir: str | os.PathLike, kind: str = "logmel"
) -> str:
    """The feature cache of one data dir: ``cache_dir/<dir name>-<12 hex>``, with
    ``-<kind>`` appended for features other than the default log-mel.

    The hex digest is of the data dir's resolved path, so two dirs of one name (a clean
    and a noisy copy of ``test``) get their own folders, and a dir keeps its folder across
    runs (the built-in corpus's features are extracted once). Correctness does not rest on
    it: entries are keyed by the audio files themselves (see ``features._cache_file``);
    the folder lets a user see, and delete, one data dir's features.
    """
    if fileio.is_remote(cache_dir):
        raise ValueError(
            f"config.data.feature_cache={os.fspath(cache_dir)!r}: the feature cache must be a "
            f"local folder (features are memory-mapped); data dirs may be remote"
        )
    data_dir = os.fspath(data_dir)
    real = data_dir.rstrip("/") if fileio.is_remote(data_dir) else os.path.realpath(data_dir)
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", real.rsplit("/", 1)[-1])[-40:] or "root"
    digest = hashlib.sha1(real.encode("utf-8")).hexdigest()[:12]
    suffix = "" if kind == "logmel" else f"-{kind}"
    return os.path.join(os.fspath(cache_dir), f"{name}-{digest}{suffix}")


def load_split(
    data_dir: str,
    trials_path: str | None,
    *,
    sample_rate: int,
    n_mels: int,
    cache_dir: str | None,
    min_seconds: float,
    workers: int,
    progress: bool = True,
    kind: str = "logmel",
) -> Split:
    """Reads a data dir (Kaldi or VoxCeleb layout), its trials, and their features
    (``kind``: see ``features.extract_features``).

    With a trial list, only the utterances the trials use are loaded. With ``cache_dir``,
    features are cached in its subfolder ``data_cache_dir(cache_dir, data_dir)``.
    """
    corpus = data_lib.read_corpus(data_dir)
    trials = None
    if trials_path:
        trials = data_lib.read_trials(trials_path, corpus)
        corpus = corpus.subset(sorted(set(trials.enroll) | set(trials.test)))
    if cache_dir and os.path.isfile(os.path.join(cache_dir, "meta.json")):
        log.warning(
            "%s holds features cached by an older sqjax (one folder for all data dirs); "
            "they are no longer read: delete its meta.json and two-hex folders to free "
            "the space",
            cache_dir,
        )
    raw = features.extract_features(
        corpus,
        sample_rate=sample_rate,
        n_mels=n_mels,
        mean_norm=False,
        cache_dir=data_cache_dir(cache_dir, data_dir, kind) if cache_dir else None,
        min_seconds=min_seconds,
        workers=workers,
        progress=progress,
        kind=kind,
    )
    return Split(corpus, raw, trials)


def _split(config, d, data_dir: str, trials: str | None, key: str) -> Split:
    if not data_dir:
        raise ValueError(f"config.data.{key} is empty: set it to a data dir, or data.synth=True")
    return load_split(
        data_dir,
        trials,
        sample_rate=d.sample_rate,
        n_mels=config.model.n_mels,
        cache_dir=d.feature_cache,
        min_seconds=d.min_seconds,
        workers=d.workers,
        progress=config.progress,
        kind=config.features.kind,
    )


def training_data(config: ml_collections.ConfigDict) -> Split:
    """The training split named by ``config.data`` (all its utterances)."""
    d = resolve_paths(config)
    split = _split(config, d, d.train, None, "train")
    log.info("train: %d utterances, %d speakers", len(split.corpus.utts), split.n_speakers)
    return split


def training_input(config: ml_collections.ConfigDict) -> Split:
    """What training reads: ``training_data`` with ``data.input="cache"``; with
    ``"stream"`` only the corpus listing (audio is read per step, nothing extracted)."""
    if config.data.input != "stream":
        return training_data(config)
    d = resolve_paths(config)
    if not d.train:
        raise ValueError("config.data.train is empty: set it to a data dir, or data.synth=True")
    split = Split(data_lib.read_corpus(d.train), None)
    log.info(
        "train (streamed): %d utterances, %d speakers", len(split.corpus.utts), split.n_speakers
    )
    return split


def test_data(config: ml_collections.ConfigDict) -> Split:
    """The test split with its trials."""
    d = resolve_paths(config)
    if not d.test_trials:
        raise ValueError("no test trials: set config.data.test_trials (or use data.synth=True)")
    return _split(config, d, d.test, d.test_trials, "test")


def calibration_data(config: ml_collections.ConfigDict) -> Split | None:
    """The calibration split with its trials, or None when the config names none."""
    d = resolve_paths(config)
    if not (d.get("cal") and d.get("cal_trials")):
        return None
    return _split(config, d, d.cal, d.cal_trials, "cal")
