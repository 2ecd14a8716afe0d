"""ResNet speaker encoders (WeSpeaker/BUT geometry) and the AAM-softmax training head.

Layout: features (batch, frames, n_mels) become an NHWC image (batch, n_mels, frames, 1),
i.e. H = frequency and W = time, the same orientation as WeSpeaker's (B, 1, F, T), so a
PyTorch checkpoint maps onto these parameters by transposing kernels only.

Every layer has an explicit name, so parameter paths are stable and can be matched by regex:
``stem_conv/kernel``, ``stem_bn/scale``, ``layer2_0/conv1/kernel``,
``layer2_0/shortcut_conv/kernel``, ``embedding/kernel``, ``embedding/bias``.
"""

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from sqjax import cpu

# Explicit symmetric padding reproduces PyTorch's padding=1 also for stride 2 ('SAME' would
# pad (0, 1) there and shift the sampling grid by one pixel).
_PAD3 = ((1, 1), (1, 1))
# Added to the variance before the square root in statistics pooling: keeps the std and its
# gradient finite when a channel is constant over time (e.g. one frame after striding).
# Ours: the biased variance + 1e-5. WeSpeaker's TSTP: the unbiased variance (ddof 1) + 1e-7
# (``pool_ddof=1, pool_eps=1e-7``, set by ``sqjax.wespeaker`` for imported models).
POOL_EPS = 1e-5


BN_MOMENTUM = 0.9  # running average: new = BN_MOMENTUM * old + (1 - BN_MOMENTUM) * batch


def _bn(train: bool, name: str, dtype: Any) -> nn.BatchNorm:
    # PyTorch BatchNorm defaults (its momentum 0.1 is 0.9 here), as in WeSpeaker.
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def _conv(
    features: int, kernel: int, stride: int, name: str, dtype: Any, slice_: int = 0
) -> nn.Conv:
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=_PAD3 if kernel == 3 else "VALID",
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        conv_general_dilated=cpu.sliced_conv(slice_),
        name=name,
    )


# The XLA:CPU backend (sqjax.cpu) re-exported for the layers above models, which never
# import it themselves: conv_slice's AUTO_SLICE, the compiler options of inference and
# training programs.
AUTO_SLICE = cpu.AUTO_SLICE
inference_compiler_options = cpu.inference_compiler_options
jit_inference = cpu.jit_inference
conv_bn = cpu.conv_bn


def training_compiler_options(encoder: "ResNet", backend: str | None = None) -> dict[str, str]:
    """XLA options for the training step of ``encoder`` on ``backend`` (default: JAX's):
    ``sqjax.cpu.training_compiler_options`` of its ``conv_slice`` and ``dtype``."""
    return cpu.training_compiler_options(encoder.conv_slice, encoder.dtype, backend)


def _fused(module: nn.Module, train: bool) -> bool:
    """Whether ``module`` runs its inference forward pass by ``conv_bn``
    (``cpu.fused_inference``): not while initializing, nor while intermediates are
    captured (``capture_intermediates``: the layers' own outputs are asked for)."""
    return (
        not train
        and not module.is_initializing()
        and not module.is_mutable_collection("intermediates")
        and cpu.fused_inference(module.dtype)
    )


def _conv_bn_of(module: nn.Module, conv: str, bn: str) -> tuple[jax.Array, dict]:
    """The kernel of ``module``'s layer ``conv`` and the BatchNorm variables of ``bn``."""
    params, stats = module.variables["params"], module.variables["batch_stats"]
    return params[conv]["kernel"], {**params[bn], **stats[bn]}


class BasicBlock(nn.Module):
    """3x3-BN-ReLU-3x3-BN + shortcut, ReLU. Output channels: ``planes``."""

    planes: int
    stride: int = 1
    dtype: Any = jnp.float32
    conv_slice: int = 0
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if _fused(self, train):
            short = _fused_shortcut(self, x, self.planes)
            y = conv_bn(x, *_conv_bn_of(self, "conv1", "bn1"), self.stride)
            return conv_bn(y, *_conv_bn_of(self, "conv2", "bn2"), residual=short)
        d, c = self.dtype, self.conv_slice
        y = nn.relu(_bn(train, "bn1", d)(_conv(self.planes, 3, self.stride, "conv1", d, c)(x)))
        y = _bn(train, "bn2", d)(_conv(self.planes, 3, 1, "conv2", d, c)(y))
        return nn.relu(y + _shortcut(x, self.planes, self.stride, train, d, c))


