"""1-D K-means (Lloyd) for weight codebooks, in JAX.

Method. In one dimension the nearest-centroid partition of *sorted* data is a set of
contiguous ranges whose boundaries are the midpoints between consecutive sorted centroids.
So the data are sorted once, prefix sums of x and x^2 are computed once, and each Lloyd
step is a binary search of the K-1 midpoints plus K range sums: O(K log n) per step instead
of O(n K) for an argmin Lloyd.

Initialisation. Lloyd only finds a local optimum, and in 1-D with many centroids the local
optima are poor: from evenly spaced ("linear") centroids it ends ~5x above scikit-learn's
distortion at 8 bits on Laplacian weights, with dozens of empty clusters. The default
"dp" init solves the K-partition *exactly* by dynamic programming over 1023-2047 "atoms"
of the sorted data (single values for small tensors: n <= 512 at 1-6 bits, n <= 1024 at
8 bits), then Lloyd refines on the full data: measured 0-6% *below* the distortion of
``sklearn.cluster.KMeans(n_init=10)`` at 1-8 bits.

Batching. Many 1-D problems (all kernels of a network, or all output channels of a kernel
for per-channel codebooks) run in *one* compiled call: each is sorted on its own, the
sorted segments are concatenated, and the per-segment work is one ``lax.map`` over a
segment table (start, length, k). Codebooks are padded to a static size (16, 64, or a power of two)
with +inf entries that stay empty, so k is data, not a compile-time constant. Eager calls
sort on the host (NumPy's SIMD sort is ~70x faster than XLA:CPU's comparator sort on 1.5M
float32) and pad sizes to buckets; under ``jax.jit`` (codebook refresh during training) the
sort runs in XLA on order-preserving int32 keys (4-5x faster than a float sort on CPU).

Warm starts. Lloyd from given centroids (codebook refresh) first re-seeds centroids that
own no value, which a refresh otherwise keeps forever: each goes to the value farthest
from its centroid in the cluster of largest squared error (see ``_reseed``).

Numerics. Prefix sums over a million sorted weights reach ~n/2 * E|x|, where float32 keeps
~7 digits, so a small cluster's sum (a difference of two of them) would lose most of its
digits. The sums are kept blocked: float32 sums inside blocks of 256 values, and block
offsets as exact-plus-small parts (see ``_prefix``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["INITS", "assign", "check_finite", "kmeans_1d", "kmeans_1d_batch", "kmeans_1d_grouped"]

INITS = ("dp", "linear", "quantile", "kmeans++")
_F32 = jnp.float32
_BLOCK = 256  # prefix-sum block: float32 partial sums of <= 256 weights stay accurate
_ATOMS = 4096  # cap on DP atom edges (see _num_atoms)


# ------------------------------------------------------------------------------ helpers


def _is_traced(*xs) -> bool:
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(xs))


def _bucket(n: int, steps: int = 2) -> int:
    """Smallest size >= n among `steps` evenly spaced sizes per octave (min 256): one
    compilation serves many sizes, at most 1/steps of padding."""
    if n <= _BLOCK:
        return _BLOCK
    unit = (1 << (n - 1).bit_length()) // (2 * steps)
    return -(-n // unit) * unit


def _kpad(k: int) -> int:
    """Static codebook size: 16 (1-4 bits), 64 (5-6 bits), else a power of two."""
    return 16 if k <= 16 else 64 if k <= 64 else 1 << (k - 1).bit_length()


def _num_atoms(cap: int, kpad: int) -> int:
    """Atom edges for segments of <= cap values: a power of two >= 2 cap (then atoms are
    single values), capped at 8 per centroid (>= 1024). The DP costs O(k a log a); at 8
    bits 4096 instead of 2048 atoms took 2.2x longer for 0.3% lower distortion (Lloyd
    refines on the full data), and both end ~5% below scikit-learn's."""
    return min(_ATOMS, max(1024, 8 * kpad), 1 << (2 * cap - 1).bit_length())


def _float_key(x: jax.Array) -> jax.Array:
    """Order-preserving float32 <-> int32 bit map (its own inverse)."""
    i = lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)


