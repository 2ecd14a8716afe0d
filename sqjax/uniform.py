"""Uniform integer-grid weight quantization, beside K-means, with the same Rules and shape.

The grids of the JAX quantization libraries (qwix, AQT): K = 2^b evenly spaced levels
per tensor, or per output channel (the last axis, ``Rule.per_channel``)::

    levels = scale * (arange(K) - zero)

- asymmetric (affine): ``zero`` is an integer in [0, K-1], so 0.0 is exactly a level;
- symmetric (mid-rise): ``zero = (K-1)/2``, levels +-s/2 at 1 bit, +-s/2 and +-3s/2 at 2
  bits; 0.0 is *not* a level, and no zero point is stored.

The levels are computed by that one float32 multiply (``arange(K) - zero`` is exact), so
NumPy (``sqjax.export.load_packed``) and JAX give bit-identical levels.

Scales: "minmax" spans the weights' range (asymmetric: the range widened to include 0,
s = (hi - lo)/(K-1), zero = round(-lo/s); symmetric: s = 2 max|w|/(K-1), so the outermost
levels are +-max|w|). "mse" searches the scale of least squared error per tensor/channel:
fractions of the min/max scale (zero point kept), all groups at once; the min/max scale
is a candidate, so it is never worse than min/max.

State: ``UniformState(codebooks, scales, zeros)``, each params-shaped with None for float
leaves. ``codebooks`` holds the levels ((K,) or (channels, K), ascending), so code that
reads ``state.codebooks`` or calls ``quantizer.apply`` treats both quantizers alike.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from sqjax import kmeans, quant

__all__ = [
    "SCALES",
    "UniformState",
    "grid_levels",
    "group_bits",
    "uniform_quantizer",
    "with_scales",
]

Params = Any
SCALES = ("minmax", "mse")
_F32 = jnp.float32
# Scale of an all-zero group: any s > 0 gives it zero error (asymmetric) or +-s/2, and
# all K levels of 2^-64 * (i - zero) stay normal float32 numbers.
_EMPTY_SCALE = 2.0**-64
# MSE search: scale fractions 2^-12..1 of the min/max scale, 4 per octave, then a linear
# grid between the best one's neighbours (~1% steps; the error is flat near its minimum).
_COARSE = np.geomspace(2.0**-12, 1.0, 49).astype(np.float32)
_COARSE[-1] = 1.0  # the min/max scale itself, exactly
_FINE = 33


class UniformState(NamedTuple):
    """Quantizer state of ``uniform_quantizer``; each field params-shaped, None = float leaf.

    Attributes:
      codebooks: the levels, float32 (K,) per tensor or (channels, K) per channel, ascending.
      scales: float32 () or (channels,).
      zeros: float32 () or (channels,): an integer in [0, K-1] (asymmetric) or (K-1)/2
        (symmetric); ``codebooks == scales * (arange(K) - zeros)`` exactly.
    """

    codebooks: Params
    scales: Params
    zeros: Params


def grid_levels(scales: jax.Array, zeros: jax.Array, k: int) -> jax.Array:
    """``scales * (arange(k) - zeros)``: (k,) for scalars, (channels, k) for (channels,)."""
    zeros = jnp.asarray(zeros, _F32)
    steps = jnp.arange(k, dtype=_F32).reshape((1,) * zeros.ndim + (k,))
    return jnp.asarray(scales, _F32)[..., None] * (steps - zeros[..., None])


def group_bits(symmetric: bool) -> int:
    """Bits a grid stores besides its indices: a float32 scale, and an 8-bit zero point
    when asymmetric (``quant.packed_bits(..., group_bits=)``)."""
    return 32 if symmetric else 40


def with_scales(state: UniformState, scales: Params) -> UniformState:
    """``state`` with new (e.g. trained) scales, its levels recomputed, zero points kept."""

    def levels(cb, s, z):
        return None if cb is None else grid_levels(s, z, cb.shape[-1])

    codebooks = jax.tree.map(levels, state.codebooks, scales, state.zeros, is_leaf=_is_none)
    return UniformState(codebooks, scales, state.zeros)


def _is_none(x) -> bool:
    return x is None


# ------------------------------------------------------------------------------ fitting


def _minmax(x: jax.Array, k: int, symmetric: bool) -> tuple[jax.Array, jax.Array]:
    """Min/max scales and zero points of the groups x (G, m): each (G,)."""
    if symmetric:
        s = 2 * jnp.max(jnp.abs(x), axis=1) / (k - 1)
        s = jnp.where(s > 0, s, _EMPTY_SCALE)
        return s, jnp.full(s.shape, (k - 1) / 2, _F32)
    # The range includes 0, so the zero point lands on the grid (as in PyTorch's observers).
    lo = jnp.minimum(jnp.min(x, axis=1), 0.0)
    hi = jnp.maximum(jnp.max(x, axis=1), 0.0)
    s = (hi - lo) / (k - 1)
    s = jnp.where(s > 0, s, _EMPTY_SCALE)
    return s, jnp.clip(jnp.round(-lo / s), 0, k - 1)


def _sq_errors(x: jax.Array, s: jax.Array, z: jax.Array, k: int) -> jax.Array:
    """Squared error of the groups x (G, m) on their grids (s, z each (G,)), per group.

    The nearest level is one of the two around x / s + z: the exact nearest-level error,
    with the levels computed as ``grid_levels`` computes them.
    """
    s, z = s[:, None], z[:, None]
    i = jnp.clip(jnp.floor(x / s + z), 0, k - 2)
    below, above = s * (i - z), s * (i + 1 - z)
    return jnp.sum(jnp.minimum((x - below) ** 2, (x - above) ** 2), axis=1)


@functools.partial(jax.jit, static_argnames=("symmetric", "scale"))
def _fit_groups(x: jax.Array, k: jax.Array, symmetric: bool, scale: str):
    """Scales and zero points (each (G,)) of the groups x (G, m); k is data, so one
    compilation serves every bit width."""
    x, k = x.astype(_F32), jnp.asarray(k, _F32)
    s0, z = _minmax(x, k, symmetric)
    if scale == "minmax":
        return s0, z
    # Shrinking the range about 0 keeps the zero point: round(-a lo / (a s0)) = z.
    coarse = jnp.asarray(_COARSE)
    errs = lax.map(lambda a: _sq_errors(x, a * s0, z, k), coarse)  # (A, G)
    groups = jnp.arange(x.shape[0])
    best = jnp.argmin(errs, axis=0)
    lo = coarse[jnp.maximum(best - 1, 0)]
    hi = coarse[jnp.minimum(best + 1, len(_COARSE) - 1)]
    t = jnp.linspace(0.0, 1.0, _FINE, dtype=_F32)[:, None]
    fine = lo[None, :] + t * (hi - lo)[None, :]  # (F, G)
    fine_errs = lax.map(lambda a: _sq_errors(x, a * s0, z, k), fine)
    # The coarse best (min/max included) comes first: refining can only lower the error.
    alphas = jnp.concatenate([coarse[best][None, :], fine])
    cand = jnp.concatenate([errs[best, groups][None, :], fine_errs])
    return alphas[jnp.argmin(cand, axis=0), groups] * s0, z


# --------------------------------------------------------------------- learned scale


def _lsq_qp(k: int, symmetric: bool) -> float:
    """LSQ's Q_P, the positive end of the grid in steps: K-1 (unsigned, asymmetric) or
    (K-1)/2 (symmetric mid-rise)."""
    return (k - 1) / 2 if symmetric else float(k - 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _lsq(w: jax.Array, s: jax.Array, z: jax.Array, k: int, qp: float) -> jax.Array:
    return quant._lookup(w, grid_levels(s, z, k))[0]


def _lsq_fwd(w, s, z, k, qp):
    q, idx = quant._lookup(w, grid_levels(s, z, k))
    return q, (w, s, z, idx)


def _lsq_bwd(k, qp, res, g):
    """Weights: straight through. Scale (Esser et al. 2020, in index units u = w/s + z):
    dq/ds = round(w/s) - w/s inside the grid, the clip bound -z or K-1-z outside, summed
    over the group and times LSQ's gradient scale 1/sqrt(N Q_P)."""
    w, s, z, idx = res
    c = int(np.size(s))
    w2 = w.astype(_F32).reshape(-1, c)
    s2, z2 = jnp.reshape(s, (1, c)), jnp.reshape(z, (1, c))
    v = w2 / s2
    u = v + z2
    inside = (idx.reshape(-1, c).astype(_F32) - z2) - v
    d = jnp.where(u <= 0, -z2, jnp.where(u >= k - 1, k - 1 - z2, inside))
    gs = jnp.sum(g.astype(_F32).reshape(-1, c) * d, axis=0) / np.sqrt(w2.shape[0] * qp)
    return g, gs.reshape(jnp.shape(s)).astype(s.dtype), jnp.zeros_like(z)


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