class Bottleneck(nn.Module):
    """1x1-BN-ReLU-3x3(stride)-BN-ReLU-1x1(4x)-BN + shortcut, ReLU. Output: 4 * ``planes``."""

    planes: int
    stride: int = 1
    dtype: Any = jnp.float32
    conv_slice: int = 0
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        d, c, out = self.dtype, self.conv_slice, self.expansion * self.planes
        if _fused(self, train):
            short = _fused_shortcut(self, x, out)
            y = conv_bn(x, *_conv_bn_of(self, "conv1", "bn1"))
            y = conv_bn(y, *_conv_bn_of(self, "conv2", "bn2"), self.stride)
            return conv_bn(y, *_conv_bn_of(self, "conv3", "bn3"), residual=short)
        y = nn.relu(_bn(train, "bn1", d)(_conv(self.planes, 1, 1, "conv1", d, c)(x)))
        y = nn.relu(_bn(train, "bn2", d)(_conv(self.planes, 3, self.stride, "conv2", d, c)(y)))
        y = _bn(train, "bn3", d)(_conv(out, 1, 1, "conv3", d, c)(y))
        return nn.relu(y + _shortcut(x, out, self.stride, train, d, c))


def _shortcut(
    x: jax.Array, out: int, stride: int, train: bool, dtype: Any, slice_: int = 0
) -> jax.Array:
    """Identity, or 1x1 conv (stride s, no bias) + BN when the shape changes.

    Called inside a block's compact __call__, so the layers belong to that block.
    """
    if stride == 1 and x.shape[-1] == out:
        return x
    conv = _conv(out, 1, stride, "shortcut_conv", dtype, slice_)
    return _bn(train, "shortcut_bn", dtype)(conv(x))


def _fused_shortcut(block: nn.Module, x: jax.Array, out: int) -> jax.Array:
    """``_shortcut`` by ``conv_bn``: x, or its 1x1 strided convolution and BatchNorm."""
    if block.stride == 1 and x.shape[-1] == out:
        return x
    return conv_bn(x, *_conv_bn_of(block, "shortcut_conv", "shortcut_bn"), block.stride, relu=False)


_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNet(nn.Module):
    """ResNet speaker encoder: (batch, frames, n_mels) -> (batch, embed_dim) float32.

    Stem 3x3 conv (``width`` channels) + BN + ReLU; four stages of widths w, 2w, 4w, 8w
    (x4 for bottleneck blocks) with strides 1/2/2/2 on frequency and time; temporal
    statistics pooling (mean and std over time of the frequency x channel map); one Dense.
    ``dtype`` is the computation dtype of the convolutional trunk (params stay float32);
    pooling and the embedding layer always run in float32. The pooled std is
    ``sqrt(var + pool_eps)`` with the variance's ``pool_ddof`` (0: biased, 1: unbiased).
    """

    stage_sizes: Sequence[int]
    block: str = "basic"
    width: int = 32
    embed_dim: int = 256
    n_mels: int = 80
    dtype: Any = jnp.float32
    pool_ddof: int = 0
    pool_eps: float = POOL_EPS
    # > 0: kernel gradients over slices of this many examples; AUTO_SLICE (-1): sized per
    # layer (cpu.slice_examples); 0: the whole batch. See sqjax.cpu.sliced_conv.
    conv_slice: int = 0

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        if self.block not in _BLOCKS:
            raise ValueError(f"ResNet.block={self.block!r}; expected one of {list(_BLOCKS)}")
        if x.ndim != 3 or x.shape[-1] != self.n_mels:
            raise ValueError(
                f"ResNet expects (batch, frames, {self.n_mels}) features, "
                f"got shape {x.shape}; set n_mels to match the features"
            )
        x = _stem(self, x, self.width, train, self.dtype, self.conv_slice)
        for name, cls, planes, stride in _block_specs(self):
            x = cls(planes, stride, self.dtype, self.conv_slice, name=name)(x, train)
        return _head(self, x, self.embed_dim, self.pool_ddof, self.pool_eps)


def _block_specs(encoder: ResNet) -> list[tuple[str, type, int, int]]:
    """``(name, block class, planes, stride)`` of each residual block, in order."""
    cls = _BLOCKS[encoder.block]
    return [
        (f"layer{i + 1}_{j}", cls, encoder.width * 2**i, 2 if i > 0 and j == 0 else 1)
        for i, n_blocks in enumerate(encoder.stage_sizes)
        for j in range(n_blocks)
    ]


def _stem(
    module: nn.Module, x: jax.Array, width: int, train: bool, dtype: Any, slice_: int = 0
) -> jax.Array:
    """(B, T, F) features -> NHWC (B, F, T, 1) -> 3x3 conv + BN + ReLU (in ``module``'s scope)."""
    x = jnp.transpose(x, (0, 2, 1))[..., None].astype(dtype)
    if _fused(module, train):
        return conv_bn(x, *_conv_bn_of(module, "stem_conv", "stem_bn"))
    x = _conv(width, 3, 1, "stem_conv", dtype, slice_)(x)
    return nn.relu(_bn(train, "stem_bn", dtype)(x))