def _sort_xla(x: jax.Array) -> jax.Array:
    """Sorts the last axis; int keys because XLA:CPU's float comparator sort is slow."""
    keys = lax.sort(_float_key(x))
    return lax.bitcast_convert_type(jnp.where(keys < 0, keys ^ jnp.int32(0x7FFFFFFF), keys), _F32)


class _Prefix(NamedTuple):
    """Prefix sums of v**power, stored as block offsets; within-block parts on demand."""

    blocks: jax.Array  # (nb, B) the data v, zero-padded (a reshape, no copy)
    power: int  # 1 or 2
    off_hi: jax.Array  # (nb + 1,) sum over all blocks before block q, as hi + mid + lo
    off_mid: jax.Array
    off_lo: jax.Array


def _split(t: jax.Array, nb: int) -> tuple[jax.Array, jax.Array]:
    """t = hi + rest where hi is a multiple of a power of two u and sum(|hi|/u) <= 2^23.

    Float32 adds such multiples exactly in any order, so cumsum(hi) has no rounding.
    """
    _, e = jnp.frexp(jnp.max(jnp.abs(t)))
    u = jnp.ldexp(jnp.float32(1), e - (23 - nb.bit_length()))
    hi = jnp.round(t / u) * u
    return hi, t - hi


def _prefix(v: jax.Array, power: int = 1) -> _Prefix:
    """Prefix sums of v**power (v (n,), n a multiple of B), exact enough for differences
    at any two positions. Only block totals are computed here: one pass over the data
    instead of materialising n partial sums (which cost more than the whole k-means)."""
    blocks = v.reshape(-1, _BLOCK)
    hi, rest = _split(jnp.sum(blocks**power, axis=1), blocks.shape[0])
    mid, lo = _split(rest, blocks.shape[0])
    zero = jnp.zeros((1,), _F32)
    cat = lambda a: jnp.concatenate([zero, jnp.cumsum(a)])
    return _Prefix(blocks, power, cat(hi), cat(mid), cat(lo))


