"""K-means weight quantization as a transform on any params pytree.

The quantizer knows nothing about models: it maps a params pytree (Flax linen
``variables['params']``, a Flax NNX ``nnx.State``, or a plain nested dict of arrays) and a
small state (one codebook per quantized leaf) to a params pytree of the same structure.
Like optax, it is a NamedTuple of pure functions::

    quantizer = kmeans_quantizer(default_rules(bits=2))
    state = quantizer.init(params)           # fits codebooks (eager)
    qparams = quantizer.apply(params, state)  # nearest-centroid weights; STE gradients
    state = quantizer.update(params, state)  # warm-started Lloyd refresh (jit-able)

``sqjax.uniform.uniform_quantizer`` builds the same tuple for evenly spaced integer grids.

Which leaves are quantized is decided by ``Rule``s (as in qwix): regexes searched in the
leaf's *path*, first match wins, no match = float. A path joins the pytree keys with "/":
dict keys and sequence indices as they are, attribute names of dataclass-like nodes, and
the trailing ``.value`` of Flax NNX Variables dropped. So linen ``{'Conv_0': {'kernel':
...}}`` is "Conv_0/kernel", an NNX ``nnx.List`` of Linear layers gives "layers/0/kernel".

Kernel layout follows Flax: the output channel is the *last* axis (Conv HWIO, Dense
(in, out)); per-channel codebooks are one per index of that axis.

State: ``QuantizerState.codebooks`` has the structure of params, with a float32 (K,)
codebook (or (channels, K) per channel) for quantized leaves and ``None`` for float leaves.
None is an empty subtree, so the state is a valid pytree under jit/vmap/grad, stacks with
``jax.tree.map(jnp.stack, ...)`` and checkpoints with orbax (zero-size placeholder arrays
were tried: orbax refuses to save them).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sqjax import kmeans
from sqjax.tables import format_table

__all__ = [
    "Distortion",
    "KMeansQuantizer",
    "LeafPlan",
    "Quantizer",
    "QuantizerState",
    "Rule",
    "codebook_indices",
    "default_rules",
    "distortion_report",
    "format_plan",
    "kmeans_quantizer",
    "packed_bits",
    "path_parts",
    "path_str",
    "plan",
    "ptq_stack",
    "quantize_params",
    "stack_precisions",
]

Params = Any
RulesArg = Sequence["Rule"] | Callable[[int], Sequence["Rule"]] | None


# -------------------------------------------------------------------------------- rules


@dataclasses.dataclass(frozen=True)
class Rule:
    """Quantize leaves whose path matches ``pattern`` (``re.search``) at ``bits``.

    Attributes:
      pattern: regex searched in the "/"-joined parameter path, e.g. "encoder/.*/kernel$".
      bits: 1..8, or None to keep matching leaves in float.
      per_channel: one codebook per output channel (last axis) instead of per tensor.
      min_size: leaves with fewer elements stay float.
    """

    pattern: str
    bits: int | None = 2
    per_channel: bool = False
    min_size: int = 0

    def __post_init__(self):
        if self.bits is not None and (
            isinstance(self.bits, bool)
            or not isinstance(self.bits, (int, np.integer))
            or not 1 <= self.bits <= 8
        ):
            raise ValueError(
                f"Rule({self.pattern!r}): bits must be an int in 1..8, or None to keep the "
                f"matching leaves in float; got bits={self.bits!r}"
            )
        if not isinstance(self.min_size, (int, np.integer)) or self.min_size < 0:
            raise ValueError(
                f"Rule({self.pattern!r}): min_size must be an int >= 0, got {self.min_size!r}"
            )
        try:
            re.compile(self.pattern)
        except (re.error, TypeError) as e:
            raise ValueError(
                f"Rule pattern {self.pattern!r} is not a valid regular expression ({e}); "
                "write it as a raw string and escape literal characters (re.escape)"
            ) from None

    def matches(self, path: str) -> bool:
        return re.search(self.pattern, path) is not None


def default_rules(
    bits: int | None, *, per_channel: bool = False, min_size: int = 0
) -> tuple[Rule, ...]:
    """Every "kernel" leaf (conv and dense) at ``bits``; biases, scales, BatchNorm float.

    Compose to override: ``(Rule("head/", None), Rule("stem/", bits=8)) + default_rules(2)``
    keeps "head/..." in float and the stem at 8 bits (first match wins).
    """
    return (Rule(r"(^|/)kernel$", bits, per_channel, min_size),)


def _resolve_rules(bits: int | None, rules: RulesArg) -> tuple[Rule, ...]:
    if rules is None:
        if bits is None:
            raise ValueError("give bits (for default_rules(bits)) or rules")
        return default_rules(bits)
    if callable(rules):
        return tuple(rules(bits))
    if bits is not None:
        raise ValueError(
            "rules already fix the bit widths, so bits must be None; to vary bits, pass rules "
            "as a function of bits, e.g. lambda b: (Rule('head/', None),) + default_rules(b)"
        )
    return tuple(rules)


# -------------------------------------------------------------------------------- paths


def _key_str(k) -> str | None:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def path_parts(keypath) -> list[str | int]:
    """A ``tree_flatten_with_path`` key path as str/int entries (dict keys, sequence
    indices, attribute names), without the trailing "value" of an NNX Variable."""
    parts = []
    for k in keypath:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(k.key if isinstance(k.key, (str, int)) else str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(k.idx)
        else:
            parts.append(_key_str(k))
    if (
        len(keypath) > 1
        and isinstance(keypath[-1], jax.tree_util.GetAttrKey)
        and keypath[-1].name in ("value", "raw_value")
    ):
        parts.pop()
    return parts


def path_str(keypath) -> str:
    """ "/"-joined readable path of a ``tree_flatten_with_path`` key path."""
    return "/".join(str(p) for p in path_parts(keypath))


# --------------------------------------------------------------------------------- plan


class LeafPlan(NamedTuple):
    path: str
    shape: tuple[int, ...]
    dtype: str
    size: int
    rule: int | None  # index of the first matching rule, None if none matched
    bits: int | None  # None: stays float
    per_channel: bool

    @property
    def n_codebooks(self) -> int:
        return (self.shape[-1] if self.per_channel else 1) if self.bits is not None else 0


def packed_bits(
    size: int, bits: int | None, n_codebooks: int = 1, group_bits: int | None = None
) -> int:
    """Storage of one leaf: n*b index bits + ``group_bits`` per codebook; float leaves 32n.

    ``group_bits``: what each codebook (group of weights) stores besides the indices;
    None = K*32, a float32 codebook (K-means). A uniform grid stores its scale and zero
    point instead (``sqjax.uniform.group_bits``).
    """
    if bits is None:
        return 32 * size
    return size * bits + n_codebooks * ((2**bits) * 32 if group_bits is None else group_bits)


def plan(params: Params, rules: Sequence[Rule]) -> list[LeafPlan]:
    """Dry run: which rule and bit width each leaf gets, in flattening order."""
    out = []
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        path = path_str(keypath)
        shape = tuple(np.shape(leaf))
        dtype = np.dtype(leaf.dtype if hasattr(leaf, "dtype") else np.asarray(leaf).dtype)
        size = math.prod(shape)
        idx = next((i for i, r in enumerate(rules) if r.matches(path)), None)
        rule = rules[idx] if idx is not None else None
        quantize = (
            rule is not None
            and rule.bits is not None
            and size >= max(rule.min_size, 1)
            and jnp.issubdtype(dtype, jnp.floating)
        )
        if quantize and rule.per_channel and len(shape) < 2:
            raise ValueError(
                f"rule {idx} ({rule.pattern!r}) asks per-channel codebooks for {path!r} of shape "
                f"{shape}; per-channel needs a kernel with >= 2 axes (channels last). Add a rule "
                "without per_channel for it, before this one"
            )
        out.append(
            LeafPlan(
                path,
                shape,
                dtype.name,
                size,
                idx,
                rule.bits if quantize else None,
                bool(quantize and rule.per_channel),
            )
        )
    return out


def format_plan(leaf_plans: Sequence[LeafPlan]) -> str:
    """A readable table: per leaf its rule, bits, granularity and sizes; then totals."""
    rows = [("path", "shape", "size", "rule", "bits", "codebooks", "fp32 KiB", "packed KiB")]
    fp32 = packed = 0
    for p in leaf_plans:
        pb = packed_bits(p.size, p.bits, p.n_codebooks)
        fp32, packed = fp32 + 32 * p.size, packed + pb
        rows.append(
            (
                p.path,
                "x".join(map(str, p.shape)) or "scalar",
                f"{p.size:,}",
                "-" if p.rule is None else str(p.rule),
                "float" if p.bits is None else str(p.bits),
                str(p.n_codebooks) if p.bits else "-",
                f"{p.size * 4 / 1024:.1f}",
                f"{pb / 8192:.1f}",
            )
        )
    nq = sum(p.bits is not None for p in leaf_plans)
    rows.append(
        (
            f"total: {nq}/{len(leaf_plans)} leaves quantized",
            "",
            f"{sum(p.size for p in leaf_plans):,}",
            "",
            "",
            "",
            f"{fp32 / 8 / 1024:.1f}",
            f"{packed / 8192:.1f} ({fp32 / max(packed, 1):.1f}x)",
        )
    )
    return format_table(rows, rules=(1, len(rows) - 1))


# ---------------------------------------------------------------------- straight-through


def _lookup(w: jax.Array, cb: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Nearest-centroid values (w's dtype) and indices (w's shape); cb sorted, (K,) or (C, K)."""
    x = w.astype(jnp.float32)
    if cb.ndim == 1:
        idx = kmeans.assign(x, cb)
        return cb[idx].astype(w.dtype), idx
    x2 = x.reshape(-1, w.shape[-1])
    idx = jax.vmap(kmeans.assign, in_axes=(1, 0), out_axes=1)(x2, cb)
    q = jnp.take_along_axis(cb.T, idx, axis=0)
    return q.reshape(w.shape).astype(w.dtype), idx.reshape(w.shape)


