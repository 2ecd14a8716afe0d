"""FP32 and quantization-aware training of speaker encoders, data parallel over a mesh.

The shape follows flax's imagenet example: small pure functions (``create_train_state``,
``train_step``) and one ``train_and_evaluate(config, workdir)`` that reads the config.
Parameters are replicated and the batch is sharded over the ``data`` axis of a device
mesh; the same code runs on one CPU, simulated CPU devices, GPUs and TPU hosts.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from sqjax import evaluate, models, prepare

if TYPE_CHECKING:
    from sqjax import quant
from sqjax.pipeline import CropSampler, prefetch

log = logging.getLogger("sqjax")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # {"encoder": ..., "head": ...}
    batch_stats: Any
    opt_state: Any
    qstate: Any  # quantizer state (codebooks) in QAT runs, else an empty tuple


def make_mesh(num_devices: int = 0) -> Mesh:
    """A 1-D ``data`` mesh over the first ``num_devices`` devices (0 = all)."""
    devices = jax.devices()
    if num_devices:
        if jax.process_count() > 1:
            raise ValueError("config.num_devices must be 0 (every device) in a multi-host run")
        if num_devices > len(devices):
            raise ValueError(f"num_devices={num_devices} but only {len(devices)} devices exist")
        devices = devices[:num_devices]
    return Mesh(np.array(devices), ("data",))


def build_encoder(config: ml_collections.ConfigDict) -> models.ResNet:
    """The encoder named by ``config.model`` (a preset plus overrides)."""
    m = config.model
    overrides = {"n_mels": m.n_mels, "embed_dim": m.embed_dim, "dtype": jnp.dtype(m.dtype)}
    if m.width:  # 0 = the preset's width
        overrides["width"] = m.width
    return models.build_encoder(m.name, **overrides)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """SGD with momentum or AdamW, warm-up then cosine decay, from ``config.train``."""
    t = config.train
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=t.learning_rate,
        warmup_steps=t.warmup_steps,
        decay_steps=max(t.num_steps, t.warmup_steps + 1),
        end_value=t.learning_rate * t.final_lr_ratio,
    )
    if t.optimizer == "sgd":
        opt = optax.chain(
            optax.add_decayed_weights(t.weight_decay),
            optax.sgd(schedule, momentum=t.momentum, nesterov=True),
        )
    elif t.optimizer == "adamw":
        opt = optax.adamw(schedule, weight_decay=t.weight_decay)
    else:
        raise ValueError(f"config.train.optimizer={t.optimizer!r}: use 'sgd' or 'adamw'")
    return optax.chain(optax.clip_by_global_norm(t.clip_norm), opt) if t.clip_norm else opt


def create_train_state(
    rng: jax.Array,
    encoder: models.ResNet,
    head: models.AAMSoftmax,
    tx: optax.GradientTransformation,
    n_frames: int,
) -> TrainState:
    """Fresh parameters for ``encoder`` and ``head`` and the optimizer state."""
    enc_rng, head_rng = jax.random.split(rng)
    x = jnp.zeros((2, n_frames, encoder.n_mels), jnp.float32)
    variables = encoder.init(enc_rng, x, train=False)
    emb = jnp.zeros((2, encoder.embed_dim), jnp.float32)
    head_params = head.init(head_rng, emb, jnp.zeros((2,), jnp.int32), 0.0)["params"]
    params = {"encoder": variables["params"], "head": head_params}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables["batch_stats"],
        opt_state=tx.init(params),
        qstate=(),
    )


def margin_at(step: jax.Array, margin: float, warmup_steps: int) -> jax.Array:
    """AAM margin, raised linearly from 0 over ``warmup_steps`` (training is unstable
    when a random network starts against the full margin)."""
    if warmup_steps <= 0:
        return jnp.asarray(margin, jnp.float32)
    return margin * jnp.clip(step.astype(jnp.float32) / warmup_steps, 0.0, 1.0)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    encoder: models.ResNet,
    head: models.AAMSoftmax,
    tx: optax.GradientTransformation,
    margin: float,
    margin_warmup_steps: int,
    quantizer=None,
    microbatches: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch ``{"feats": (B, T, F), "labels": (B,)}``.

    With a ``quantizer`` the encoder runs on quantized weights and the straight-through
    gradient updates the latent FP32 weights. ``microbatches > 1`` accumulates gradients
    over batch chunks: XLA:CPU computes conv weight gradients faster on small batches.
    Donate ``state`` when jitting; the step is pure.
    """
    m = margin_at(state.step, margin, margin_warmup_steps)

    def loss_fn(params, batch_stats, feats, labels):
        enc = params["encoder"]
        if quantizer is not None:
            enc = quantizer.apply(enc, state.qstate)
        emb, updates = encoder.apply(
            {"params": enc, "batch_stats": batch_stats}, feats, train=True, mutable=["batch_stats"]
        )
        loss, logits = head.apply({"params": params["head"]}, emb, labels, m)
        acc = jnp.mean(jnp.argmax(logits, -1) == labels)
        return loss, (updates["batch_stats"], acc)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    feats, labels = batch["feats"], batch["labels"]
    if microbatches == 1:
        (loss, (batch_stats, acc)), grads = grad_fn(state.params, state.batch_stats, feats, labels)
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
            (l, (bs, a)), g = grad_fn(state.params, state.batch_stats, *chunk)
            add = functools.partial(jax.tree.map, jnp.add)
            return (add(grads, g), add(stats, bs), loss + l, acc + a), None

        zeros = jax.tree.map(jnp.zeros_like, (state.params, state.batch_stats))
        carry = (*zeros, 0.0, 0.0)
        (grads, batch_stats, loss, acc), _ = jax.lax.scan(
            body, carry, (split(feats), split(labels))
        )
        grads, batch_stats = jax.tree.map(lambda x: x / microbatches, (grads, batch_stats))
        loss, acc = loss / microbatches, acc / microbatches

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    grad_norm = optax.tree_utils.tree_norm(grads)
    metrics = {"loss": loss, "accuracy": acc, "margin": m, "grad_norm": grad_norm}
    return new_state, metrics