def _prefix_at(p: _Prefix, pos: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sum(v[:pos]**power) as an unevaluated pair (big, small), for positions in [0, n]."""
    q, r = pos // _BLOCK, pos % _BLOCK
    part = p.blocks[jnp.minimum(q, p.blocks.shape[0] - 1)] ** p.power  # (..., B)
    lane = jnp.arange(_BLOCK).reshape((1,) * r.ndim + (_BLOCK,))
    part = jnp.where(lane < r[..., None], part, 0.0).sum(axis=-1)
    return p.off_hi[q], (p.off_mid[q] + p.off_lo[q]) + part


def _diff2(a, b):
    """a - b for (big, small) pairs: the big parts cancel first."""
    return (a[0] - b[0]) + (a[1] - b[1])


def _range_sums(p: _Prefix, edges: jax.Array) -> jax.Array:
    """Sums of v[edges[i]:edges[i+1]] for sorted edge positions (K+1,) -> (K,)."""
    hi, lo = _prefix_at(p, edges)
    return _diff2((hi[1:], lo[1:]), (hi[:-1], lo[:-1]))


def _midpoints(c: jax.Array) -> jax.Array:
    return 0.5 * (c[:-1] + c[1:])


def _search(xs, start, n, v, steps: int):
    """First position p in [start, start + n] with xs[p] >= v; xs[start:start+n] sorted."""

    def body(_, carry):
        lo, cnt = carry
        half = cnt // 2
        mid = lo + half
        go = (cnt > 0) & (xs[jnp.minimum(mid, xs.shape[0] - 1)] < v)
        return jnp.where(go, mid + 1, lo), jnp.where(go, cnt - half - 1, half)

    init = (jnp.broadcast_to(start, v.shape), jnp.broadcast_to(n, v.shape))
    return lax.fori_loop(0, steps, body, init)[0]


# ------------------------------------------------------------------- one segment, sorted


class _Seg(NamedTuple):
    """One 1-D problem: sorted xs[start:start+n], k centroids (padded to kpad with +inf)."""

    xs: jax.Array  # (T,) shared by all segments
    p1: _Prefix  # prefix sums of xs and xs^2, shared
    p2: _Prefix
    start: jax.Array  # int32 scalars
    n: jax.Array
    k: jax.Array
    steps: int  # binary-search steps for n <= cap

    def edges(self, c):  # cluster j is xs[e[j]:e[j+1]] (values at a midpoint go right)
        inner = _search(self.xs, self.start, self.n, _midpoints(c), self.steps)
        return jnp.concatenate([self.start[None], inner, (self.start + self.n)[None]])

    def at(self, pos):  # value at a segment position, clamped inside the segment
        return self.xs[jnp.clip(pos, self.start, self.start + self.n - 1)]


def _dp_init(s: _Seg, kpad: int, cap: int) -> jax.Array:
    """Globally optimal k-partition of the segment's atoms (dynamic programming).

    D_c(i) = min_j D_{c-1}(j) + SSE(atoms j..i-1). The optimal j is monotone in i (the
    SSE cost is Monge), so each layer c is divide and conquer: positions are solved coarse
    to fine (odd multiples of `step` for step = a/2, ..., 1), each searching only between
    the optima of its two solved neighbours; a level is one vectorised O(a) segment-min.
    Cost O(k a log a), independent of n.

    Atoms: half the edges split the data into equal counts (resolution where weights are
    dense), half into equal widths (resolution in the sparse tails, where high-bit
    codebooks put centroids on a few outliers; equal-count atoms alone end 4-20x worse at
    8 bits). With n <= a/2 the equal-count edges hit every position: atoms are values.
    """
    a = _num_atoms(cap, kpad)
    h, m, half = a // 2, a - 1, a // 2  # atom boundaries are positions 0..m
    by_count = s.start + jnp.round(jnp.linspace(0.0, s.n.astype(_F32), h + 1)).astype(jnp.int32)
    grid = jnp.linspace(s.at(s.start), s.at(s.start + s.n - 1), h + 1)[1:-1]
    by_width = _search(s.xs, s.start, s.n, grid, s.steps)
    edges = jnp.sort(jnp.concatenate([by_count, by_width]))
    h1, h2 = _prefix_at(s.p1, edges), _prefix_at(s.p2, edges)
    pos = jnp.arange(m + 1, dtype=jnp.int32)

    def sse(j, i):  # SSE of atoms j..i-1 around their mean
        cnt = (edges[i] - edges[j]).astype(_F32)
        s1 = _diff2((h1[0][i], h1[1][i]), (h1[0][j], h1[1][j]))
        s2 = _diff2((h2[0][i], h2[1][i]), (h2[0][j], h2[1][j]))
        return jnp.where(cnt > 0, jnp.maximum(s2 - s1 * s1 / jnp.maximum(cnt, 1.0), 0.0), 0.0)

    def level(li, carry):  # fixed shapes (`half` nodes, masked): levels share one body
        prev, d, opt = carry
        step = half >> li
        nodes = step + 2 * step * jnp.arange(half, dtype=jnp.int32)
        at = jnp.minimum(nodes, m)
        lo = opt[jnp.minimum(nodes - step, m)]
        hi = jnp.minimum(opt[jnp.minimum(nodes + step, m)], at)
        # j goes to the last node whose range starts at or before it; a range's end is
        # the next range's start, so each node also tries its own end.
        node = jnp.cumsum(jnp.zeros(m + 1, jnp.int32).at[lo].add(1)) - 1
        cj = jnp.concatenate([pos, hi])
        cn = jnp.concatenate([node, jnp.arange(half, dtype=jnp.int32)])
        ok = (cj >= lo[cn]) & (cj <= hi[cn])
        v = jnp.where(ok, prev[cj] + sse(cj, at[cn]), jnp.inf)
        vmin = jax.ops.segment_min(v, cn, num_segments=half)
        best = jax.ops.segment_min(jnp.where(v <= vmin[cn], cj, m + 1), cn, num_segments=half)
        at = jnp.where(nodes < m, nodes, m + 1)  # nodes past m: dropped
        return prev, d.at[at].set(vmin, mode="drop"), opt.at[at].set(best, mode="drop")

    def layer(c, carry):
        prev, opts = carry
        full = prev + sse(pos, jnp.full_like(pos, m))  # position m searches all j
        opt = jnp.zeros(m + 1, jnp.int32).at[m].set(jnp.argmin(full).astype(jnp.int32))
        d = jnp.zeros(m + 1, _F32).at[m].set(jnp.min(full))
        _, d, opt = lax.fori_loop(0, half.bit_length(), level, (prev, d, opt))
        return d, opts.at[c].set(opt.astype(opts.dtype))

    opts = jnp.zeros((kpad, m + 1), jnp.int16)  # back-pointers; m < 2^15
    _, opts = lax.fori_loop(1, s.k, layer, (sse(jnp.zeros_like(pos), pos), opts))
    ids = jnp.arange(kpad + 1)
    bounds = lax.fori_loop(  # backtrack; clusters past k are empty, at the end
        1,
        s.k,
        lambda t, b: b.at[s.k - t].set(opts[s.k - t][b[s.k - t + 1]].astype(jnp.int32)),
        jnp.where(ids >= s.k, m, 0).astype(jnp.int32),
    )
    e = edges[bounds]
    cnt = jnp.diff(e).astype(_F32)
    # Empty clusters (fewer distinct atoms than k) sit on their boundary value: sorted.
    c = jnp.where(cnt > 0, _range_sums(s.p1, e) / jnp.maximum(cnt, 1.0), s.at(e[:-1]))
    return jnp.where(ids[:-1] < s.k, c, jnp.inf)


def _init(s: _Seg, key, kpad: int, cap: int, init: str, xs_padded) -> jax.Array:
    """(kpad,) sorted initial centroids, +inf past k."""
    ids = jnp.arange(kpad)
    if init == "dp":
        # With no more values than centroids the optimum is a centroid on every value;
        # the DP's atom grid can miss a few of them (seen on a 128-weight 1x1 conv).
        every = jnp.where(ids < s.k, s.at(s.start + jnp.minimum(ids, s.n - 1)), jnp.inf)
        return jnp.where(s.n <= s.k, every, _dp_init(s, kpad, cap))
    if init == "linear":
        # Evenly spaced over [min, max] (Deep Compression's choice): better than quantile
        # init on heavy-tailed weights, which starves the tails, but Lloyd from it stalls
        # in poor local optima at 6-8 bits; see the module docstring.
        lo, hi = s.at(s.start), s.at(s.start + s.n - 1)
        c = lo + (hi - lo) * ids.astype(_F32) / jnp.maximum(s.k - 1, 1).astype(_F32)
    elif init == "quantile":
        q = (ids.astype(_F32) + 0.5) * s.n.astype(_F32) / s.k.astype(_F32)
        c = s.at(s.start + q.astype(jnp.int32))
    else:  # kmeans++ (D^2 sampling) on a cap-sized window, O(n k): for comparison only
        win = lax.dynamic_slice(xs_padded, (s.start,), (cap,))
        valid = jnp.arange(cap) < s.n
        key, sub = jax.random.split(key)
        first = win[jax.random.randint(sub, (), 0, s.n)]

        def body(j, carry):
            c, d2, key = carry
            key, sub = jax.random.split(key)
            cdf = jnp.cumsum(d2)
            i = jnp.searchsorted(cdf, jax.random.uniform(sub) * cdf[-1], side="right")
            cj = win[jnp.minimum(i, s.n - 1)]  # all D^2 zero (k > distinct): a duplicate
            return c.at[j].set(cj), jnp.minimum(d2, jnp.where(valid, (win - cj) ** 2, 0.0)), key

        d2 = jnp.where(valid, (win - first) ** 2, 0.0)
        c, _, _ = lax.fori_loop(1, s.k, body, (jnp.full((kpad,), first), d2, key))
    return jnp.sort(jnp.where(ids < s.k, c, jnp.inf))


def _reseed(s: _Seg, c, e):
    """Moves centroids that own no value into the data; (c, its edges) -> the same.

    One dead centroid per round goes to the value farthest from its centroid in the
    cluster of largest squared error around that centroid (scikit-learn relocates empty
    clusters to the points farthest from their centres; restricting that to the worst
    cluster spreads several dead centroids over several clusters). The new centroid owns
    at least that value, the others keep their values, and the distortion falls every
    round. Rounds stop when no cluster is empty or none holds two distinct values (fewer
    distinct values than k); at most k rounds.
    """
    live = jnp.arange(c.shape[0]) < s.k

    def masks(e):
        cnt = jnp.diff(e)
        first, last = s.at(e[:-1]), s.at(e[1:] - 1)
        return live & (cnt == 0), live & (cnt > 0) & (first < last), cnt, first, last

    def cond(st):
        i, _, e = st
        empty, split, *_ = masks(e)
        return (i < s.k) & jnp.any(empty) & jnp.any(split)

    def body(st):
        i, c, e = st
        empty, split, cnt, first, last = masks(e)
        cnt = jnp.maximum(cnt, 1).astype(_F32)
        s1, s2 = _range_sums(s.p1, e), _range_sums(s.p2, e)
        mean, cj = s1 / cnt, jnp.where(split, c, 0.0)  # 0, not inf, where masked
        sse = jnp.maximum(s2 - s1 * mean, 0.0) + cnt * (mean - cj) ** 2
        j = jnp.argmax(jnp.where(split, sse, -1.0))
        far = jnp.where(c[j] - first[j] > last[j] - c[j], first[j], last[j])
        c = jnp.sort(c.at[jnp.argmax(empty)].set(far))
        return i + 1, c, s.edges(c)

    _, c, e = lax.while_loop(cond, body, (jnp.int32(0), c, e))
    return c, e


def _lloyd(s: _Seg, c, iters, tol, reseed: bool = False):
    """Lloyd from sorted c (kpad,); returns (centroids, cluster edges (kpad + 1,)).

    With ``reseed``, empty clusters are re-seeded (``_reseed``) before every step and
    before returning, so the returned centroids each own a value where the data allow.
    """
    nf = s.n.astype(_F32)
    edges = (lambda c: _reseed(s, c, s.edges(c))) if reseed else (lambda c: (c, s.edges(c)))

    def step(c):
        c, e = edges(c)
        cnt = jnp.diff(e).astype(_F32)
        s1, s2 = _range_sums(s.p1, e), _range_sums(s.p2, e)
        full = cnt > 0
        safe = jnp.where(full, cnt, 1.0)
        # A mean lies between its range's first and last value; clipping to them removes
        # rounding that could unsort centroids or make a constant cluster inexact.
        mean = jnp.clip(s1 / safe, s.at(e[:-1]), s.at(e[1:] - 1))
        c_new = jnp.where(full, mean, c)  # empty clusters keep their centroid: still sorted
        sse = jnp.where(full, jnp.maximum(s2 - s1 * s1 / safe, 0.0), 0.0).sum()
        return c_new, sse / nf, e

    # Stop at a fixed point (the partition did not change: exact, as 1-D Lloyd converges
    # in finitely many steps), after `iters` steps, or once the relative decrease of the
    # distortion is <= tol (tol = 0: fixed point only; this SSE carries float32 noise).
    def cond(st):
        i, _, d_prev, d, e_prev, e = st
        moved = jnp.any(e != e_prev)
        return (i < iters) & moved & ((tol <= 0) | (d_prev - d > tol * d))

    def body(st):
        i, c, _, d, _, e = st
        c, d_new, e_new = step(c)
        return i + 1, c, d, d_new, e, e_new

    big = jnp.asarray(jnp.finfo(_F32).max, _F32)
    none = jnp.full(c.shape[0] + 1, -1, jnp.int32)
    init = (jnp.int32(0), c, jnp.inf * big, big, none, none - 1)
    _, c, _, _, _, _ = lax.while_loop(cond, body, init)
    return edges(c)


@functools.partial(jax.jit, static_argnames=("kpad", "cap", "init"))
def _fit_table(xs, start, n, k, c0, keys, iters, tol, *, kpad: int, cap: int, init: str):
    """All segments of one table -> (centroids (S, kpad), mse (S,))."""
    p1, p2 = _prefix(xs), _prefix(xs, 2)  # the padding past all segments is zeros
    steps = (cap + 1).bit_length()
    xs_padded = jnp.pad(xs, (0, cap)) if init == "kmeans++" else None

    def fit_one(args):
        st, nn, kk, cc, key = args
        seg = _Seg(xs, p1, p2, st, nn, kk, steps)
        if init != "given":
            return _lloyd(seg, _init(seg, key, kpad, cap, init, xs_padded), iters, tol)
        # Entries past k are +inf whatever the caller padded them with: finite ones (the
        # padding segments' zeros) would put cluster edges inside other segments.
        c = jnp.sort(jnp.where(jnp.arange(kpad) < kk, cc, jnp.inf))
        return _lloyd(seg, c, iters, tol, reseed=True)

    # A sequential map, not vmap: batched scatters and a batched layer count (the DP runs
    # k_i - 1 layers) made the vmapped version 1.4x slower on a ResNet's 37 kernels.
    c, e = lax.map(fit_one, (start, n, k, c0, keys))
    # Exact distortion in one pass over the data. A running count of "marks" gives every
    # value the flat index s * kpad + j of its cluster j in segment s: +1 at each kept inner
    # edge (edges at a segment's end, of empty top clusters, are dropped) and, at each
    # later segment's start, the jump to the next row of the table. A block of values
    # without a mark inside shares one centroid; only the few blocks with marks inside
    # (at most one per mark) are resolved value by value.
    size, nseg, nb = xs.shape[0], start.shape[0], xs.shape[0] // _BLOCK
    inner = e[:, 1:-1]
    kept = inner < (start + n)[:, None]
    jump = kpad - jnp.concatenate(
        [jnp.zeros(1, jnp.int32), kept.sum(axis=1)[:-1].astype(jnp.int32)]
    )
    mpos = jnp.concatenate(
        [jnp.where(kept, inner, size).ravel(), jnp.where(start > 0, start, size)]
    )
    mw = jnp.concatenate([jnp.ones(inner.size, jnp.int32), jump])
    order = jnp.argsort(mpos)
    mpos, mcum = mpos[order], jnp.cumsum(mw[order])

    def flat_index(t):
        i = jnp.searchsorted(mpos, t, side="right")
        return jnp.where(i > 0, mcum[jnp.maximum(i - 1, 0)], 0)

    cflat, total = c.reshape(-1), jnp.max(start + n)
    blocks = xs.reshape(nb, _BLOCK)
    first = jnp.arange(nb) * _BLOCK
    base = flat_index(first)
    dirty = base != flat_index(first + _BLOCK - 1)
    lane = jnp.arange(_BLOCK)[None, :]
    ok = (first[:, None] + lane < total) & ~dirty[:, None]
    err = jnp.where(ok, (blocks - cflat[base][:, None]) ** 2, 0.0).sum(axis=1)
    sse = jax.ops.segment_sum(err, base // kpad, num_segments=nseg)
    ids = jnp.nonzero(dirty, size=min(nb, mpos.shape[0]), fill_value=nb)[0]
    pos = jnp.minimum(ids, nb - 1)[:, None] * _BLOCK + lane
    fi = flat_index(pos)
    ok = (ids[:, None] < nb) & (pos < total)
    err = jnp.where(ok, (xs[pos] - cflat[jnp.minimum(fi, cflat.shape[0] - 1)]) ** 2, 0.0)
    sse = sse + jax.ops.segment_sum(err.ravel(), (fi // kpad).ravel(), num_segments=nseg)
    return c, sse / n.astype(_F32)


# -------------------------------------------------------------------------- public API


def check_finite(x, what: str = "input") -> None:
    """Raises ValueError if a concrete array has NaN/inf values (no-op under tracing)."""
    if _is_traced(x):
        return
    x = np.asarray(x)
    bad = x.size - int(np.isfinite(x).sum())
    if bad:
        raise ValueError(
            f"{what} has {bad} NaN/inf value(s) out of {x.size}; a codebook fitted to it "
            "would be NaN. Fix the weights (e.g. a diverged training step) first."
        )


def kmeans_1d_batch(
    groups: Sequence[jax.Array],
    ks: Sequence[int],
    *,
    init: str = "dp",
    iters: int = 50,
    tol: float = 1e-6,
    init_centroids: Sequence[jax.Array] | None = None,
    key: jax.Array | None = None,
    bucket: bool = True,
) -> list[tuple[jax.Array, jax.Array]]:
    """Many independent 1-D K-means problems in one compiled call.

    Args:
      groups: arrays of shape (g_i, n_i): g_i problems of n_i values each (a whole kernel
        is (1, n); its output channels for per-channel codebooks are (channels, n)).
      ks: number of centroids per group (1..any; 2**bits for a codebook).
      init: "dp" (default: optimal partition of the sorted data's atoms, see the module
        docstring), "linear" (evenly spaced on [min, max]), "quantile", "kmeans++".
      iters: cap on Lloyd steps; a problem stops earlier at a fixed point (partition
        unchanged) or once the relative decrease of its distortion is <= ``tol`` (0: run
        to the fixed point).
      init_centroids: per group (g_i, k_i) warm starts (codebook refresh); overrides init.
        Any order. A centroid that owns no value is re-seeded before each Lloyd step and
        before returning (to the value farthest from its centroid in the cluster of
        largest squared error; the other centroids keep their values), so each centroid
        owns a value unless there are fewer distinct values than k. With ``iters=0``
        that re-seeding is all that happens.
      key: PRNG key for "kmeans++" (default ``PRNGKey(0)``: deterministic).
      bucket: eager calls only: pad sizes to buckets so few shapes compile.

    Returns:
      Per group (centroids (g_i, k_i) float32 sorted ascending, distortion (g_i,): mean
      squared error). Fewer distinct values than k (constant, zeros, k > n) give duplicate
      or unused centroids, never NaN. Eager calls raise ValueError on NaN/inf input; under
      jit no check is possible and NaN input gives NaN codebooks.
    """
    if len(groups) != len(ks):
        raise ValueError(f"got {len(groups)} groups but {len(ks)} values of k")
    if init_centroids is None and init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    shapes = [tuple(np.shape(g)) for g in groups]
    for i, (shape, k) in enumerate(zip(shapes, ks)):
        if len(shape) != 2 or shape[1] == 0:
            raise ValueError(
                f"group {i}: expected a non-empty (groups, n) array, got shape {shape}"
            )
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"group {i}: k must be a positive int, got {k!r}")
        if init_centroids is not None and tuple(np.shape(init_centroids[i])) != (shape[0], k):
            raise ValueError(
                f"group {i}: init_centroids must be {(shape[0], k)}, got {np.shape(init_centroids[i])}"
            )
    ks = [int(k) for k in ks]
    traced = _is_traced(groups, init_centroids)
    kmax = max(ks)
    kpad = kmax if traced else _kpad(kmax)
    lengths = np.concatenate([np.full(g, n, np.int64) for g, n in shapes])
    counts = np.repeat(np.asarray(ks), [g for g, _ in shapes])
    total, segs = int(lengths.sum()), len(lengths)
    if traced or not bucket:  # zero padding to whole prefix-sum blocks only
        size, nseg, cap = -(-total // _BLOCK) * _BLOCK, segs, int(lengths.max())
    else:  # few distinct shapes: small problems all share one compilation
        size, nseg = max(_bucket(total, 8), 8192), -(-segs // 8) * 8
        cap = max(1024, 1 << (int(lengths.max()) - 1).bit_length())
    if traced:  # sort in XLA
        xs = jnp.concatenate([_sort_xla(jnp.asarray(g).astype(_F32)).ravel() for g in groups])
        xs = jnp.pad(xs, (0, size - total))
    else:
        buf, off = np.zeros(size, np.float32), 0  # zero padding adds nothing to sums
        for i, g in enumerate(groups):
            rows = buf[off : off + g.size].reshape(np.shape(g))
            rows[...] = g
            check_finite(rows, f"kmeans input (group {i})")
            rows.sort(axis=1)  # in place
            off += rows.size
        xs = jnp.asarray(buf)
    # Segment table, padded with 1-value dummies (start 0, k 1) whose results are dropped.
    pad = nseg - segs
    start = np.concatenate([np.cumsum(lengths) - lengths, np.zeros(pad, np.int64)])
    n = np.concatenate([lengths, np.ones(pad, np.int64)])
    k = np.concatenate([counts, np.ones(pad, np.int64)])
    if init_centroids is None:
        c0 = jnp.zeros((nseg, kpad), _F32)
    else:
        c0 = jnp.concatenate(
            [
                jnp.pad(
                    jnp.asarray(c, _F32),
                    ((0, 0), (0, kpad - np.shape(c)[1])),
                    constant_values=jnp.inf,
                )
                for c in init_centroids
            ]
            + [jnp.zeros((pad, kpad), _F32)]
        )
    keys = jax.random.split(jax.random.PRNGKey(0) if key is None else key, nseg)
    i32 = lambda a: jnp.asarray(a, jnp.int32)
    c, mse = _fit_table(
        xs,
        i32(start),
        i32(n),
        i32(k),
        c0,
        keys,
        iters,
        tol,
        kpad=kpad,
        cap=cap,
        init="given" if init_centroids is not None else init,
    )
    out, row = [], 0
    for (g, _), kk in zip(shapes, ks):
        out.append((c[row : row + g, :kk], mse[row : row + g]))
        row += g
    return out


def _rows(x, shape):
    return jnp.reshape(x, shape) if _is_traced(x) else np.reshape(np.asarray(x), shape)


def kmeans_1d(
    x: jax.Array, k: int, *, init_centroids: jax.Array | None = None, **kw
) -> tuple[jax.Array, jax.Array]:
    """Fits k sorted centroids to all values of x (any shape, flattened) by 1-D Lloyd.

    Returns (centroids (k,) float32 sorted ascending, mean squared error scalar). Keyword
    arguments as ``kmeans_1d_batch`` (init, iters, tol, key, bucket); ``init_centroids``
    is (k,).
    """
    c0 = None if init_centroids is None else [jnp.reshape(init_centroids, (1, -1))]
    ((c, d),) = kmeans_1d_batch([_rows(x, (1, -1))], [k], init_centroids=c0, **kw)
    return c[0], d[0]


def kmeans_1d_grouped(
    x: jax.Array, k: int, *, init_centroids: jax.Array | None = None, **kw
) -> tuple[jax.Array, jax.Array]:
    """One codebook per row: x (groups, n) -> (centroids (groups, k), mse (groups,)).

    Keyword arguments as ``kmeans_1d_batch``; ``init_centroids`` is (groups, k).
    """
    if np.ndim(x) != 2:
        raise ValueError(f"kmeans_1d_grouped expects x of shape (groups, n), got {np.shape(x)}")
    c0 = None if init_centroids is None else [init_centroids]
    ((c, d),) = kmeans_1d_batch([x], [k], init_centroids=c0, **kw)
    return c, d


def assign(x: jax.Array, centroids: jax.Array) -> jax.Array:
    """Index of the nearest centroid for every value of x (same shape, int32).

    ``centroids`` (K,) must be sorted ascending. A value exactly halfway between two
    centroids goes to the larger one, as in ``kmeans_1d``'s partition.
    """
    c = jnp.asarray(centroids, _F32)
    x = jnp.asarray(x, _F32)
    if c.shape[-1] <= 16:
        # A fused (n, K-1) compare-and-count (the midpoints at or below each value): fastest
        # for small K. Written out rather than searchsorted(method="compare_all"), which
        # under jit + vmap with constant inputs returned wrong indices (jax 0.10.2) and
        # ran 3.4x slower on 2M values.
        mid = _midpoints(c).reshape((1,) * x.ndim + (-1,))
        return jnp.sum(x[..., None] >= mid, axis=-1, dtype=jnp.int32)
    # Beyond ~16 centroids a branch-free unrolled binary search wins.
    idx = jnp.searchsorted(_midpoints(c), x, side="right", method="scan_unrolled")
    return idx.astype(jnp.int32)
