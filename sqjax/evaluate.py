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
from tqdm.auto import tqdm

from sqjax import models

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
    sharding: jax.sharding.NamedSharding | None = None,
    desc: str | None = None,
) -> np.ndarray:
    """Embeds each utterance of ``feats`` (each ``(frames, n_mels)``); returns ``(n, dim)``.
    ``desc``: a progress bar with that label (none by default).

    With a batch ``sharding`` (e.g. ``NamedSharding(mesh, P("data"))``) each batch is
    split over the mesh's devices and processes: every process builds only its rows,
    each segment is embedded once in the whole job, and the embeddings are gathered to
    every process (the batch is rounded up to a multiple of the device count). Without
    it, batches run where ``embed`` puts them.

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

    run = functools.partial(_run_batch, embed, variables)
    if sharding is not None:
        n_dev = sharding.mesh.devices.size
        batch_size = -(-batch_size // n_dev) * n_dev
        run = functools.partial(_run_sharded, embed, _replicated(variables, sharding), sharding)
    sums: np.ndarray | None = None
    counts = np.zeros(len(feats))
    total = sum(len(items) for items in segments.values())
    bar = tqdm(total=total, unit="seg", desc=desc, disable=desc is None, leave=False)
    for rung, items in sorted(segments.items()):
        for lo in range(0, len(items), batch_size):
            chunk = items[lo : lo + batch_size]
            x = [seg for _, seg in chunk] + [chunk[-1][1]] * (batch_size - len(chunk))
            emb = run(x)[: len(chunk)]
            if sums is None:
                sums = np.zeros((len(feats), emb.shape[-1]), np.float64)
            idx = np.array([i for i, _ in chunk])
            np.add.at(sums, idx, emb * rung)  # chunks of one utterance weigh by length
            np.add.at(counts, idx, rung)
            bar.update(len(chunk))
    bar.close()
    return (sums / counts[:, None]).astype(np.float32)


def _run_batch(embed: EmbedFn, variables, x: list[np.ndarray]) -> np.ndarray:
    return np.asarray(embed(variables, jnp.asarray(np.stack(x), jnp.float32)))


def _replicated(variables, sharding: jax.sharding.NamedSharding):
    """``variables`` replicated over ``sharding``'s mesh (as NumPy first unless they are
    already: arrays committed to one device cannot join a mesh-wide computation)."""
    replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())

    def put(v):
        if isinstance(v, jax.Array) and v.sharding.is_equivalent_to(replicated, v.ndim):
            return v
        return jax.device_put(np.asarray(v), replicated)

    return jax.tree.map(put, variables)


def _run_sharded(
    embed: EmbedFn, variables, sharding: jax.sharding.NamedSharding, x: list[np.ndarray]
) -> np.ndarray:
    """One global batch split over the mesh; this process supplies only its rows."""
    from sqjax.pipeline import process_rows

    lo, hi = process_rows(sharding, len(x))
    local = np.stack(x[lo:hi]).astype(np.float32)
    shape = (len(x), *local.shape[1:])
    emb = embed(variables, jax.make_array_from_process_local_data(sharding, local, shape))
    if jax.process_count() == 1:
        return np.asarray(emb)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(emb, tiled=True))


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
    embed: EmbedFn,
    variables,
    split,
    *,
    batch_size: int,
    max_frames: int,
    sharding: jax.sharding.NamedSharding | None = None,
) -> np.ndarray:
    """Cosine scores of ``split.trials`` (a ``prepare.Split``) under ``variables``
    (embeddings split over ``sharding``'s devices, see ``extract_embeddings``)."""
    emb = extract_embeddings(
        embed,
        variables,
        split.feats,
        batch_size=batch_size,
        max_frames=max_frames,
        sharding=sharding,
    )
    enroll, test = trial_indices(split.corpus.utts, split.trials.enroll, split.trials.test)
    return cosine_scores(emb, enroll, test)


@functools.lru_cache(maxsize=8)
def jitted_embed(encoder) -> EmbedFn:
    """``jit(encoder.apply)`` in inference mode, one per encoder (so compiles are reused),
    with ``models.inference_compiler_options``."""
    return models.jit_inference(lambda variables, x: encoder.apply(variables, x, train=False))


# ------------------------------------------------------------- all precisions in one pass

PRECISION_STRATEGIES = ("vmap", "unroll", "map", "loop")


def default_precision_strategy(backend: str | None = None) -> str:
    """The strategy ``precision_embed(strategy="auto")`` uses on ``backend`` (default: JAX's).

    CPU: "map". Measured on a 2-core CPU (bench/bench_precisions.py), the loop inside one
    program was as fast as any strategy or faster: 1.1-1.2x the Python loop of
    ``jitted_embed`` calls on the demo model, 1.0-1.06x on ResNet34. Its one execution
    gets fresh (page-faulted) activation buffers once instead of P times, while its memory
    and compile time stay those of one model. "unroll" was no faster (0.9-1.1x) and holds
    about P models' activations at once (XLA:CPU schedules the P copies side by side);
    "vmap" was 3-6x slower: a convolution whose input and kernel both carry the precision
    axis lowers to a grouped convolution (``feature_group_count = P``), which XLA:CPU runs
    far slower than P plain ones. Rerun with the inference compiler options (Eigen
    convolutions; ``models.inference_compiler_options``), one run: "map" 1.08x the loop
    on the demo model and 0.98x on ResNet34, "unroll" 1.02x / 0.95x, "vmap" 0.41x / 0.62x.
    GPU/TPU: "vmap", where grouped and batched convolutions are native kernels; that choice
    is ours and unmeasured.
    """
    backend = backend or jax.default_backend()
    return "map" if backend == "cpu" else "vmap"


def n_precisions(stacked_variables) -> int:
    """Length of the leading precision axis of a ``quant.stack_precisions`` pytree."""
    sizes = {leaf.shape[0] for leaf in jax.tree.leaves(stacked_variables)}
    if len(sizes) != 1:
        raise ValueError(
            f"stacked variables: leaves have leading axes {sorted(sizes)}; stack every model "
            "(params and batch_stats) with quant.stack_precisions"
        )
    return sizes.pop()


def _precision(stacked_variables, p: int):
    return jax.tree.map(lambda leaf: leaf[p], stacked_variables)


# One dispatch for all P slices: the loop strategy's only overhead besides its P calls.
_unstack = jax.jit(lambda v: [_precision(v, p) for p in range(n_precisions(v))])


def precision_embed(encoder, strategy: str = "auto") -> Callable[[object, jax.Array], jax.Array]:
    """Embeds one batch under every precision of a stacked model: ``fn(stacked, x)``.

    ``stacked`` is ``quant.stack_precisions([variables_0, ...])`` over whole inference
    variables (``{"params", "batch_stats"}``), so each precision keeps its own BatchNorm
    statistics; ``x`` is ``(batch, frames, n_mels)``; the result is ``(P, batch, dim)``,
    row ``p`` equal (to float rounding) to ``jitted_embed(encoder)(variables_p, x)``.

    Strategies (one jitted program each, except "loop"):
      "vmap":   ``jax.vmap`` of the model over the precision axis.
      "unroll": P copies of the model in one program, each on its slice of ``stacked``.
      "map":    ``jax.lax.map`` over the precision axis (a loop inside the program).
      "loop":   P calls of ``jitted_embed(encoder)``, the per-precision reference.
      "auto":   ``default_precision_strategy()`` for the current backend.
    Functions are cached per (encoder, strategy), so compiles are reused.

    Memory, besides the P stacked models: "map" and "loop" need one model's activations
    (and "map" one precision's params); "unroll" about P times that, "vmap" more (XLA temp
    buffers for the demo model, 64 x 300 frames, 5 precisions: 189, 188, 757 and 1176 MiB).
    Activations grow with batch x frames: lower ``batch_size`` if they do not fit.
    """
    if strategy == "auto":
        strategy = default_precision_strategy()
    if strategy not in PRECISION_STRATEGIES:
        raise ValueError(
            f"precision_embed: strategy={strategy!r}; choose one of "
            f"{['auto', *PRECISION_STRATEGIES]}"
        )
    return _precision_embed(encoder, strategy)


@functools.lru_cache(maxsize=16)
def _precision_embed(encoder, strategy: str) -> Callable[[object, jax.Array], jax.Array]:
    def apply(variables, x):
        return encoder.apply(variables, x, train=False)

    if strategy == "vmap":
        return models.jit_inference(jax.vmap(apply, in_axes=(0, None)))
    if strategy == "unroll":
        return models.jit_inference(
            lambda v, x: jnp.stack([apply(_precision(v, p), x) for p in range(n_precisions(v))])
        )
    if strategy == "map":
        return models.jit_inference(lambda v, x: jax.lax.map(lambda vp: apply(vp, x), v))
    single = jitted_embed(encoder)

    def loop(v, x):
        return jnp.stack([single(vp, x) for vp in _unstack(v)])

    return loop


def extract_embeddings_all(
    embed_all: Callable[[object, jax.Array], jax.Array],
    stacked_variables,
    feats: Sequence[np.ndarray],
    *,
    batch_size: int = 32,
    min_frames: int = 100,
    max_frames: int = 3000,
    desc: str | None = None,
) -> np.ndarray:
    """``extract_embeddings`` under every precision at once; returns ``(P, n, dim)``.

    ``embed_all`` is a ``precision_embed`` function. The P embeddings of a segment are
    concatenated into one ``(P * dim)`` row for ``extract_embeddings`` (its length-rung
    batching and length-weighted averaging act on each column alone), then split again;
    so slice ``p`` equals ``extract_embeddings(jitted_embed(encoder), variables_p, ...)``.
    """
    n_p = n_precisions(stacked_variables)

    def embed_flat(variables, x):
        emb = np.asarray(embed_all(variables, x))  # (P, batch, dim)
        return emb.transpose(1, 0, 2).reshape(emb.shape[1], -1)

    flat = extract_embeddings(
        embed_flat,
        stacked_variables,
        feats,
        batch_size=batch_size,
        min_frames=min_frames,
        max_frames=max_frames,
        desc=desc,
    )
    return flat.reshape(len(feats), n_p, -1).transpose(1, 0, 2)
