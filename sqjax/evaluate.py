"""Whole-utterance embeddings, cosine scoring, and the raw-feature baseline.

Everything here is pure in the model variables: ``embed(variables, feats)`` may be
``jax.vmap``-ed over a leading precision axis of stacked variables.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

EmbedFn = Callable[[object, jax.Array], jax.Array]


def length_buckets(min_frames: int, max_frames: int, ratio: float = 1.1) -> np.ndarray:
    """Geometric ladder of crop lengths; an utterance is cut to the largest rung it covers.

    Evaluating full utterances would compile one program per length; cutting to a rung
    drops at most ``1 - 1/ratio`` (9%) of an utterance's frames and keeps the number of
    compiled shapes logarithmic in the length range.
    """
    n = math.floor(math.log(max_frames / min_frames) / math.log(ratio)) + 1
    rungs = np.unique(np.round(min_frames * ratio ** np.arange(n)).astype(int))
    return np.append(rungs[rungs < max_frames], max_frames)


def extract_embeddings(
    embed: EmbedFn,
    variables,
    feats: Sequence[np.ndarray],
    *,
    batch_size: int = 32,
    min_frames: int = 100,
    max_frames: int = 3000,
) -> np.ndarray:
    """Embeds each utterance of ``feats`` (each ``(frames, n_mels)``); returns ``(n, dim)``.

    Utterances are grouped by length rung and run in fixed-size batches (the last one
    padded by repetition), so the number of compiled programs is the number of rungs.
    Utterances longer than ``max_frames`` are split into ``max_frames`` chunks whose
    embeddings are averaged, weighted by length (a tail shorter than ``min_frames`` is dropped); those shorter than ``min_frames`` are repeated to fit.
    ``embed`` should be jitted by the caller.
    """
    rungs = length_buckets(min_frames, max_frames)
    segments: dict[int, list[tuple[int, np.ndarray]]] = {}
    for i, f in enumerate(feats):
        n = f.shape[0]
        if n < min_frames:
            f, n = np.pad(f, ((0, min_frames - n), (0, 0)), mode="wrap"), min_frames
        for start in range(0, n, max_frames):
            seg = f[start : start + max_frames]
            if start and seg.shape[0] < min_frames:
                break  # a short tail adds little; padding it would weigh it like the rest
            rung = int(rungs[np.searchsorted(rungs, seg.shape[0], side="right") - 1])
            segments.setdefault(rung, []).append((i, seg[:rung]))

    sums: np.ndarray | None = None
    counts = np.zeros(len(feats))
    for rung, items in sorted(segments.items()):
        for lo in range(0, len(items), batch_size):
            chunk = items[lo : lo + batch_size]
            x = np.stack([seg for _, seg in chunk] + [chunk[-1][1]] * (batch_size - len(chunk)))
            emb = np.asarray(embed(variables, jnp.asarray(x, jnp.float32)))[: len(chunk)]
            if sums is None:
                sums = np.zeros((len(feats), emb.shape[-1]), np.float64)
            idx = np.array([i for i, _ in chunk])
            np.add.at(sums, idx, emb * rung)  # chunks of one utterance weigh by length
            np.add.at(counts, idx, rung)
    return (sums / counts[:, None]).astype(np.float32)


def cosine_scores(emb: np.ndarray, enroll: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Cosine similarity of rows ``enroll[t]`` and ``test[t]`` of ``emb``; ``(n_trials,)``."""
    e = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    return np.einsum("td,td->t", e[enroll], e[test])


def trial_indices(utts: Sequence[str], enroll: Sequence[str], test: Sequence[str]):
    """Row indices of each trial's enrollment and test utterance in ``utts``."""
    pos = {u: i for i, u in enumerate(utts)}
    return np.array([pos[u] for u in enroll]), np.array([pos[u] for u in test])


def pooled_stats(feats: Sequence[np.ndarray]) -> np.ndarray:
    """Mean and std over time of each utterance's features: ``(n, 2 * n_mels)``."""
    return np.stack([np.concatenate([f.mean(0), f.std(0)]) for f in feats])


def raw_feature_baseline(
    train_feats: Sequence[np.ndarray], test_feats: Sequence[np.ndarray]
) -> np.ndarray:
    """Untrained baseline embeddings: pooled log-mel statistics, standardised per dimension
    with training-set statistics (so loud, high-variance dims do not swamp the cosine)."""
    train = pooled_stats(train_feats)
    mu, sd = train.mean(0), train.std(0) + 1e-8
    return (pooled_stats(test_feats) - mu) / sd


def encoder_variables(state, quantizer=None) -> dict:
    """Inference variables of a train state; quantized weights when a quantizer is given."""
    params = state.params["encoder"]
    if quantizer is not None:
        params = quantizer.apply(params, state.qstate)
    return {"params": params, "batch_stats": state.batch_stats}


def score_split(
    embed: EmbedFn, variables, split, *, batch_size: int, max_frames: int
) -> np.ndarray:
    """Cosine scores of ``split.trials`` (a ``prepare.Split``) under ``variables``."""
    emb = extract_embeddings(
        embed, variables, split.feats, batch_size=batch_size, max_frames=max_frames
    )
    enroll, test = trial_indices(split.corpus.utts, split.trials.enroll, split.trials.test)
    return cosine_scores(emb, enroll, test)


def evaluate_run(
    config, workdir, *, state, quantizer=None, split=None, train_split=None, tag: str = "test"
) -> dict:
    """Scores the test trials with a run's model; writes ``scores_<tag>.npz`` and
    ``metrics_<tag>.json`` to ``workdir``, logs and returns the metrics.

    When ``config.eval.baseline`` is set, the raw-feature baseline's metrics on the same
    trials are added under ``baseline/`` (standardised with ``train_split``'s statistics).
    """
    from pathlib import Path

    from sqjax import metrics, prepare
    from sqjax.train import build_encoder, write_json

    workdir = Path(workdir)
    split = split or prepare.test_data(config)
    embed = jitted_embed(build_encoder(config))
    variables = encoder_variables(state, quantizer)
    scores = score_split(
        embed,
        variables,
        split,
        batch_size=config.eval.batch_size,
        max_frames=config.eval.max_frames,
    )
    labels = split.trials.labels
    result = metrics.verification_metrics(scores, labels)
    if config.eval.baseline:
        train = train_split or prepare.training_data(config)
        base = raw_feature_baseline(train.raw_feats, split.raw_feats)
        enroll, test = trial_indices(split.corpus.utts, split.trials.enroll, split.trials.test)
        base_result = metrics.verification_metrics(cosine_scores(base, enroll, test), labels)
        result.update({f"baseline/{k}": v for k, v in base_result.items()})
    result = {k: float(v) for k, v in result.items()}
    result["step"] = int(state.step)
    if jax.process_index() == 0:
        tmp = workdir / f".scores_{tag}.tmp.npz"
        np.savez(tmp, scores=scores, labels=labels)
        tmp.replace(workdir / f"scores_{tag}.npz")
        write_json(workdir / f"metrics_{tag}.json", result)
    return result


@functools.lru_cache(maxsize=8)
def jitted_embed(encoder) -> EmbedFn:
    """``jit(encoder.apply)`` in inference mode, one per encoder (so compiles are reused)."""
    return jax.jit(lambda variables, x: encoder.apply(variables, x, train=False))