# ---------------------------------------------------------------------------- quantizer


def uniform_quantizer(
    rules: Sequence[quant.Rule],
    *,
    symmetric: bool = False,
    scale: str = "mse",
    learn_scale: bool = False,
) -> quant.Quantizer:
    """Uniform-grid quantization of the leaves selected by ``rules`` (first match wins).

    Args:
      rules: ``quant.Rule``s, as for ``kmeans_quantizer``; leaves matching none stay float.
      symmetric: a mid-rise grid symmetric about 0 (no zero point; 0 is not a level),
        else an affine grid with an integer zero point (0 is a level).
      scale: "minmax" (the grid spans the weights) or "mse" (the scale of least squared
        error, searched per tensor/channel; never worse than min/max). See the module
        docstring.
      learn_scale: train the scales (LSQ, Esser et al. 2020). ``apply`` then builds the
        levels from ``state.scales``, whose gradient is LSQ's: per weight round(w/s) - w/s
        inside the grid and the clip bound outside (in steps of s), summed over the
        group, times 1/sqrt(N Q_P) (N weights per group; Q_P = K-1, or (K-1)/2 when
        symmetric). ``init`` starts from the ``scale`` fit. Give the optimizer
        ``state.scales`` beside the weights and write them back with
        ``with_scales(state, scales)`` (which recomputes the levels). Without it the
        scales get no gradient.

    Returns:
      ``quant.Quantizer(init, apply, update, rules, plan)`` over ``UniformState``:
      - ``init(params)``: fits scales and zero points (eager; raises on NaN/inf weights).
      - ``apply(params, state)``: each quantized weight replaced by its nearest level
        (ties to the larger, as K-means); straight-through backward, the same as
        ``kmeans_quantizer``'s. Jitted, as ``kmeans_quantizer``'s.
      - ``update(params, state)``: scales and zero points refitted to the current
        weights; with ``learn_scale`` the learned scales are kept and only the zero points
        (asymmetric: from the current min/max) and levels recomputed. jit-able.
    """
    rules = tuple(rules)
    for r in rules:
        if not isinstance(r, quant.Rule):
            raise TypeError(f"rules must be Rule instances, got {r!r}")
    if scale not in SCALES:
        raise ValueError(f"uniform_quantizer: scale={scale!r}; use one of {SCALES}")
    symmetric = bool(symmetric)

    def fit(params, scales):
        leaves, treedef = jax.tree_util.tree_flatten(params)
        plans = quant.plan(params, rules)
        learned = None if scales is None else treedef.flatten_up_to(scales)
        cbs, ss, zs = ([None] * len(leaves) for _ in range(3))
        for i, p in enumerate(plans):
            if p.bits is None:
                continue
            kmeans.check_finite(leaves[i], f"parameter {p.path!r}")
            x = jnp.asarray(quant._groups(leaves[i], p.per_channel), _F32)
            k = 2**p.bits
            s, z = _fit_groups(x, k, symmetric, "minmax" if learned is not None else scale)
            if learned is not None:
                s = jnp.reshape(jnp.asarray(learned[i], _F32), (x.shape[0],))
            cb = grid_levels(s, z, k)
            cbs[i], ss[i], zs[i] = (cb, s, z) if p.per_channel else (cb[0], s[0], z[0])
        return UniformState(*(treedef.unflatten(t) for t in (cbs, ss, zs)))

    def init_fn(params: Params) -> UniformState:
        return fit(params, None)

    def update_fn(params: Params, state: UniformState) -> UniformState:
        return fit(params, state.scales if learn_scale else None)

    def apply_fn(params: Params, state: UniformState) -> Params:
        def q(cb, s, z, w):
            if cb is None:
                return w
            if learn_scale:
                k = cb.shape[-1]
                return _lsq(w, s, z, k, _lsq_qp(k, symmetric))
            return quant._ste(w, cb, False)

        return jax.tree.map(q, state.codebooks, state.scales, state.zeros, params, is_leaf=_is_none)

    return quant.Quantizer(
        init_fn, jax.jit(apply_fn), update_fn, rules, functools.partial(quant.plan, rules=rules)
    )