def _head(
    module: nn.Module, x: jax.Array, embed_dim: int, ddof: int = 0, eps: float = POOL_EPS
) -> jax.Array:
    """Temporal statistics pooling and the embedding layer (in ``module``'s scope)."""
    # (B, F', T', C) -> (B, T', C * F'), channel-major like WeSpeaker's flatten of (C, F').
    b, f, t, c = x.shape
    x = jnp.transpose(x, (0, 2, 3, 1)).reshape(b, t, c * f).astype(jnp.float32)
    mean = jnp.mean(x, axis=1)
    var = jnp.mean(jnp.square(x - mean[:, None, :]), axis=1) * (t / max(t - ddof, 1))
    std = jnp.sqrt(var + eps)
    stats = jnp.concatenate([mean, std], axis=-1)  # (B, 2 * C * F')
    return nn.Dense(embed_dim, dtype=jnp.float32, name="embedding")(stats)


def _unwrap(apply: Callable, name: str, variables, x: jax.Array) -> jax.Array:
    return apply({c: tree[name] for c, tree in variables.items() if name in tree}, x)


class _Part(nn.Module):
    """Runs ``fn(module, x)`` as a module, so the layers ``fn`` creates are this module's own."""

    fn: Callable[[nn.Module, jax.Array], jax.Array]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fn(self, x)


class Segment(NamedTuple):
    """One link of ``encoder_segments``: ``apply(variables, x)``, jitted, where
    ``variables`` holds only the subtrees of the top-level layer names ``keys``."""

    keys: tuple[str, ...]
    apply: Callable


@functools.lru_cache(maxsize=8)
def encoder_segments(encoder: "ResNet") -> tuple[Segment, ...]:
    """The inference forward pass of ``encoder`` as a chain: the stem, each residual
    block, the pooling head. Chained, the segments compute
    ``encoder.apply(variables, x, train=False)`` (to float rounding: each is its own
    program). Used to re-run only the part of the network after a changed layer."""

    def jitted(module, *args):
        return jit_inference(lambda v, x: module.apply(v, x, *args))

    d = encoder.dtype
    stem = _Part(functools.partial(_stem, width=encoder.width, train=False, dtype=d), dtype=d)
    head = _Part(
        functools.partial(
            _head, embed_dim=encoder.embed_dim, ddof=encoder.pool_ddof, eps=encoder.pool_eps
        )
    )
    by_block: dict = {}
    segs = [Segment(("stem_conv", "stem_bn"), jitted(stem))]
    for name, cls, planes, stride in _block_specs(encoder):
        if (cls, planes, stride) not in by_block:  # equal blocks share their compiles
            by_block[cls, planes, stride] = jitted(cls(planes, stride, d), False)
        segs.append(
            Segment((name,), functools.partial(_unwrap, by_block[cls, planes, stride], name))
        )
    segs.append(Segment(("embedding",), jitted(head)))
    return tuple(segs)


PRESETS: dict[str, dict] = {
    "resnet34": {"stage_sizes": (3, 4, 6, 3), "block": "basic"},
    "resnet36": {"stage_sizes": (3, 4, 7, 3), "block": "basic"},
    "resnet200": {"stage_sizes": (3, 24, 36, 3), "block": "bottleneck"},
    "resnet221": {"stage_sizes": (6, 16, 48, 3), "block": "bottleneck"},
    "resnet293": {"stage_sizes": (10, 20, 64, 3), "block": "bottleneck"},
    # WeSpeaker's other depths (for imported models).
    "resnet18": {"stage_sizes": (2, 2, 2, 2), "block": "basic"},
    "resnet50": {"stage_sizes": (3, 4, 6, 3), "block": "bottleneck"},
    "resnet101": {"stage_sizes": (3, 4, 23, 3), "block": "bottleneck"},
    "resnet152": {"stage_sizes": (3, 8, 36, 3), "block": "bottleneck"},
    # Small presets (ours) for CPU demos and tests.
    "resnet_demo": {"stage_sizes": (2, 2, 2, 2), "block": "basic", "width": 16},
    "resnet_tiny": {"stage_sizes": (1, 1, 1, 1), "block": "basic", "width": 4, "embed_dim": 32},
}
"""The encoders by name: blocks per stage, block kind, and overrides of ``ResNet``'s
defaults (``build_encoder(name, **overrides)`` builds one)."""


def build_encoder(name: str, **overrides: Any) -> ResNet:
    """Returns the preset encoder ``name`` with fields replaced by ``overrides``."""
    if name not in PRESETS:
        raise ValueError(f"unknown encoder preset {name!r}; choose one of {sorted(PRESETS)}")
    return ResNet(**{**PRESETS[name], **overrides})


