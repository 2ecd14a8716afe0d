"""Training input pipeline: speaker-balanced random crops of log-mel features.

Batches are a pure function of ``(seed, step, process_index)``, so a resumed run sees
exactly the batches an uninterrupted run would have seen, without saving any pipeline
state. A background thread builds and places the next batches while the accelerator
works on the current one.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

import jax
import numpy as np


def crop(feats: np.ndarray, n_frames: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``(n_frames, n_mels)`` window; shorter utterances are repeated to fit."""
    total = feats.shape[0]
    if total < n_frames:
        feats = np.pad(feats, ((0, n_frames - total), (0, 0)), mode="wrap")
        return feats
    start = rng.integers(0, total - n_frames + 1)
    return feats[start : start + n_frames]


class CropSampler:
    """Speaker-balanced batches of random fixed-length crops.

    Each example draws a speaker uniformly (distinct speakers within a batch while there
    are enough), then one of that speaker's utterances, then a crop. Uniform speakers
    rather than uniform utterances keep prolific speakers from dominating the softmax.

    Args:
      feats: one ``(frames, n_mels)`` array per utterance (may be memory-mapped).
      labels: ``(n_utts,)`` int speaker index per utterance, in ``[0, n_speakers)``.
      n_frames: crop length (200 frames = 2 s at a 10 ms hop).
      seed: base seed; batch ``step`` uses ``default_rng([seed, step, process_index])``.
    """

    def __init__(self, feats: Sequence[np.ndarray], labels: np.ndarray, n_frames: int, seed: int):
        labels = np.asarray(labels)
        if len(feats) != len(labels):
            raise ValueError(f"got {len(feats)} feature arrays but {len(labels)} labels")
        if len(feats) == 0:
            raise ValueError("no training utterances: check config.data.train")
        self.feats, self.labels, self.n_frames, self.seed = feats, labels, n_frames, seed
        self.n_speakers = int(labels.max()) + 1
        order = np.argsort(labels, kind="stable")
        bounds = np.searchsorted(labels[order], np.arange(self.n_speakers + 1))
        self._utts_of = [order[bounds[s] : bounds[s + 1]] for s in range(self.n_speakers)]
        self._present = np.array([s for s in range(self.n_speakers) if len(self._utts_of[s])])

    def batch(self, step: int, batch_size: int, process_index: int = 0) -> dict[str, np.ndarray]:
        """Batch ``step``: ``{"feats": (batch, n_frames, n_mels) float32, "labels": (batch,) int32}``."""
        rng = np.random.default_rng([self.seed, step, process_index])
        replace = batch_size > len(self._present)
        speakers = rng.choice(self._present, size=batch_size, replace=replace)
        feats, labels = [], []
        for s in speakers:
            utt = rng.choice(self._utts_of[s])
            feats.append(crop(self.feats[utt], self.n_frames, rng))
            labels.append(self.labels[utt])
        return {
            "feats": np.stack(feats).astype(np.float32),
            "labels": np.asarray(labels, np.int32),
        }


def prefetch(
    sampler: CropSampler,
    start_step: int,
    num_steps: int,
    global_batch: int,
    sharding: jax.sharding.Sharding,
    depth: int = 2,
) -> Iterator[dict[str, jax.Array]]:
    """Yields global batches for steps ``[start_step, num_steps)``, built in a thread.

    Each process builds only its own slice of the global batch (multi-host ready) and
    ``jax.make_array_from_process_local_data`` assembles the global, sharded array.
    """
    n_proc, proc = jax.process_count(), jax.process_index()
    if global_batch % n_proc:
        raise ValueError(
            f"config.train.batch_size={global_batch} is not divisible by {n_proc} processes"
        )
    local_batch = global_batch // n_proc
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            for step in range(start_step, num_steps):
                if stop.is_set():
                    return
                local = sampler.batch(step, local_batch, proc)
                item = {
                    k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()
                }
                q.put(item)
        except BaseException as e:  # noqa: BLE001 -- re-raised in the consumer, not swallowed
            q.put(e)

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