def build_quantizer(config: ml_collections.ConfigDict, bits: int) -> quant.KMeansQuantizer:
    """The study's quantizer: every encoder kernel at ``bits``, minus keep-float rules."""
    from sqjax import quant

    q = config.quant
    rules = tuple(quant.Rule(p, bits=None) for p in q.keep_float) + (
        quant.Rule(r"kernel$", bits=bits, per_channel=q.per_channel),
    )
    return quant.kmeans_quantizer(rules, iters=q.iters, refresh_iters=q.refresh_iters)


def _checkpoint_manager(workdir: Path, config) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.train.keep_checkpoints, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(workdir.absolute() / "checkpoints", options=options)


def restore_state(
    workdir: Path, target: TrainState, config, step: int | None = None, sharding=None
) -> TrainState:
    """The checkpoint at ``step`` (latest by default) of ``workdir``, shaped like ``target``
    and placed with ``sharding`` (default: replicated over every device)."""
    if sharding is None:
        sharding = NamedSharding(make_mesh(), P())
    with _checkpoint_manager(Path(workdir), config) as mngr:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {Path(workdir) / 'checkpoints'}")
        return _restore(mngr, step, target, sharding)


def _restore(mngr: ocp.CheckpointManager, step: int, target: TrainState, sharding) -> TrainState:
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), target
    )
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def load_run_config(workdir: str | Path) -> ml_collections.ConfigDict:
    """The config a run in ``workdir`` was started with."""
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {workdir} a sqjax training workdir?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def _truncate_log(path: Path, step: int) -> None:
    """Drops log rows past ``step``: a resumed run redoes those steps and logs them again."""
    if path.exists():
        rows = [r for r in path.read_text().splitlines() if json.loads(r)["step"] <= step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(r + "\n" for r in rows))
        tmp.replace(path)


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(path)


# Settings that do not change the trained parameters: a run may resume with others.
_RESUME_FREE = {
    "progress",
    "num_devices",
    "distributed",
    "data.workers",
    "data.feature_cache",
    "data.synth_args.workers",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
}


