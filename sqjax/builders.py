"""What a run's config builds: the encoder, the training head, the optimizer, the
quantizer, and the train state its checkpoints restore into. Below the training loop, so
restoring, PTQ and evaluation of a run directory never import the loop."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from sqjax import models

if TYPE_CHECKING:
    from sqjax import quant


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # {"encoder": ..., "head": ...}
    batch_stats: Any
    opt_state: Any
    qstate: Any  # quantizer state (codebooks; uniform: also scales) in QAT runs, else ()


def build_encoder(config: ml_collections.ConfigDict) -> models.ResNet:
    """The encoder named by ``config.model`` (a preset plus overrides)."""
    m = config.model
    overrides = {"n_mels": m.n_mels, "embed_dim": m.embed_dim, "dtype": jnp.dtype(m.dtype)}
    overrides.update(pool_ddof=m.pool_ddof, pool_eps=m.pool_eps, conv_slice=conv_slice(config))
    if m.width:  # 0 = the preset's width
        overrides["width"] = m.width
    if m.stage_sizes:  # () = the preset's
        overrides["stage_sizes"] = tuple(m.stage_sizes)
    return models.build_encoder(m.name, **overrides)


def conv_slice(config: ml_collections.ConfigDict) -> int:
    """``config.train.conv_slice``, -1 resolved for the backend: on CPU, slices sized per
    layer (``models.AUTO_SLICE``, see ``sqjax.cpu.slice_examples``); elsewhere the whole batch
    (the slices are an XLA:CPU workaround, unmeasured there)."""
    s = config.train.conv_slice
    return s if s >= 0 else (models.AUTO_SLICE if jax.default_backend() == "cpu" else 0)


def build_head(config: ml_collections.ConfigDict) -> models.AAMSoftmax:
    """The AAM-softmax training head (``config.head.num_classes`` set from the data)."""
    return models.AAMSoftmax(num_classes=config.head.num_classes, scale=config.head.scale)


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
    """Fresh parameters for ``encoder`` and ``head`` and the optimizer state.

    One compiled program: run op by op, a ResNet's initialisation compiles some two
    hundred small programs (11-12 s cold on a 2-core CPU, tiny or demo preset; 5-6 s
    as one), and every process of a multi-host run but the first compiles them again,
    since only process 0 writes JAX's persistent cache.
    """
    return _init_state(rng, encoder, head, tx, n_frames)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _init_state(rng, encoder, head, tx, n_frames) -> TrainState:
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


def build_quantizer(config: ml_collections.ConfigDict, bits: int) -> quant.Quantizer:
    """The study's quantizer: every encoder kernel at ``bits``, minus keep-float rules;
    K-means or a uniform grid (``config.quant.method``)."""
    from sqjax import quant, uniform
    from sqjax.config import ConfigError

    q = config.quant
    rules = tuple(quant.Rule(p, bits=None) for p in q.keep_float) + (
        quant.Rule(r"kernel$", bits=bits, per_channel=q.per_channel),
    )
    # .get: runs written before the uniform grid existed have no such keys.
    method, learn_scale = q.get("method", "kmeans"), q.get("learn_scale", False)
    if method == "kmeans":
        if learn_scale:
            raise ConfigError(
                "config.quant.learn_scale=True needs config.quant.method='uniform' "
                "(K-means learns its centroids with config.quant.learn_centroids)"
            )
        return quant.kmeans_quantizer(
            rules, iters=q.iters, refresh_iters=q.refresh_iters, learn_centroids=q.learn_centroids
        )
    if method == "uniform":
        if q.learn_centroids:
            raise ConfigError(
                "config.quant.learn_centroids=True needs config.quant.method='kmeans' "
                "(a uniform grid learns its scales with config.quant.learn_scale)"
            )
        scale = q.get("scale", "mse")
        if scale not in uniform.SCALES:
            raise ConfigError(
                f"config.quant.scale={scale!r}: use one of {', '.join(map(repr, uniform.SCALES))}"
            )
        return uniform.uniform_quantizer(
            rules, symmetric=q.get("symmetric", False), scale=scale, learn_scale=learn_scale
        )
    raise ConfigError(f"config.quant.method={method!r}: use 'kmeans' or 'uniform'")


def learns_quantizer(config: ml_collections.ConfigDict) -> bool:
    """Whether QAT trains the quantizer's values too (K-means centroids or uniform scales)."""
    q = config.quant
    return bool(q.learn_centroids or q.get("learn_scale", False))


def learned_part(qstate):
    """What the optimizer trains of a quantizer state: a K-means state whole (its
    codebooks), of a uniform state its scales (the levels follow from them)."""
    from sqjax import uniform

    return qstate.scales if isinstance(qstate, uniform.UniformState) else qstate


def with_learned_part(qstate, learned):
    """``qstate`` with its trained part replaced (``learned_part``'s inverse)."""
    from sqjax import uniform

    if isinstance(qstate, uniform.UniformState):
        return uniform.with_scales(qstate, learned)
    return learned


def state_template(config: ml_collections.ConfigDict) -> tuple[TrainState, Any]:
    """``(state, quantizer)``: the shapes and dtypes (``jax.ShapeDtypeStruct`` leaves) of
    the checkpoints of a run with ``config`` (codebooks included for QAT runs), to restore
    into; nothing is computed (no initialisation, no K-means)."""
    encoder, head, tx = build_encoder(config), build_head(config), make_optimizer(config)
    quantizer = build_quantizer(config, config.quant.bits) if config.quant.bits else None

    def fresh(rng):
        state = create_train_state(rng, encoder, head, tx, config.train.n_frames)
        if quantizer is not None:
            state = with_codebooks(state, quantizer, tx, learns_quantizer(config))
        return state

    return jax.eval_shape(fresh, jax.random.key(0)), quantizer


def with_codebooks(state: TrainState, quantizer: quant.Quantizer, tx, learn: bool) -> TrainState:
    """``state`` with codebooks (uniform: grids) fitted to its encoder weights; when they
    are learned (``learned_part``), the optimizer state covers them too (fresh moments)."""
    state = state.replace(qstate=quantizer.init(state.params["encoder"]))
    if learn:
        state = state.replace(opt_state=tx.init((state.params, learned_part(state.qstate))))
    return state