def _abstract_init(module: nn.Module, n_frames: int, n_mels: int | None):
    n_mels = getattr(module, "n_mels", 80) if n_mels is None else n_mels
    x = jax.ShapeDtypeStruct((1, n_frames, n_mels), jnp.float32)
    # A fresh closure per call: eval_shape must trace (and run interceptors) every time.
    return jax.eval_shape(lambda x: module.init(jax.random.key(0), x), x)


def count_params(module: nn.Module, n_frames: int = 200, n_mels: int | None = None) -> int:
    """Number of trainable parameters ('params' collection, BN scale/bias included).

    Uses ``jax.eval_shape``, so no parameter memory is allocated. ``n_mels`` defaults to
    ``module.n_mels``; the count does not depend on ``n_frames``.
    """
    variables = _abstract_init(module, n_frames, n_mels)
    return sum(math.prod(p.shape) for p in jax.tree.leaves(variables["params"]))


def encoder_macs_by_layer(module: nn.Module, n_frames: int = 200) -> dict[str, int]:
    """Multiply-accumulates of each Conv / Dense layer for one utterance of ``n_frames``.

    Counted from the shapes seen in an abstract forward pass: a conv costs
    out_positions * kh * kw * in_channels / groups * out_channels, a dense layer
    in_features * out_features per output row. BN, ReLU, additions and pooling are not
    counted (they are O(activations), not O(activations x channels)).
    Returns {layer path, e.g. "layer2_0/conv1": MACs}.
    """
    macs: dict[str, int] = {}

    def record(next_fun, args, kwargs, context):
        y = next_fun(*args, **kwargs)
        mod = context.module
        if context.method_name == "__call__" and isinstance(mod, nn.Conv | nn.Dense):
            k = math.prod(mod.kernel_size) if isinstance(mod, nn.Conv) else 1
            groups = getattr(mod, "feature_group_count", 1)
            in_features = args[0].shape[-1]
            n = math.prod(y.shape[:-1]) * k * (in_features // groups) * mod.features
            macs["/".join(mod.scope.path)] = int(n)
        return y

    with nn.intercept_methods(record):
        _abstract_init(module, n_frames, None)
    return macs


def encoder_macs(module: nn.Module, n_frames: int = 200) -> int:
    """Total multiply-accumulates of one forward pass for one utterance of ``n_frames``."""
    return sum(encoder_macs_by_layer(module, n_frames).values())


class AAMSoftmax(nn.Module):
    """Additive angular margin softmax (ArcFace) head; not part of the deployed encoder.

    The target logit is s * cos(theta + m) while theta + m <= pi; beyond that
    (cos theta <= cos(pi - m)) it falls back to s * (cos theta - (1 - cos m)), which keeps
    the logit monotonic and continuous at the threshold (WeSpeaker's choice; insightface
    subtracts m * sin(m) instead, a small jump). ``easy_margin`` applies the margin only
    where cos theta > 0.
    """

    num_classes: int
    scale: float = 32.0
    easy_margin: bool = False

    @nn.compact
    def __call__(
        self, embeddings: jax.Array, labels: jax.Array, margin: jax.Array | float
    ) -> tuple[jax.Array, jax.Array]:
        """Args: embeddings (batch, embed_dim); labels (batch,) int; margin scalar (radians,
        may be traced so it can warm up). Returns (mean cross-entropy, logits (batch, classes)).
        """
        kernel = self.param(
            "kernel",
            nn.initializers.xavier_uniform(),
            (embeddings.shape[-1], self.num_classes),
            jnp.float32,
        )
        cosine = _l2_normalize(embeddings.astype(jnp.float32), 1) @ _l2_normalize(kernel, 0)
        cosine = jnp.clip(cosine, -1.0, 1.0)
        margin = jnp.asarray(margin, jnp.float32)
        # Floor keeps d sqrt / d cos finite at |cos| = 1 (else 0 * inf = NaN with m = 0).
        sine = jnp.sqrt(jnp.maximum(1.0 - jnp.square(cosine), 1e-12))
        phi = cosine * jnp.cos(margin) - sine * jnp.sin(margin)  # cos(theta + m)
        if self.easy_margin:
            phi = jnp.where(cosine > 0.0, phi, cosine)
        else:
            phi = jnp.where(
                cosine > jnp.cos(math.pi - margin), phi, cosine - (1.0 + jnp.cos(math.pi - margin))
            )
        target = jax.nn.one_hot(labels, self.num_classes, dtype=jnp.bool_)
        logits = self.scale * jnp.where(target, phi, cosine)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, logits


def _l2_normalize(x: jax.Array, axis: int) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis, keepdims=True), 1e-12))
