"""Training input: speaker-balanced random crops, of cached features or streamed audio.

Two samplers draw the same way and differ in what they crop:

- ``CropSampler`` crops log-mel features held in memory (or memory-mapped from the
  feature cache): fast for small corpora such as the built-in one.
- ``WaveSampler`` reads a random waveform crop of each example straight from its audio
  file (a seek and a short read), so host memory does not grow with the corpus; the
  features are computed on the accelerator inside the training step
  (``sqjax.jaxfeatures``). This is the input for VoxCeleb-size corpora.

Batches are a pure function of ``(seed, step)``: the batch's speakers come from
``default_rng([seed, step])`` and example ``j``'s utterance and crop from
``default_rng([seed, step, j])``. Each process builds only its slice of the global
batch, and the global batch is the same for any number of processes and devices, so a
resumed run (or one on another number of hosts) sees exactly the batches of an
uninterrupted one, without saving any pipeline state. ``prefetch`` builds batches with
Grain (in worker processes when asked) and places them on the devices from a background
thread while the accelerator works on the current step.
"""

from __future__ import annotations

import functools
import math
import queue
import threading
from collections.abc import Iterator, Sequence

import grain
import jax
import librosa
import numpy as np

from sqjax import fileio
from sqjax.data import DataError, check_format


def crop(feats: np.ndarray, n_frames: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``(n_frames, ...)`` window; shorter utterances are repeated to fit."""
    total = feats.shape[0]
    if total < n_frames:
        return np.pad(feats, ((0, n_frames - total),) + ((0, 0),) * (feats.ndim - 1), mode="wrap")
    start = rng.integers(0, total - n_frames + 1)
    return feats[start : start + n_frames]


class _Balanced:
    """The draws both samplers share: uniform speakers (distinct within a batch while
    there are enough), then a uniform utterance of the speaker. Uniform speakers rather
    than uniform utterances keep prolific speakers from dominating the softmax."""

    def __init__(self, n_utts: int, labels: np.ndarray, seed: int):
        labels = np.asarray(labels)
        if n_utts != len(labels):
            raise ValueError(f"got {n_utts} utterances but {len(labels)} labels")
        if n_utts == 0:
            raise ValueError("no training utterances: check config.data.train")
        self.labels, self.seed = labels, seed
        self.n_speakers = int(labels.max()) + 1
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(self.n_speakers + 1))
        self._utts_of = [order[bounds[s] : bounds[s + 1]] for s in range(self.n_speakers)]
        self._present = np.array([s for s in range(self.n_speakers) if len(self._utts_of[s])])

    def draws(self, step: int, batch_size: int, lo: int, hi: int | None):
        """``(utterance, rng)`` of examples ``[lo, hi)`` of global batch ``step``."""
        hi = batch_size if hi is None else hi
        if not 0 <= lo <= hi <= batch_size:
            raise ValueError(f"examples [{lo}, {hi}) are not within a batch of {batch_size}")
        replace = batch_size > len(self._present)
        rng = np.random.default_rng([self.seed, step])
        speakers = rng.choice(self._present, size=batch_size, replace=replace)
        for j in range(lo, hi):
            rng = np.random.default_rng([self.seed, step, j])
            yield int(rng.choice(self._utts_of[speakers[j]])), rng


class CropSampler(_Balanced):
    """Speaker-balanced batches of random fixed-length crops of in-memory features.

    Args:
      feats: one ``(frames, n_mels)`` array per utterance (may be memory-mapped).
      labels: ``(n_utts,)`` int speaker index per utterance, in ``[0, n_speakers)``.
      n_frames: crop length (200 frames = 2 s at a 10 ms hop).
      seed: base seed (see the module docstring).
    """

    def __init__(self, feats: Sequence[np.ndarray], labels: np.ndarray, n_frames: int, seed: int):
        super().__init__(len(feats), labels, seed)
        self.feats, self.n_frames = feats, n_frames

    def batch(
        self, step: int, batch_size: int, lo: int = 0, hi: int | None = None
    ) -> dict[str, np.ndarray]:
        """Examples ``[lo, hi)`` (default: all) of global batch ``step``:
        ``{"feats": (n, n_frames, n_mels) float32, "labels": (n,) int32}``."""
        feats, labels = [], []
        for utt, rng in self.draws(step, batch_size, lo, hi):
            feats.append(crop(self.feats[utt], self.n_frames, rng))
            labels.append(self.labels[utt])
        return {"feats": np.stack(feats).astype(np.float32), "labels": np.asarray(labels, np.int32)}


def read_crop(path: str, n_samples: int, sample_rate: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``(n_samples,)`` float32 mono crop of an audio file at ``sample_rate``,
    reading only the crop; shorter files are repeated to fit. Higher rates are resampled
    (the crop is read at the file's rate, long enough to cover ``n_samples``); lower rates
    and more than two channels are refused (``data.check_format``)."""
    try:
        with fileio.sound_file(path) as f:
            sr, total = f.samplerate, f.frames
            check_format(path, sr, f.channels, sample_rate)
            need = n_samples if sr == sample_rate else math.ceil(n_samples * sr / sample_rate) + 8
            if total > need:
                f.seek(int(rng.integers(0, total - need + 1)))
            data = f.read(min(need, total), dtype="float32", always_2d=True)
    except (RuntimeError, OSError, TypeError) as err:  # libsndfile: missing / not audio
        raise DataError(
            f"{path}: cannot read audio ({err}); the file is missing, corrupt or not "
            f"WAV/FLAC: re-convert it or remove it from the corpus"
        ) from err
    if data.shape[0] == 0:
        raise DataError(f"{path}: empty audio (0 samples); remove it from the corpus")
    wave = data.mean(axis=1, dtype=np.float32)
    if sr != sample_rate:
        wave = librosa.resample(wave, orig_sr=sr, target_sr=sample_rate, res_type="soxr_hq")
    if wave.shape[0] < n_samples:
        wave = np.pad(wave, (0, n_samples - wave.shape[0]), mode="wrap")
    return wave[:n_samples].astype(np.float32, copy=False)


class WaveSampler(_Balanced):
    """Speaker-balanced batches of random waveform crops read from audio files.

    Holds only the file list, so host memory is the same for any corpus size.

    Args:
      paths: one audio file per utterance.
      labels: ``(n_utts,)`` int speaker index per utterance.
      n_samples: crop length in samples (``jaxfeatures.frames_to_samples(n_frames)``).
      sample_rate: the rate crops are returned at.
      seed: base seed (see the module docstring).
    """

    def __init__(
        self, paths: Sequence[str], labels: np.ndarray, n_samples: int, sample_rate: int, seed: int
    ):
        super().__init__(len(paths), labels, seed)
        self.paths, self.n_samples, self.sample_rate = tuple(paths), n_samples, sample_rate

    def batch(
        self, step: int, batch_size: int, lo: int = 0, hi: int | None = None
    ) -> dict[str, np.ndarray]:
        """Examples ``[lo, hi)`` (default: all) of global batch ``step``:
        ``{"wave": (n, n_samples) float32, "labels": (n,) int32}``."""
        waves, labels = [], []
        for utt, rng in self.draws(step, batch_size, lo, hi):
            waves.append(read_crop(self.paths[utt], self.n_samples, self.sample_rate, rng))
            labels.append(self.labels[utt])
        return {"wave": np.stack(waves), "labels": np.asarray(labels, np.int32)}


def _local_batch(sampler, global_batch: int, lo: int, hi: int, step: int):
    return sampler.batch(step, global_batch, lo, hi)


def process_rows(sharding: jax.sharding.Sharding, global_batch: int) -> tuple[int, int]:
    """``(lo, hi)``: the rows of a ``global_batch`` that this process's devices hold under
    ``sharding`` (what it passes to ``jax.make_array_from_process_local_data``). They
    must be one contiguous range: ``sqjax.train.make_mesh`` orders devices by process."""
    if global_batch % jax.process_count():
        raise ValueError(
            f"config.train.batch_size={global_batch} is not divisible by "
            f"{jax.process_count()} processes"
        )
    spans = sorted(
        (ix[0].start or 0, global_batch if ix[0].stop is None else ix[0].stop)
        for ix in sharding.addressable_devices_indices_map((global_batch,)).values()
    )
    lo, hi = spans[0][0], spans[0][0]
    for start, stop in spans:  # replicas repeat a span; a gap breaks the contiguity
        if start > hi:
            raise ValueError(
                f"this process holds rows {spans} of the batch, not one contiguous range: "
                f"build the mesh with sqjax.train.make_mesh (devices ordered by process)"
            )
        hi = max(hi, stop)
    return lo, hi


def local_batches(
    sampler: CropSampler | WaveSampler,
    start_step: int,
    num_steps: int,
    global_batch: int,
    rows: tuple[int, int] | None = None,
    workers: int = 0,
) -> grain.IterDataset:
    """Rows ``[lo, hi)`` (default: all) of global batches ``[start_step, num_steps)``, as a
    Grain dataset (NumPy dicts, in step order); ``workers > 0`` builds them in that many
    worker processes (the sampler is pickled to them: use it for ``WaveSampler``)."""
    lo, hi = rows or (0, global_batch)
    fn = functools.partial(_local_batch, sampler, global_batch, lo, hi)
    ds = grain.MapDataset.range(start_step, num_steps).map(fn)
    it = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=0 if workers else 1, prefetch_buffer_size=2)
    )
    if workers:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # Grain's workers read absl flags (defaults here)
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return it