def codebook_indices(w: jax.Array, codebook: jax.Array) -> jax.Array:
    """Index of each weight's nearest centroid: the assignment ``apply`` uses.

    Args:
      w: a weight leaf; per-channel codebooks are indexed by its last axis.
      codebook: (K,), or (channels, K) per channel; need not be sorted (learned centroids
        can cross), the indices point into it as given.

    Returns:
      int32 indices of w's shape, into the last axis of ``codebook``.
    """
    cb = jnp.asarray(codebook, jnp.float32)
    order = jnp.argsort(cb, axis=-1)
    idx = _lookup(jnp.asarray(w), jnp.take_along_axis(cb, order, axis=-1))[1]
    if cb.ndim == 1:
        return order[idx]
    c = cb.shape[0]
    return jnp.take_along_axis(order.T, idx.reshape(-1, c), axis=0).reshape(idx.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _ste(w: jax.Array, cb: jax.Array, learn: bool) -> jax.Array:
    return _lookup(w, cb)[0]


def _ste_fwd(w, cb, learn):
    q, idx = _lookup(w, cb)
    return q, (idx, cb)


def _ste_bwd(learn, res, g):
    idx, cb = res
    if not learn:
        return g, jnp.zeros_like(cb)
    # Deep Compression: a centroid's gradient is the sum of its members' gradients.
    g32 = g.astype(jnp.float32)
    if cb.ndim == 1:
        return g, jax.ops.segment_sum(g32.ravel(), idx.ravel(), num_segments=cb.shape[0])
    c, k = cb.shape
    flat = idx.reshape(-1, c) * c + jnp.arange(c)[None, :]
    gcb = jax.ops.segment_sum(g32.reshape(-1), flat.reshape(-1), num_segments=k * c)
    return g, gcb.reshape(k, c).T


_ste.defvjp(_ste_fwd, _ste_bwd)


def _quantize(w: jax.Array, cb: jax.Array, learn: bool) -> jax.Array:
    # Learned centroids may leave codebooks unsorted; assign needs them sorted, and the
    # sort's own gradient routes each centroid's gradient back to its slot.
    return _ste(w, jnp.sort(cb, axis=-1), learn)


# ---------------------------------------------------------------------------- quantizer


class QuantizerState(NamedTuple):
    """State of ``kmeans_quantizer``: one codebook per quantized leaf.

    Attributes:
      codebooks: params-shaped; a float32 ``(K,)`` codebook (``(channels, K)`` per channel)
        for each quantized leaf, None for a float leaf.
    """

    codebooks: Params  # params-shaped: (K,) / (channels, K) float32, or None (float leaf)


class Quantizer(NamedTuple):
    """A quantizer as pure functions (``kmeans_quantizer``, ``uniform.uniform_quantizer``);
    its state is a ``QuantizerState`` or a ``uniform.UniformState``."""

    init: Callable[[Params], Any]
    apply: Callable[[Params, Any], Params]
    update: Callable[[Params, Any], Any]
    rules: tuple[Rule, ...]
    plan: Callable[[Params], list[LeafPlan]]


KMeansQuantizer = Quantizer  # the name before uniform grids existed
"""Another name of ``Quantizer``, kept for code written before uniform grids existed."""


def _is_none(x) -> bool:
    return x is None


def _groups(w, per_channel: bool):
    """A leaf as k-means problems: (1, n), or (channels, n / channels) per channel."""
    traced = isinstance(w, jax.core.Tracer)
    xp = jnp if traced else np
    w = jax.lax.stop_gradient(w) if traced else np.asarray(w, np.float32)
    if per_channel:
        return xp.transpose(xp.reshape(w, (-1, w.shape[-1])))
    return xp.reshape(w, (1, -1))


def kmeans_quantizer(
    rules: Sequence[Rule],
    *,
    iters: int = 50,
    refresh_iters: int = 5,
    learn_centroids: bool = False,
    init: str = "dp",
) -> Quantizer:
    """K-means quantization of the leaves selected by ``rules`` (first match wins).

    Args:
      rules: ``Rule``s; leaves matching none stay float.
      iters: Lloyd steps when fitting codebooks in ``init``.
      refresh_iters: warm-started Lloyd steps per ``update``.
      learn_centroids: train the codebooks by gradient descent (Deep Compression, Han et
        al. 2016) instead of refitting them by Lloyd. The gradient of a loss L of
        ``apply(params, state)`` with respect to centroid j of a codebook is the sum of
        dL/dq over the quantized weights q assigned to j (per channel: over that channel's
        weights); the latent float weights still get the straight-through gradient dL/dq.
        Give the optimizer both, e.g. ``{"w": params, "cb": state.codebooks}``, and write
        the trained codebooks back with ``QuantizerState(codebooks)``. ``update`` then only
        re-seeds empty clusters (see below). Without it a codebook's gradient is zero.
      init: k-means initialisation for ``init`` (see ``sqjax.kmeans``).

    Returns:
      ``Quantizer(init, apply, update, rules, plan)``:
      - ``init(params) -> QuantizerState``: fits all codebooks in one batched k-means
        call; eager (raises on NaN/inf weights, naming the leaf).
      - ``apply(params, state) -> params``: quantized leaves replaced by their nearest
        centroid (forward; codebooks are sorted first, so learned ones may cross);
        straight-through backward: the cotangent of a quantized leaf is passed unchanged
        to the float leaf. Jitted: called eagerly it runs as one program (op by op, a
        per-channel lookup into 256-entry codebooks is hundreds of dispatches).
      - ``update(params, state) -> state``: codebooks refreshed from the current float
        weights by ``refresh_iters`` warm-started Lloyd steps; jit-able. A centroid that
        owns no weight is first moved into the data (``sqjax.kmeans``: to the weight
        farthest from its centroid in the cluster of largest squared error), so every
        centroid owns a weight where the leaf has enough distinct values. With
        ``learn_centroids`` there are no Lloyd steps: only that re-seeding, the other
        (learned) centroids keep their values, returned sorted ascending.
    """
    rules = tuple(rules)
    for r in rules:
        if not isinstance(r, Rule):
            raise TypeError(f"rules must be Rule instances, got {r!r}")

    def fit(params, codebooks, steps):
        leaves, treedef = jax.tree_util.tree_flatten(params)
        plans = plan(params, rules)
        todo = [i for i, p in enumerate(plans) if p.bits is not None]
        for i in todo:
            kmeans.check_finite(leaves[i], f"parameter {plans[i].path!r}")
        groups = [_groups(leaves[i], plans[i].per_channel) for i in todo]
        ks = [2 ** plans[i].bits for i in todo]
        warm = None
        if codebooks is not None:
            cbs = treedef.flatten_up_to(codebooks)
            warm = [jnp.reshape(cbs[i], (g.shape[0], -1)) for i, g in zip(todo, groups)]
        fitted = (
            kmeans.kmeans_1d_batch(
                groups,
                ks,
                iters=steps,
                init=init,
                init_centroids=warm,
            )
            if todo
            else []
        )
        out = [None] * len(leaves)
        for i, (c, _) in zip(todo, fitted):
            out[i] = c if plans[i].per_channel else c[0]
        return QuantizerState(treedef.unflatten(out))

    def init_fn(params: Params) -> QuantizerState:
        return fit(params, None, iters)

    def update_fn(params: Params, state: QuantizerState) -> QuantizerState:
        return fit(params, state.codebooks, 0 if learn_centroids else refresh_iters)

    def apply_fn(params: Params, state: QuantizerState) -> Params:
        def q(cb, w):
            return w if cb is None else _quantize(w, cb, learn_centroids)

        return jax.tree.map(q, state.codebooks, params, is_leaf=_is_none)

    rules_plan = functools.partial(plan, rules=rules)
    return Quantizer(init_fn, jax.jit(apply_fn), update_fn, rules, rules_plan)


# -------------------------------------------------------------------------- conveniences


def quantize_params(params: Params, bits: int | None = None, rules: RulesArg = None) -> Params:
    """One-shot post-training quantization (init + apply), eager.

    ``rules``: None (``default_rules(bits)``), a sequence of Rules (then ``bits`` must be
    None), or a function ``bits -> rules``.
    """
    quantizer = kmeans_quantizer(_resolve_rules(bits, rules))
    return quantizer.apply(params, quantizer.init(params))


def stack_precisions(params_list: Sequence[Params]) -> Params:
    """Stacks same-structure pytrees along a new leading (precision) axis, for jax.vmap."""
    structs = {str(jax.tree_util.tree_structure(p)) for p in params_list}
    if len(structs) != 1:
        raise ValueError("stack_precisions: all params must have the same tree structure")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *params_list)


