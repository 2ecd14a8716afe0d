"""Packed export of quantized params: b-bit indices + float32 codebooks, and its size.

File format (version 2; version 1 files, K-means only, still load): an *uncompressed*
NumPy ``.npz`` (a zip of ``.npy`` members, stored, so its size is honest) with six
members:

- ``header``: uint8, UTF-8 JSON ``{"format": "sqjax-packed", "version": 2, "leaves": [...]}``;
  one entry per params leaf in flattening order: ``path`` (list of keys, str or int, as in
  ``quant.path_str``), ``shape``, ``dtype`` (of the original leaf), ``bits`` (null for a
  float leaf), ``per_channel``, ``offset`` (byte offset into ``indices``, or element offset
  into ``floats``). A K-means leaf adds ``codebook_offset`` (element offset into
  ``codebooks``) and ``codebook_shape``; a uniform-grid leaf (``sqjax.uniform``) adds
  ``grid: "uniform"``, ``symmetric``, ``groups`` (1, or the channel count),
  ``scale_offset`` (into ``scales``) and, when asymmetric, ``zero_offset`` (into ``zeros``).
- ``indices``: uint8, each quantized leaf's nearest-level indices as a little-endian
  bit stream: value i (C order over the leaf's shape) occupies stream bits [i*b, (i+1)*b),
  least significant bit first; stream bit j is bit j % 8 of byte j // 8. Each leaf starts
  on a byte boundary. Any b in 1..8 (3, 5 and 7 included).
- ``codebooks``: float32, each K-means leaf's sorted codebook, (K,) or row-major (channels, K).
- ``scales``: float32, one per uniform grid; ``zeros``: uint8, the zero point of each
  asymmetric grid. The levels are ``scale * (arange(K) - zero)`` in float32, with
  ``zero = (K-1)/2`` for a symmetric grid.
- ``floats``: float32, the float leaves as they are.

``load_packed`` rebuilds exactly (bit for bit) what ``quantizer.apply`` returns.
The file is written to a temporary file in the same directory and moved into place with
``os.replace``, so a reader never sees a partial file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sqjax import quant, uniform
from sqjax.tables import format_table
from sqjax.workdir import atomic_write

__all__ = [
    "LeafSize",
    "SizeReport",
    "export_packed",
    "load_packed",
    "read_metadata",
    "size_report",
]

_FORMAT, _VERSION = "sqjax-packed", 2
_READS = (1, 2)  # version 2 added uniform grids; K-means leaves are stored as in 1


class LeafSize(NamedTuple):
    path: str
    shape: tuple[int, ...]
    bits: int | None  # None: float leaf
    n_codebooks: int  # codebooks or uniform grids
    size: int
    group_bits: int | None = None  # per grid (scale, zero point); None: a K*32-bit codebook

    @property
    def fp32_bytes(self) -> int:
        return 4 * self.size

    @property
    def packed_bits(self) -> int:
        return quant.packed_bits(self.size, self.bits, self.n_codebooks, self.group_bits)


@dataclasses.dataclass(frozen=True)
class SizeReport:
    """Per-leaf and total storage: FP32 vs packed (n*b + K*32 per codebook, or 32 per
    uniform grid's scale + 8 per zero point, floats 32n)."""

    leaves: tuple[LeafSize, ...]
    file_bytes: int | None = None  # size on disk, when written by export_packed

    @property
    def fp32_bytes(self) -> int:
        return sum(leaf.fp32_bytes for leaf in self.leaves)

    @property
    def packed_bytes(self) -> float:
        return sum(leaf.packed_bits for leaf in self.leaves) / 8

    @property
    def ratio(self) -> float:
        """Compression vs FP32 (FP32 bytes / packed bytes)."""
        return self.fp32_bytes / self.packed_bytes if self.packed_bytes else math.inf

    def format(self) -> str:
        rows = [("path", "shape", "bits", "codebooks", "fp32 bytes", "packed bytes", "ratio")]
        for leaf in self.leaves:
            pb = leaf.packed_bits / 8
            rows.append(
                (
                    leaf.path,
                    "x".join(map(str, leaf.shape)) or "scalar",
                    "float" if leaf.bits is None else str(leaf.bits),
                    str(leaf.n_codebooks or "-"),
                    f"{leaf.fp32_bytes:,}",
                    f"{pb:,.0f}",
                    f"{leaf.fp32_bytes / pb:.1f}x",
                )
            )
        rows.append(
            (
                "total",
                "",
                "",
                "",
                f"{self.fp32_bytes:,}",
                f"{self.packed_bytes:,.0f}",
                f"{self.ratio:.1f}x",
            )
        )
        if self.file_bytes is not None:
            over = self.file_bytes - self.packed_bytes
            rows.append(("file on disk", "", "", "", "", f"{self.file_bytes:,}", f"+{over:,.0f} B"))
        return format_table(rows, rules=(1, 1 + len(self.leaves)))  # and above the totals


def _index_bits(k: int) -> int:
    return max(1, (k - 1).bit_length())


class _Grid(NamedTuple):
    scales: np.ndarray  # (groups,) float32
    zeros: np.ndarray  # (groups,) float32; (K-1)/2 when symmetric
    symmetric: bool


def _levels(scales: np.ndarray, zeros: np.ndarray, k: int) -> np.ndarray:
    """(groups, k) float32 levels, by the one multiply ``uniform.grid_levels`` does."""
    return scales[:, None] * (np.arange(k, dtype=np.float32)[None, :] - zeros[:, None])


def _grid(path: str, cb: np.ndarray, scales, zeros) -> _Grid:
    k = cb.shape[-1]
    s = np.asarray(scales, np.float32).reshape(-1)
    z = np.asarray(zeros, np.float32).reshape(-1)
    symmetric = bool(np.all(z == (k - 1) / 2))
    if not symmetric and not np.all((z == np.round(z)) & (z >= 0) & (z <= k - 1)):
        raise ValueError(
            f"export_packed: leaf {path!r}: zero points must be integers in [0, {k - 1}], or "
            f"all {(k - 1) / 2} (symmetric); got {z[:4]}"
        )
    if not np.array_equal(_levels(s, z, k).reshape(cb.shape), cb):
        raise ValueError(
            f"export_packed: leaf {path!r}: its levels are not scale * (arange(K) - zero); "
            "refresh the state (quantizer.update, or uniform.with_scales for trained scales)"
        )
    return _Grid(s, z, symmetric)


def _entries(params, state):
    """(keypath, leaf, sorted codebook or None, uniform _Grid or None) per params leaf."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    cbs = [
        None if cb is None else np.asarray(cb, np.float32)
        for cb in treedef.flatten_up_to(state.codebooks)
    ]
    grids = [None] * len(flat)
    if isinstance(state, uniform.UniformState):
        scales, zeros = treedef.flatten_up_to(state.scales), treedef.flatten_up_to(state.zeros)
        grids = [
            None if cb is None else _grid(quant.path_str(kp), cb, s, z)
            for (kp, _), cb, s, z in zip(flat, cbs, scales, zeros)
        ]
    return [
        (kp, w, None if cb is None else np.sort(cb, axis=-1), grid)
        for (kp, w), cb, grid in zip(flat, cbs, grids)
    ]


def size_report(params: Any, state: quant.QuantizerState | uniform.UniformState) -> SizeReport:
    """Storage per leaf and in total, from params and the quantizer state's codebooks
    (uniform grids: their scales and zero points)."""
    leaves = []
    for kp, w, cb, grid in _entries(params, state):
        shape = tuple(np.shape(w))
        bits = None if cb is None else _index_bits(cb.shape[-1])
        ncb = 0 if cb is None else (cb.shape[0] if cb.ndim == 2 else 1)
        gb = None if grid is None else uniform.group_bits(grid.symmetric)
        leaves.append(LeafSize(quant.path_str(kp), shape, bits, ncb, math.prod(shape), gb))
    return SizeReport(tuple(leaves))


def _pack(idx: np.ndarray, bits: int) -> np.ndarray:
    planes = (idx.reshape(-1, 1) >> np.arange(bits, dtype=idx.dtype)) & 1
    return np.packbits(planes.astype(np.uint8).ravel(), bitorder="little")


def _unpack(buf: np.ndarray, bits: int, n: int) -> np.ndarray:
    planes = np.unpackbits(buf, count=n * bits, bitorder="little").reshape(n, bits)
    return planes.astype(np.int32) @ (1 << np.arange(bits, dtype=np.int32))


_indices = jax.jit(quant.codebook_indices)  # the same assignment as apply


def export_packed(
    path: str | os.PathLike,
    params: Any,
    state: quant.QuantizerState | uniform.UniformState,
    metadata: dict | None = None,
) -> SizeReport:
    """Writes the quantized model (see the module docstring) and returns its SizeReport.

    ``state`` is the quantizer state whose codebooks ``quantizer.apply`` would use; it
    fixes which leaves are quantized, their bit width (log2 K) and granularity. A
    ``uniform.UniformState`` is stored as scales and zero points, not levels.
    ``metadata`` (JSON-serialisable) is stored in the header; ``read_metadata`` returns it.
    """
    meta, indices, codebooks, scales, zeros, floats = [], [], [], [], [], []
    offs = {"idx": 0, "cb": 0, "s": 0, "z": 0, "fl": 0}
    for kp, w, cb, grid in _entries(params, state):
        dtype = jnp.dtype(w.dtype if hasattr(w, "dtype") else np.asarray(w).dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"export_packed: leaf {quant.path_str(kp)!r} has dtype {dtype}; only float leaves can be exported"
            )
        entry = {"path": quant.path_parts(kp), "shape": list(np.shape(w)), "dtype": dtype.name}
        if cb is None:
            floats.append(np.asarray(w, np.float32).ravel())
            entry.update(bits=None, per_channel=False, offset=offs["fl"])
            offs["fl"] += floats[-1].size
            meta.append(entry)
            continue
        bits = _index_bits(cb.shape[-1])
        packed = _pack(np.asarray(_indices(jnp.asarray(w), jnp.asarray(cb))).ravel(), bits)
        entry.update(bits=bits, per_channel=cb.ndim == 2, offset=offs["idx"])
        indices.append(packed)
        offs["idx"] += packed.size
        if grid is None:
            entry.update(codebook_offset=offs["cb"], codebook_shape=list(cb.shape))
            codebooks.append(cb.ravel())
            offs["cb"] += cb.size
        else:
            n = grid.scales.size
            entry.update(grid="uniform", symmetric=grid.symmetric, groups=n, scale_offset=offs["s"])
            scales.append(grid.scales)
            offs["s"] += n
            if not grid.symmetric:
                entry.update(zero_offset=offs["z"])
                zeros.append(grid.zeros)
                offs["z"] += n
        meta.append(entry)
    header = json.dumps(
        {"format": _FORMAT, "version": _VERSION, "leaves": meta, "metadata": metadata or {}},
        separators=(",", ":"),
    )
    cat = lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt)
    arrays = {
        "header": np.frombuffer(header.encode(), np.uint8),
        "indices": cat(indices, np.uint8),
        "codebooks": cat(codebooks, np.float32),
        "scales": cat(scales, np.float32),
        "zeros": cat(zeros, np.uint8),
        "floats": cat(floats, np.float32),
    }
    atomic_write(path, lambda f: np.savez(f, **arrays))  # savez stores members uncompressed
    return dataclasses.replace(size_report(params, state), file_bytes=os.path.getsize(path))


def _read_header(path: str | os.PathLike, z) -> dict:
    if "header" not in z.files:
        raise ValueError(
            f"{path}: not a sqjax model file (an .npz without a {_FORMAT} header); write "
            "one with `sqjax export`"
        )
    header = json.loads(bytes(z["header"]).decode())
    if header.get("format") != _FORMAT or header.get("version") not in _READS:
        raise ValueError(
            f"{path}: not a {_FORMAT} file of version {' or '.join(map(str, _READS))} "
            f"(header {str(header)[:80]})"
        )
    return header


def read_metadata(path: str | os.PathLike) -> dict:
    """The ``metadata`` dict an ``export_packed`` file was written with."""
    try:
        z = np.load(os.fspath(path), allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: model file not found") from None
    except (ValueError, OSError) as e:  # not a zip, or an .npy
        raise ValueError(
            f"{path}: not a sqjax model file ({e}); write one with `sqjax export`"
        ) from e
    if not hasattr(z, "files"):
        raise ValueError(f"{path}: not a sqjax model file (an .npy array); use `sqjax export`")
    with z:
        return _read_header(path, z).get("metadata", {})


def load_packed(path: str | os.PathLike, target: Any = None) -> Any:
    """Reads an ``export_packed`` file back to params (jax arrays, original dtypes).

    Without ``target`` the result is nested dicts keyed by the path components (the "pure
    dict" form; for Flax NNX use ``nnx.replace_by_pure_dict``). With ``target`` (any pytree
    with the same leaf paths, e.g. the original params) the result has its structure.
    """
    with np.load(os.fspath(path), allow_pickle=False) as z:
        header = _read_header(path, z)
        indices, codebooks, floats = z["indices"], z["codebooks"], z["floats"]
        # version 1 files have no uniform grids
        scales = z["scales"] if "scales" in z.files else np.zeros(0, np.float32)
        zeros = z["zeros"] if "zeros" in z.files else np.zeros(0, np.uint8)
    values = {}
    for e in header["leaves"]:
        shape, n = tuple(e["shape"]), math.prod(e["shape"])
        if e["bits"] is None:
            x = floats[e["offset"] : e["offset"] + n].reshape(shape)
        else:
            if e.get("grid") == "uniform":
                g, k, so = e["groups"], 2 ** e["bits"], e["scale_offset"]
                if e["symmetric"]:
                    zs = np.full(g, (k - 1) / 2, np.float32)
                else:
                    zs = zeros[e["zero_offset"] : e["zero_offset"] + g].astype(np.float32)
                cb = _levels(scales[so : so + g], zs, k)
                cb = cb if e["per_channel"] else cb[0]
            else:
                cb_shape = tuple(e["codebook_shape"])
                cb = codebooks[
                    e["codebook_offset"] : e["codebook_offset"] + math.prod(cb_shape)
                ].reshape(cb_shape)
            nbytes = -(-n * e["bits"] // 8)
            idx = _unpack(indices[e["offset"] : e["offset"] + nbytes], e["bits"], n)
            if e["per_channel"]:
                c = shape[-1]
                x = np.take_along_axis(cb.T, idx.reshape(-1, c), axis=0).reshape(shape)
            else:
                x = cb[idx].reshape(shape)
        values[tuple(e["path"])] = jnp.asarray(x).astype(e["dtype"])
    if target is None:
        root: dict = {}
        for parts, x in values.items():
            node = root
            for p in parts[:-1]:
                node = node.setdefault(p, {})
            node[parts[-1]] = x
        return root
    flat, treedef = jax.tree_util.tree_flatten_with_path(target)
    keys = [tuple(quant.path_parts(kp)) for kp, _ in flat]
    missing = [quant.path_str(kp) for (kp, _), k in zip(flat, keys) if k not in values]
    if missing or len(keys) != len(values):
        raise ValueError(
            f"{path}: leaves do not match target (missing {missing[:5]}, file has {len(values)}, target {len(keys)})"
        )
    return treedef.unflatten([values[k] for k in keys])
