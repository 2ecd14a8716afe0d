"""FP32 and quantization-aware training of speaker encoders, data parallel over a mesh.

The shape follows flax's imagenet example: small pure functions (``create_train_state``,
``train_step``) and one ``train(config, workdir, data)`` that reads the config; it returns
the final state and never evaluates (``sqjax.runs.train_and_evaluate`` does both).
What a config builds (encoder, head, optimizer, quantizer, state) is ``sqjax.builders``.
Parameters are replicated and the batch is sharded over the ``data`` axis of a device
mesh; the same code runs on one CPU, simulated CPU devices, GPUs and TPU hosts.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from sqjax import fileio, models, prepare
from sqjax import workdir as workdir_lib
from sqjax.builders import (
    TrainState,
    build_encoder,
    build_head,
    build_quantizer,
    create_train_state,
    learned_part,
    learns_quantizer,
    make_optimizer,
    with_codebooks,
    with_learned_part,
)
from sqjax.pipeline import CropSampler, WaveSampler, prefetch

log = logging.getLogger("sqjax")


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D ``data`` mesh over the first ``num_devices`` devices (0 = all), ordered by
    process: each process holds one contiguous range of a batch's rows."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    if num_devices:
        if jax.process_count() > 1:
            raise ValueError("config.num_devices must be 0 (every device) in a multi-host run")
        if num_devices > len(devices):
            raise ValueError(f"num_devices={num_devices} but only {len(devices)} devices exist")
        devices = devices[:num_devices]
    return Mesh(np.array(devices), ("data",))


def margin_at(step: jax.Array, margin: float, warmup_steps: int) -> jax.Array:
    """AAM margin, raised linearly from 0 over ``warmup_steps`` (training is unstable
    when a random network starts against the full margin)."""
    if warmup_steps <= 0:
        return jnp.asarray(margin, jnp.float32)
    return margin * jnp.clip(step.astype(jnp.float32) / warmup_steps, 0.0, 1.0)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    banks: Any = None,
    *,
    encoder: models.ResNet,
    head: models.AAMSoftmax,
    tx: optax.GradientTransformation,
    margin: float,
    margin_warmup_steps: int,
    quantizer=None,
    learn_quantizer: bool = False,
    microbatches: int = 1,
    featurize: Callable | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch ``{"feats": (B, T, F), "labels": (B,)}``,
    or ``{"wave": (B, samples), "labels": (B,)}`` with ``featurize(step, wave, banks)``
    computing features (and augmentation) on the device (``stream_input``).

    With a ``quantizer`` the encoder runs on quantized weights and the straight-through
    gradient updates the latent FP32 weights; with ``learn_quantizer`` the optimizer also
    trains the quantizer's learned values (its state then covers ``(params, learned)``,
    see ``learned_part``): K-means centroids or uniform-grid scales.
    ``microbatches > 1`` accumulates gradients over batch chunks: XLA:CPU computes conv
    weight gradients faster on small batches. Donate ``state`` when jitting; the step is
    pure.
    """
    m = margin_at(state.step, margin, margin_warmup_steps)
    learn = quantizer is not None and learn_quantizer
    trainable = (state.params, learned_part(state.qstate)) if learn else state.params

    def unpack(trainable):  # -> (params, qstate)
        if not learn:
            return trainable, state.qstate
        return trainable[0], with_learned_part(state.qstate, trainable[1])

    def loss_fn(trainable, batch_stats, feats, labels):
        params, qstate = unpack(trainable)
        enc = params["encoder"]
        if quantizer is not None:
            enc = quantizer.apply(enc, qstate)
        emb, updates = encoder.apply(
            {"params": enc, "batch_stats": batch_stats}, feats, train=True, mutable=["batch_stats"]
        )
        loss, logits = head.apply({"params": params["head"]}, emb, labels, m)
        acc = jnp.mean(jnp.argmax(logits, -1) == labels)
        return loss, (updates["batch_stats"], acc)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    labels = batch["labels"]
    if "wave" in batch:
        if featurize is None:
            raise ValueError("train_step: a batch of waves needs featurize=")
        feats = featurize(state.step, batch["wave"], banks)
    else:
        feats = batch["feats"]
    if microbatches == 1:
        (loss, (batch_stats, acc)), grads = grad_fn(trainable, state.batch_stats, feats, labels)
    else:
        # Chunk c holds examples c, c+m, c+2m, ...: every device keeps an equal share of
        # each chunk, so the split needs no communication.
        def split(x):
            x = x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:])
            return jnp.swapaxes(x, 0, 1)

        # Every chunk starts from the same running statistics and their updates are
        # averaged: one BatchNorm momentum step per optimizer step, as without chunks.
        # Normalisation itself uses each chunk's statistics ("ghost" BatchNorm).
        def body(carry, chunk):
            grads, stats, loss, acc = carry
            (l, (bs, a)), g = grad_fn(trainable, state.batch_stats, *chunk)
            add = functools.partial(jax.tree.map, jnp.add)
            return (add(grads, g), add(stats, bs), loss + l, acc + a), None

        zeros = jax.tree.map(jnp.zeros_like, (trainable, state.batch_stats))
        carry = (*zeros, 0.0, 0.0)
        (grads, batch_stats, loss, acc), _ = jax.lax.scan(
            body, carry, (split(feats), split(labels))
        )
        grads, batch_stats = jax.tree.map(lambda x: x / microbatches, (grads, batch_stats))
        loss, acc = loss / microbatches, acc / microbatches

    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    params, qstate = unpack(optax.apply_updates(trainable, updates))
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        qstate=qstate,
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    grad_norm = optax.tree_utils.tree_norm(grads)
    metrics = {"loss": loss, "accuracy": acc, "margin": m, "grad_norm": grad_norm}
    return new_state, metrics