def prefetch(
    sampler: CropSampler | WaveSampler,
    start_step: int,
    num_steps: int,
    global_batch: int,
    sharding: jax.sharding.Sharding,
    depth: int = 2,
    workers: int = 0,
) -> Iterator[dict[str, jax.Array]]:
    """Yields global batches for steps ``[start_step, num_steps)``, placed with
    ``sharding`` from a background thread.

    Each process builds only the rows its devices hold (``process_rows``,
    ``local_batches``) and ``jax.make_array_from_process_local_data`` assembles the
    global, sharded array. Close the generator (or exhaust it) to stop the thread and
    Grain's worker processes.
    """
    rows = process_rows(sharding, global_batch)
    batches = local_batches(sampler, start_step, num_steps, global_batch, rows, workers)
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        it = iter(batches)
        try:
            for local in it:
                if stop.is_set():
                    return
                q.put(
                    {
                        k: jax.make_array_from_process_local_data(sharding, v)
                        for k, v in local.items()
                    }
                )
        except BaseException as e:  # noqa: BLE001 -- re-raised in the consumer, not swallowed
            q.put(e)
        finally:
            if hasattr(it, "close"):  # Grain's multiprocess iterator: stop its workers
                it.close()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        for _ in range(start_step, num_steps):
            item = q.get()
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