def _check_resumable(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """A run resumes exactly only under the config it started with: refuse any other."""
    old = load_run_config(workdir).to_dict()
    new = json.loads(config.to_json())

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            elif f"{prefix}{k}" not in _RESUME_FREE and not prefix.startswith("eval."):
                yield f"{prefix}{k}", v

    old, new = dict(flat(old)), dict(flat(new))
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if changed:
        raise ValueError(
            f"{workdir} holds checkpoints of a run with another config (changed: "
            f"{', '.join(changed)}); use a new --workdir, or the run's own settings to resume"
        )


def _check_init_from(
    init_from: str, fp32: TrainState, state: TrainState, bits_of_init: int
) -> None:
    if bits_of_init:
        raise ValueError(
            f"config.quant.init_from={init_from} is a {bits_of_init}-bit QAT run: give an FP32 run"
        )
    want = jax.tree.map(jnp.shape, (state.params, state.batch_stats))
    got = jax.tree.map(jnp.shape, (fp32.params, fp32.batch_stats))
    if want != got:
        raise ValueError(
            f"config.quant.init_from={init_from}: its model or speaker count differs from this "
            "config's (parameter shapes differ); give the FP32 run of the same model and data"
        )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains (or resumes) the run in ``workdir``, then scores the test trials.

    Returns the test metrics (also written to ``workdir/metrics_test.json``). Multi-host
    runs call ``jax.distributed.initialize()`` first (the ``sqjax`` command does when
    ``config.distributed`` is set); only process 0 writes logs and results.
    """
    from tensorboardX import SummaryWriter

    t = config.train
    for key in ("checkpoint_every", "log_every", "num_steps"):
        if t[key] <= 0:
            raise ValueError(f"config.train.{key}={t[key]} must be positive")
    if config.quant.bits and config.quant.refresh_every <= 0:
        raise ValueError(
            f"config.quant.refresh_every={config.quant.refresh_every} must be positive"
        )
    paths = prepare.resolve_paths(config)
    if not (paths.test and paths.test_trials):
        raise ValueError("set config.data.test and config.data.test_trials (scored after training)")
    workdir = Path(workdir)
    is_main = jax.process_index() == 0
    data = prepare.training_data(config)
    config = ml_collections.ConfigDict(config.to_dict())  # the caller's config stays as it was
    config.head.num_classes = data.n_speakers
    mesh = make_mesh(config.num_devices)
    n_dev = mesh.devices.size
    if t.batch_size % (n_dev * t.microbatches):
        raise ValueError(
            f"config.train.batch_size={t.batch_size} must be divisible by the device count "
            f"({n_dev}) times config.train.microbatches ({t.microbatches})"
        )
    encoder = build_encoder(config)
    tx = make_optimizer(config)
    quantizer = build_quantizer(config, config.quant.bits) if config.quant.bits else None
    head = models.AAMSoftmax(num_classes=data.n_speakers, scale=config.head.scale)
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    state = create_train_state(jax.random.key(config.seed), encoder, head, tx, t.n_frames)
    with _checkpoint_manager(workdir, config) as mngr:
        start = mngr.latest_step()
        if start is not None:
            _check_resumable(workdir, config)
        elif is_main:
            write_json(workdir / "config.json", json.loads(config.to_json()))
        if quantizer is not None and start is None:
            if not config.quant.init_from:
                raise ValueError(
                    "config.quant.bits is set: give config.quant.init_from=<FP32 workdir>"
                )
            init_config, fp32, _ = restore_run(config.quant.init_from)
            _check_init_from(config.quant.init_from, fp32, state, init_config.quant.bits)
            state = state.replace(params=fp32.params, batch_stats=fp32.batch_stats)
            state = state.replace(qstate=quantizer.init(state.params["encoder"]))
        elif quantizer is not None:  # a restore template; the checkpoint holds the codebooks
            state = state.replace(qstate=quantizer.init(state.params["encoder"]))
        if start is not None:
            log.info("resuming %s from step %d", workdir, start)
            state = _restore(mngr, start, state, replicated)
        start = start or 0
        state = jax.device_put(state, replicated)

        step_fn = jax.jit(
            functools.partial(
                train_step,
                encoder=encoder,
                head=head,
                tx=tx,
                margin=config.head.margin,
                margin_warmup_steps=config.head.margin_warmup_steps,
                quantizer=quantizer,
                microbatches=t.microbatches,
            ),
            in_shardings=(replicated, batch_sharding),
            out_shardings=(replicated, replicated),
            donate_argnums=0,
        )
        if quantizer is not None:
            update = jax.jit(
                quantizer.update,
                in_shardings=replicated,
                out_shardings=replicated,
                donate_argnums=1,
            )

            def refresh(state):
                return state.replace(qstate=update(state.params["encoder"], state.qstate))

        sampler = CropSampler(data.feats, data.labels, t.n_frames, config.seed)
        log_path = workdir / "metrics.jsonl"
        if is_main:
            _truncate_log(log_path, start)
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
        for step, batch in enumerate(
            prefetch(sampler, start, t.num_steps, t.batch_size, batch_sharding), start=start
        ):
            if quantizer is not None and step % config.quant.refresh_every == 0 and step > 0:
                state = refresh(state)
            state, metrics = step_fn(state, batch)
            pending.append(metrics)
            done = step + 1
            if done % t.log_every == 0 or done == t.num_steps:
                host = jax.device_get(pending)
                rate = len(pending) * t.batch_size / (time.perf_counter() - tic)
                row = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
                row.update(step=done, examples_per_s=rate)
                if is_main:
                    with log_path.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    for k, v in row.items():
                        if k != "step":
                            writer.add_scalar(f"train/{k}", v, done)
                bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.2f}")
                bar.update(len(pending) * t.batch_size)
                pending, tic = [], time.perf_counter()
            elif done % 8 == 0:
                # Never queue many steps: sharded steps on simulated CPU devices deadlock
                # in XLA's collectives when ~40 are in flight.
                jax.block_until_ready(metrics)
            if done % t.checkpoint_every == 0 or done == t.num_steps:
                if quantizer is not None and done == t.num_steps:
                    state = refresh(state)  # the final codebooks match the final weights
                mngr.save(done, args=ocp.args.StandardSave(state))
        bar.close()
        if is_main:
            writer.close()
        mngr.wait_until_finished()

    return evaluate.evaluate_run(
        config, workdir, state=state, quantizer=quantizer, train_split=data
    )


def restore_run(workdir: str | Path, step: int | None = None, overrides: list[str] = ()):
    """``(config, state, quantizer)`` of a training run's checkpoint (latest by default).

    ``quantizer`` is None for FP32 runs; ``overrides`` are ``--config.key=value`` items.
    """
    from sqjax import config as config_lib

    config = load_run_config(workdir)
    config_lib.apply_overrides(config, list(overrides), source=Path(workdir) / "config.json")
    encoder = build_encoder(config)
    head = models.AAMSoftmax(num_classes=config.head.num_classes, scale=config.head.scale)
    state = create_train_state(
        jax.random.key(0), encoder, head, make_optimizer(config), config.train.n_frames
    )
    quantizer = None
    if config.quant.bits:
        quantizer = build_quantizer(config, config.quant.bits)
        state = state.replace(qstate=quantizer.init(state.params["encoder"]))
    return config, restore_state(workdir, state, config, step), quantizer


def evaluate_workdir(
    workdir: str | Path,
    *,
    data: str = "",
    trials: str = "",
    step: int | None = None,
    overrides: list[str] = (),
) -> dict:
    """Scores a trial list with the checkpoint of a training run (QAT runs quantized).

    Without ``data``/``trials`` it uses the run's own test set. Results go to
    ``workdir/metrics_<tag>.json`` with tag ``test`` or the trial file's stem.
    """
    config, state, quantizer = restore_run(workdir, step, overrides)
    tag = "test"
    if data or trials:
        if not (data and trials):
            raise ValueError("give both --data and --trials (or neither, for the run's test set)")
        config.data.test, config.data.test_trials, tag = data, trials, Path(trials).stem
        config.eval.baseline = False
    return evaluate.evaluate_run(config, workdir, state=state, quantizer=quantizer, tag=tag)