def stream_input(config: ml_collections.ConfigDict, n_frames: int) -> tuple[Callable, dict, int]:
    """``(featurize, banks, n_samples)`` of streamed training input (``data.input="stream"``).

    Crops are ``n_samples`` of audio, which ``featurize(step, wave, banks)`` turns into
    ``n_frames`` of mean-normalised features (``config.features.kind``: log-mel or Kaldi
    fbank, ``sqjax.jaxfeatures``) inside the jitted step, after augmenting them
    (``config.data.augment``): reverberation, then additive noise, each with its
    probability, drawn from a key of ``(seed, step)``. ``banks`` holds the noises and
    impulse responses: read from ``noise_dir`` / ``rir_dir`` (MUSAN / RIRS_NOISES-style
    folders) or synthetic ones when those are empty.
    """
    from sqjax import augment, features, jaxfeatures
    from sqjax.config import ConfigError

    d, a, kind = config.data, config.data.augment, config.features.kind
    extract = {"logmel": jaxfeatures.logmel, "kaldi": jaxfeatures.kaldi_fbank}.get(kind)
    if extract is None:
        raise ConfigError(f"config.features.kind={kind!r}: use 'logmel' or 'kaldi'")
    for key in ("p_noise", "p_reverb"):
        if not 0.0 <= a[key] <= 1.0:
            raise ConfigError(f"config.data.augment.{key}={a[key]} must be within [0, 1]")
    for key in ("noise_seconds", "rir_seconds"):
        if a[key] <= 0:
            raise ConfigError(f"config.data.augment.{key}={a[key]} must be positive")
    if len(a.snr_db) != 2 or a.snr_db[0] > a.snr_db[1]:
        raise ConfigError(
            f"config.data.augment.snr_db={tuple(a.snr_db)}: give (low, high) in dB, low <= high"
        )
    sr = d.sample_rate
    n_samples = jaxfeatures.frames_to_samples(n_frames, sample_rate=sr)
    if kind == "kaldi":  # Kaldi frames span the window, not the FFT size
        n_fft, win, _ = features._frame_params(sr, 25.0, 10.0)
        n_samples -= n_fft - win
    banks = {}
    if a.p_noise > 0:
        n = round(a.noise_seconds * sr)
        banks["noises"] = (
            augment.load_bank(a.noise_dir, sample_rate=sr, samples=n, max_files=a.max_files)
            if a.noise_dir
            else augment.synthetic_noises(a.n_synthetic, n, sr, seed=config.seed)
        )
    if a.p_reverb > 0:
        n = round(a.rir_seconds * sr)
        banks["rirs"] = (
            augment.load_bank(
                a.rir_dir, sample_rate=sr, samples=n, max_files=a.max_files, fill="zeros"
            )
            if a.rir_dir
            else augment.synthetic_rirs(a.n_synthetic, n, sr, seed=config.seed)
        )
    p_noise, p_reverb, snr_db = a.p_noise, a.p_reverb, tuple(a.snr_db)
    seed, n_mels = config.seed, config.model.n_mels

    def featurize(step, wave, banks):
        if banks:
            key = jax.random.fold_in(jax.random.key(seed), step)
            wave = augment.augment(
                key,
                wave,
                banks.get("noises"),
                banks.get("rirs"),
                p_noise=p_noise,
                p_reverb=p_reverb,
                snr_db=snr_db,
            )
        return extract(wave, sample_rate=sr, n_mels=n_mels, mean_norm=True)

    return featurize, banks, n_samples