def ptq_stack(
    params: Params, bits_list: Sequence[int | None] = (2, 4, 8, None), rules: RulesArg = None
) -> Params:
    """PTQ of one float model at each bit width (None = the float params), stacked.

    ``rules``: None (``default_rules``) or a function ``bits -> rules``.
    """
    if rules is not None and not callable(rules):
        raise ValueError(
            "ptq_stack needs rules as a function of bits, e.g. lambda b: default_rules(b)"
        )
    return stack_precisions(
        [params if b is None else quantize_params(params, b, rules) for b in bits_list]
    )


class Distortion(NamedTuple):
    rel_sq_error: float  # ||W - Q||^2 / ||W||^2
    sqnr_db: float  # 10 log10(||W||^2 / ||W - Q||^2); inf when Q == W


def distortion_report(
    params: Params, qparams: Params, state: QuantizerState | None = None
) -> dict[str, Distortion]:
    """Per-leaf weight distortion, path -> (rel_sq_error, sqnr_db).

    Leaves: the quantized ones when ``state`` is given, else those that differ.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    qleaves = treedef.flatten_up_to(qparams)
    cbs = treedef.flatten_up_to(state.codebooks) if state is not None else [0] * len(flat)
    out = {}
    for (keypath, w), q, cb in zip(flat, qleaves, cbs):
        w, q = np.asarray(w, np.float64), np.asarray(q, np.float64)
        if cb is None or (state is None and np.array_equal(w, q)):
            continue
        err, sig = float(np.sum((w - q) ** 2)), float(np.sum(w**2))
        rel = err / sig if sig > 0 else (0.0 if err == 0 else math.inf)
        out[path_str(keypath)] = Distortion(
            rel, math.inf if err == 0 else 10 * math.log10(sig / err) if sig > 0 else -math.inf
        )
    return out