def _from_init(init: TrainState, state: TrainState) -> TrainState:
    """``state`` with the encoder (and BatchNorm statistics) of the FP32 run ``init``;
    its AAM head too when the speaker count matches, else ``state``'s fresh head (QAT
    on other data than the FP32 run's, e.g. of an imported model)."""
    shapes = lambda s: jax.tree.map(jnp.shape, (s.params["encoder"], s.batch_stats))
    if shapes(init) != shapes(state):
        raise ValueError(
            "config.quant.init_from: its model differs from this config's (encoder "
            "parameter shapes differ); give the FP32 run of the same config.model"
        )
    head = init.params["head"]
    if jax.tree.map(jnp.shape, head) != jax.tree.map(jnp.shape, state.params["head"]):
        log.info("config.quant.init_from: other speakers than its run's: a new AAM head")
        head = state.params["head"]
    params = {"encoder": init.params["encoder"], "head": head}
    return state.replace(params=params, batch_stats=init.batch_stats)


def train(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    data: prepare.Split,
    init: Callable[[], TrainState] | None = None,
) -> TrainState:
    """Trains (or resumes) the run in ``workdir`` on ``data``; returns the final state.

    QAT runs (``config.quant.bits``) start from ``init()``, a trained FP32 state (called
    only when the run starts afresh), and fit their codebooks to it. Codebooks are refreshed every ``quant.refresh_every`` steps
    *before* a step, never after the last one: the saved model is exactly the network
    whose BatchNorm statistics the last steps collected. Multi-host runs call
    ``jax.distributed.initialize()`` first; only process 0 writes logs.
    """
    from tensorboardX import SummaryWriter

    t, q = config.train, config.quant
    for key in ("checkpoint_every", "log_every", "num_steps", "batch_size", "n_frames"):
        if t[key] <= 0:
            raise ValueError(f"config.train.{key}={t[key]} must be positive")
    if t.microbatches <= 0:
        raise ValueError(f"config.train.microbatches={t.microbatches} must be positive")
    if q.bits and not 1 <= q.bits <= 8:
        raise ValueError(f"config.quant.bits={q.bits}: use 1..8 (QAT width) or 0 (FP32)")
    if q.bits and q.refresh_every <= 0:
        raise ValueError(f"config.quant.refresh_every={q.refresh_every} must be positive")
    workdir = fileio.as_path(workdir)
    is_main = jax.process_index() == 0
    mesh = make_mesh(config.num_devices)
    n_dev = mesh.devices.size
    if t.batch_size % (n_dev * t.microbatches):
        raise ValueError(
            f"config.train.batch_size={t.batch_size} must be divisible by the device count "
            f"({n_dev}) times config.train.microbatches ({t.microbatches}); on a CPU host "
            f"`sqjax --cpu-devices N` sets the device count"
        )
    encoder, head, tx = build_encoder(config), build_head(config), make_optimizer(config)
    quantizer = build_quantizer(config, q.bits) if q.bits else None
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    state = create_train_state(jax.random.key(config.seed), encoder, head, tx, t.n_frames)
    # One writer per run directory (process 0 holds the lock for all); taken before the
    # manager, which deletes the temporary folders of unfinished saves.
    writing = workdir_lib.lock(workdir) if is_main else contextlib.nullcontext()
    with writing, workdir_lib.checkpoint_manager(workdir, t.keep_checkpoints) as mngr:
        start = mngr.latest_step()
        if start is not None:
            workdir_lib.check_resumable(workdir, config)
        elif is_main:
            workdir_lib.write_json(workdir / "config.json", json.loads(config.to_json()))
        if quantizer is not None:
            if start is None:
                if init is None:
                    raise ValueError(
                        "config.quant.bits is set: give config.quant.init_from=<FP32 workdir>"
                    )
                state = _from_init(init(), state)
            # Fitted to the FP32 start, or a restore template for the checkpoint's codebooks.
            state = with_codebooks(state, quantizer, tx, learns_quantizer(config))
        if start is not None:  # the newest readable step; damaged later ones set aside
            start, state = workdir_lib.restore_newest(mngr, state, replicated, set_aside=True)
            log.info("resuming %s from step %d", workdir, start)
        start = start or 0
        state = jax.device_put(state, replicated)

        stream = config.data.input == "stream"
        if stream:
            featurize, banks, n_samples = stream_input(config, t.n_frames)
            sampler = WaveSampler(
                data.corpus.paths, data.labels, n_samples, config.data.sample_rate, config.seed
            )
        elif config.data.input == "cache":
            featurize, banks = None, {}
            sampler = CropSampler(data.feats, data.labels, t.n_frames, config.seed)
        else:
            raise ValueError(f"config.data.input={config.data.input!r}: use 'cache' or 'stream'")
        banks = jax.device_put(banks, replicated)
        step_fn = jax.jit(
            functools.partial(
                train_step,
                encoder=encoder,
                head=head,
                tx=tx,
                margin=config.head.margin,
                margin_warmup_steps=config.head.margin_warmup_steps,
                quantizer=quantizer,
                learn_quantizer=learns_quantizer(config),
                microbatches=t.microbatches,
                featurize=featurize,
            ),
            in_shardings=(replicated, batch_sharding, replicated),
            out_shardings=(replicated, replicated),
            donate_argnums=0,
            compiler_options=models.training_compiler_options(encoder) or None,
        )
        if quantizer is not None:
            update = jax.jit(
                quantizer.update,
                in_shardings=replicated,
                out_shardings=replicated,
                donate_argnums=1,
            )

        log_path = workdir / "metrics.jsonl"
        if is_main:
            workdir_lib.truncate_log(log_path, start)
            writer = SummaryWriter(str(workdir / "tensorboard"), purge_step=start or None)
        bar = tqdm(
            total=t.num_steps * t.batch_size,
            initial=start * t.batch_size,
            unit="ex",
            unit_scale=True,
            desc=f"train {workdir.name}",
            mininterval=2.0,
            disable=not (config.progress and is_main),
        )
        pending, tic = [], time.perf_counter()
        batches = prefetch(
            sampler,
            start,
            t.num_steps,
            t.batch_size,
            batch_sharding,
            workers=config.data.workers if stream else 0,
        )
        with contextlib.closing(batches):  # stops the input thread and workers on errors
            for step, batch in enumerate(batches, start=start):
                if quantizer is not None and step % q.refresh_every == 0 and step > 0:
                    state = state.replace(qstate=update(state.params["encoder"], state.qstate))
                state, metrics = step_fn(state, batch, banks)
                pending.append(metrics)
                if len(pending) > 2:
                    # At most two steps in flight: bounded device memory for queued inputs
                    # (and sharded steps on simulated CPU devices deadlock in XLA's
                    # collectives when ~40 are queued).
                    jax.block_until_ready(pending[-3])
                done = step + 1
                if done % t.log_every == 0 or done == t.num_steps:
                    host = jax.device_get(pending)
                    rate = len(pending) * t.batch_size / (time.perf_counter() - tic)
                    row = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
                    row.update(step=done, examples_per_s=rate)
                    if is_main:
                        workdir_lib.append_line(log_path, json.dumps(row))
                        for k, v in row.items():
                            if k != "step":
                                writer.add_scalar(f"train/{k}", v, done)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.2f}")
                    bar.update(len(pending) * t.batch_size)
                    pending, tic = [], time.perf_counter()
                if done % t.checkpoint_every == 0 or done == t.num_steps:
                    mngr.save(done, args=ocp.args.StandardSave(state))
        bar.close()
        if is_main:
            writer.close()
        mngr.wait_until_finished()
    return state


def reestimate_batch_stats(
    encoder: models.ResNet, variables: dict, batches: Iterable[jax.Array]
) -> Any:
    """BatchNorm statistics of ``encoder`` re-estimated on ``batches`` (forward only).

    Each layer's running mean and variance become the plain average, over the batches, of
    its batch mean and (biased) batch variance computed under ``variables["params"]`` --
    e.g. quantized weights, whose activations no longer match the FP32 statistics. Each
    batch is ``(B, frames, n_mels)``.
    """

    @jax.jit
    def batch_moments(params, x):
        # From zero running statistics one update leaves (1 - momentum) * batch moment.
        zeros = jax.tree.map(jnp.zeros_like, variables["batch_stats"])
        _, upd = encoder.apply(
            {"params": params, "batch_stats": zeros}, x, train=True, mutable=["batch_stats"]
        )
        return jax.tree.map(lambda u: u / (1.0 - models.BN_MOMENTUM), upd["batch_stats"])

    total, n = None, 0
    for x in batches:
        m = batch_moments(variables["params"], x)
        total = m if total is None else jax.tree.map(jnp.add, total, m)
        n += 1
    if not n:
        raise ValueError("reestimate_batch_stats: no batches given")
    return jax.tree.map(lambda t: t / n, total)
