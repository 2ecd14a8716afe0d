"""The encoder as an ONNX graph: features ``(batch, frames, n_mels)`` to the embedding.

Built with ``onnx.helper`` from the packed model file (``sqjax.export``) or from float
variables, so quantized kernels stay packed in the ONNX file and are decoded by the graph:

- indices: a little-endian bit stream of ``s``-bit fields, ``s`` the smallest of 1, 2, 4, 8
  holding the width (3 bits are stored in 4), unpacked by ``BitShift`` + ``BitwiseAnd``
  (``packing="bits"``, the default: a 2-bit file is under 1/10 of the FP32 one); or one
  uint8 per index (``packing="uint8"``: no unpacking, 4x larger indices);
- K-means: ``Gather`` of the codebook (per tensor), or ``GatherElements`` of the
  ``(channels, K)`` codebooks (per channel);
- uniform grids (``sqjax.uniform``): ``DequantizeLinear`` with per-channel scales and
  uint8 zero points (asymmetric), or ``(index - (K-1)/2) * scale`` (symmetric: the zero
  point is not an integer).

BatchNorm is folded: each convolution's BN multiplier scales its decoded kernel (per
tensor codebooks: a ``Mul`` on the decoded kernel; per channel codebooks and uniform
scales: folded into the codebook/scale at export), and its shift becomes the ``Conv``
bias. Dynamic batch and frames; opset 18 (``BitwiseAnd``).

With ``frontend=True`` (``sqjax export --with-frontend``) the graph starts from the 16 kHz
waveform ``wave`` ``(batch, samples)`` and also outputs its features ``feats``. Each frame's
steps before the power spectrum are linear in the frame's samples (librosa's Hann window
and DFT; Kaldi's DC removal, pre-emphasis, Hamming window and zero-padded DFT), so they
are folded into one matrix whose rows are the real and imaginary DFT bases: a strided
``Conv`` frames the wave and applies it in one op. (ONNX's ``STFT`` windows the raw frame
first, which leaves no place for Kaldi's per-frame DC removal and pre-emphasis, and
``MelWeightMatrix`` builds HTK triangles, neither librosa's Slaney filters nor Kaldi's;
the filters are stored as constants instead.)

The file's ``metadata_props["sqjax"]`` holds the model file's metadata (model, features,
eval settings) as JSON, which ``sqjax.deploy.runtime`` reads without JAX.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sqjax import export as export_lib
from sqjax import quant

__all__ = [
    "OPSET",
    "PACKINGS",
    "Quantized",
    "encoder_onnx",
    "export_model_file",
    "export_variables",
    "leaves_from_model_file",
    "leaves_from_variables",
]

OPSET = 19  # Pad's wrap mode (the front end's short-utterance tiling)
PACKINGS = ("bits", "uint8")
# The front end's optional inputs (sqjax.deploy.runtime names them too: it imports no sqjax).
WRAP_INPUT, SPAN_INPUT = "wrap_frames", "frame_span"
_METADATA_KEY = "sqjax"


class Quantized(NamedTuple):
    """A quantized leaf as the packed file stores it.

    Attributes:
      indices: int array of the leaf's shape (Flax layout), values in [0, 2**bits).
      bits: index width.
      codebook: K-means levels, (K,) or (channels, K); None for a uniform grid.
      scales, zeros: a uniform grid's (groups,) float32 scales and zero points (groups 1 or
        channels); zeros are (K-1)/2 when ``symmetric``.
    """

    indices: np.ndarray
    bits: int
    codebook: np.ndarray | None = None
    scales: np.ndarray | None = None
    zeros: np.ndarray | None = None
    symmetric: bool = False


Leaves = Mapping[tuple, "np.ndarray | Quantized"]


def leaves_from_model_file(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(leaves, metadata)`` of a ``sqjax export`` file: ``{path tuple: float array or
    Quantized}``, the indices unpacked but never decoded to floats."""
    with np.load(os.fspath(path), allow_pickle=False) as z:
        header = export_lib._read_header(path, z)
        arrays = {k: z[k] for k in z.files}
    scales_all = arrays.get("scales", np.zeros(0, np.float32))
    zeros_all = arrays.get("zeros", np.zeros(0, np.uint8))
    leaves = {}
    for e in header["leaves"]:
        shape, n = tuple(e["shape"]), math.prod(e["shape"])
        key = tuple(e["path"])
        if e["bits"] is None:
            leaves[key] = arrays["floats"][e["offset"] : e["offset"] + n].reshape(shape)
            continue
        bits = e["bits"]
        buf = arrays["indices"][e["offset"] : e["offset"] + -(-n * bits // 8)]
        idx = export_lib._unpack(buf, bits, n).reshape(shape)
        if e.get("grid") == "uniform":
            g, k, so = e["groups"], 2**bits, e["scale_offset"]
            if e["symmetric"]:
                zs = np.full(g, (k - 1) / 2, np.float32)
            else:
                zs = zeros_all[e["zero_offset"] : e["zero_offset"] + g].astype(np.float32)
            leaves[key] = Quantized(idx, bits, None, scales_all[so : so + g], zs, e["symmetric"])
        else:
            cs = tuple(e["codebook_shape"])
            o = e["codebook_offset"]
            leaves[key] = Quantized(
                idx, bits, arrays["codebooks"][o : o + math.prod(cs)].reshape(cs)
            )
    return leaves, header.get("metadata", {})


def leaves_from_variables(variables: Mapping) -> dict:
    """``{path tuple: float32 array}`` of float (e.g. FP32) encoder variables."""
    import jax

    flat = jax.tree_util.tree_flatten_with_path(variables)[0]
    return {tuple(quant.path_parts(kp)): np.asarray(x, np.float32) for kp, x in flat}


# ----------------------------------------------------------------------------- the graph


class _Graph:
    def __init__(self, packing: str):
        if packing not in PACKINGS:
            raise ValueError(f"packing={packing!r}; choose one of {PACKINGS}")
        self.packing = packing
        self.nodes: list = []
        self.inits: list = []
        self._n = 0

    def name(self, stem: str) -> str:
        self._n += 1
        return f"{stem}_{self._n}"

    def const(self, stem: str, value) -> str:
        name = self.name(stem)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, *inputs: str, stem: str = "", **attrs) -> str:
        out = self.name(stem or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    # -- weights

    def indices(self, stem: str, idx: np.ndarray, bits: int) -> str:
        """uint8 indices of ``idx``'s shape, stored packed and unpacked by the graph."""
        idx = np.ascontiguousarray(idx).astype(np.uint8)
        store = 8 if self.packing == "uint8" else next(s for s in (1, 2, 4, 8) if s >= bits)
        if store == 8:
            return self.const(f"{stem}_idx_u8", idx)
        per = 8 // store
        flat = idx.ravel()
        padded = np.zeros(-(-flat.size // per) * per, np.uint8)
        padded[: flat.size] = flat
        fields = padded.reshape(-1, per) << (store * np.arange(per, dtype=np.uint8))
        packed = np.bitwise_or.reduce(fields, axis=1).astype(np.uint8)  # LSB first
        p = self.const(f"{stem}_idx_b{store}", packed)
        x = self.op("Unsqueeze", p, self.const("axis1", np.array([1], np.int64)))
        shifts = self.const("shifts", (store * np.arange(per)).astype(np.uint8))
        x = self.op("BitShift", x, shifts, direction="RIGHT")
        x = self.op("BitwiseAnd", x, self.const("mask", np.uint8(2**store - 1)))
        x = self.op("Reshape", x, self.const("flat", np.array([-1], np.int64)))
        x = self.op(
            "Slice",
            x,
            self.const("start", np.array([0], np.int64)),
            self.const("stop", np.array([flat.size], np.int64)),
        )
        return self.op("Reshape", x, self.const("shape", np.array(idx.shape, np.int64)))

    def weight(self, stem: str, leaf, perm: tuple[int, ...], mul: np.ndarray | None = None) -> str:
        """The leaf as a float32 tensor in ONNX layout (Flax axes ``perm``; the channel,
        Flax's last axis, first), times ``mul`` per channel when given (BatchNorm)."""
        if not isinstance(leaf, Quantized):
            w = np.transpose(np.asarray(leaf, np.float32), perm)
            if mul is not None:
                w = w * mul.reshape((-1,) + (1,) * (w.ndim - 1))
            return self.const(f"{stem}_w", w.astype(np.float32))
        idx = np.transpose(leaf.indices, perm)
        channels, rank = idx.shape[0], idx.ndim
        col = lambda v: np.asarray(v, np.float32).reshape((-1,) + (1,) * (rank - 1))
        packed = self.indices(stem, idx, leaf.bits)
        if leaf.codebook is not None and leaf.codebook.ndim == 1:  # K-means, per tensor
            i = self.op("Cast", packed, to=TensorProto.INT32)
            w = self.op(
                "Gather", self.const(f"{stem}_codebook", leaf.codebook.astype(np.float32)), i
            )
            return w if mul is None else self.op("Mul", w, self.const(f"{stem}_bn", col(mul)))
        if leaf.codebook is not None:  # K-means, per channel: (channels, K)
            cb = leaf.codebook.astype(np.float32)
            cb = cb if mul is None else (cb * np.asarray(mul, np.float32)[:, None])
            i = self.op("Cast", packed, to=TensorProto.INT64)
            i = self.op("Reshape", i, self.const("rows", np.array([channels, -1], np.int64)))
            w = self.op("GatherElements", self.const(f"{stem}_codebooks", cb), i, axis=1)
            return self.op("Reshape", w, self.const("shape", np.array(idx.shape, np.int64)))
        s = np.asarray(leaf.scales, np.float32)
        if mul is not None:
            s = s * np.asarray(mul, np.float32)  # (1,) or (channels,) against (channels,)
        if not leaf.symmetric:
            zp = np.broadcast_to(np.asarray(leaf.zeros).astype(np.uint8), s.shape)
            if s.size == 1:
                return self.op(
                    "DequantizeLinear", packed, self.const(f"{stem}_scale", s.reshape(())),
                    self.const(f"{stem}_zero", zp.reshape(())),
                )  # fmt: skip
            return self.op(
                "DequantizeLinear", packed, self.const(f"{stem}_scale", s),
                self.const(f"{stem}_zero", np.ascontiguousarray(zp)), axis=0,
            )  # fmt: skip
        z = np.float32((2**leaf.bits - 1) / 2)
        x = self.op("Cast", packed, to=TensorProto.FLOAT)
        x = self.op("Sub", x, self.const(f"{stem}_zero", z))
        scale = s.reshape(()) if s.size == 1 else col(s)
        return self.op("Mul", x, self.const(f"{stem}_scale", scale))


def _bn_fold(bn: Mapping, eps: float = 1e-5) -> tuple[np.ndarray, np.ndarray]:
    """(multiplier, shift) of an inference BatchNorm, as ``models.conv_bn`` folds it."""
    f = lambda k: np.asarray(bn[k], np.float32)
    mul = (1.0 / np.sqrt(f("var") + np.float32(eps))).astype(np.float32) * f("scale")
    return mul, f("bias") - f("mean") * mul


def _conv_bn(g: _Graph, x: str, leaves: Leaves, scope: tuple, conv: str, bn: str, stride=1,
             residual: str | None = None, relu: bool = True) -> str:  # fmt: skip
    kernel = leaves[(*scope, conv, "kernel")]
    size = np.shape(kernel.indices if isinstance(kernel, Quantized) else kernel)[0]
    stats = {k: leaves[("batch_stats", *scope[1:], bn, k)] for k in ("mean", "var")}
    stats.update({k: leaves[(*scope, bn, k)] for k in ("scale", "bias")})
    mul, shift = _bn_fold(stats)
    stem = "/".join(map(str, (*scope[1:], conv)))
    w = g.weight(stem, kernel, (3, 2, 0, 1), mul)
    pad = (size - 1) // 2
    y = g.op(
        "Conv", x, w, g.const(f"{stem}_bias", shift.astype(np.float32)),
        kernel_shape=[size, size], strides=[stride, stride], pads=[pad] * 4,
    )  # fmt: skip
    if residual is not None:
        y = g.op("Add", y, residual)
    return g.op("Relu", y) if relu else y


def _block_specs(model: Mapping) -> list[tuple[str, int, int]]:
    """(name, planes, stride) of each residual block, as ``models.ResNet`` names them."""
    return [
        (f"layer{i + 1}_{j}", model["width"] * 2**i, 2 if i > 0 and j == 0 else 1)
        for i, n in enumerate(model["stage_sizes"])
        for j in range(n)
    ]


def _resolved_model(model: Mapping) -> dict:
    """The config's model settings with the preset's fields filled in."""
    from sqjax import models

    if model["name"] not in models.PRESETS:
        raise ValueError(f"model {model['name']!r} is not a preset of sqjax.models.PRESETS")
    out = {"width": 32, "embed_dim": 256, "n_mels": 80, "pool_ddof": 0, "pool_eps": models.POOL_EPS}
    out.update(models.PRESETS[model["name"]])
    for k in ("n_mels", "embed_dim", "pool_ddof", "pool_eps"):
        if model.get(k) is not None:
            out[k] = model[k]
    if model.get("width"):
        out["width"] = model["width"]
    if model.get("stage_sizes"):
        out["stage_sizes"] = tuple(model["stage_sizes"])
    return out


def _frame_basis(spec: Mapping) -> tuple[np.ndarray, np.ndarray, int]:
    """``(kernel (2 * bins, 1, frame), filters (bins, n_mels), hop)`` of a model file's
    ``features``: the frame-to-spectrum map (real rows, then imaginary) and the mel filters,
    as ``sqjax.features`` computes them (float64, then float32)."""
    import librosa

    from sqjax import features

    sr, n_mels = int(spec["sample_rate"]), int(spec["n_mels"])
    n_fft, win, hop = features._frame_params(sr, spec["win_ms"], spec["hop_ms"])
    kind = spec.get("kind", "logmel")
    if kind == "logmel":  # frames of n_fft samples, the Hann window of win centred in them
        frame, bins = n_fft, n_fft // 2 + 1
        window = np.zeros(n_fft)
        lo = (n_fft - win) // 2
        window[lo : lo + win] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
        pre = np.diag(window)
        filters = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels).T
    elif kind == "kaldi":  # frames of win samples in int16 scale, no Nyquist bin
        frame, bins = win, n_fft // 2
        dc = np.eye(win) - 1.0 / win
        emph = np.eye(win) - 0.97 * np.eye(win, k=-1)
        emph[0, 0] -= 0.97  # the first sample's predecessor is itself
        hamming = 0.54 - 0.46 * np.cos(2 * np.pi * np.arange(win) / (win - 1))
        pre = 32768.0 * np.diag(hamming) @ emph @ dc
        filters = features._kaldi_mel_banks(n_mels, n_fft, sr)
    else:
        raise ValueError(f"features kind {kind!r}: expected 'logmel' or 'kaldi'")
    angle = 2 * np.pi * np.outer(np.arange(bins), np.arange(frame)) / n_fft
    kernel = np.concatenate([np.cos(angle) @ pre, -np.sin(angle) @ pre])
    return kernel[:, None, :].astype(np.float32), filters.astype(np.float32), hop


def _frontend(g: _Graph, spec: Mapping) -> str:
    """Nodes from the input ``wave`` ``(batch, samples)`` to mean-normalised features
    ``(batch, frames, n_mels)``: frames = 1 + (samples - frame) // hop, as sqjax's."""
    kernel, filters, hop = _frame_basis(spec)
    bins = kernel.shape[0] // 2
    x = g.op("Unsqueeze", "wave", g.const("axis1", np.array([1], np.int64)))  # (B, 1, S)
    y = g.op("Conv", x, g.const("frame_basis", kernel), strides=[hop])  # (B, 2 * bins, T)
    y = g.op("Reshape", g.op("Mul", y, y), g.const("b2ft", np.array([0, 2, bins, -1], np.int64)))
    power = g.op("ReduceSum", y, g.const("axis1", np.array([1], np.int64)), keepdims=0)
    mel = g.op("MatMul", g.op("Transpose", power, perm=[0, 2, 1]), g.const("mel", filters))
    if spec.get("kind", "logmel") == "kaldi":
        feats = g.op("Log", g.op("Max", mel, g.const("eps", np.finfo(np.float32).eps)))
    else:
        feats = g.op("Log", g.op("Add", mel, g.const("floor", np.float32(1e-6))))
    if spec.get("mean_norm", True):
        axis = g.const("time", np.array([1], np.int64))
        feats = g.op("Sub", feats, g.op("ReduceMean", feats, axis, keepdims=1))
    # sqjax.evaluate.extract_embeddings' cut of the normalised features, by two optional
    # inputs (initializers a caller may override; by default the features pass whole):
    # ``wrap_frames`` frames appended by repetition (an utterance under 100 frames), then
    # the frames ``[frame_span[0], frame_span[1])`` kept (a chunk cut to a length rung).
    zeros = g.const("zeros", np.zeros(4, np.int64))
    pads = g.op("Concat", zeros, WRAP_INPUT, g.const("zero", np.zeros(1, np.int64)), axis=0)
    feats = g.op("Pad", feats, pads, mode="wrap")
    first = g.op("Slice", SPAN_INPUT, g.const("i0", [0]), g.const("i1", [1]))
    end = g.op("Slice", SPAN_INPUT, g.const("i1", [1]), g.const("i2", [2]))
    feats = g.op("Slice", feats, first, end, g.const("time", np.array([1], np.int64)))
    g.nodes.append(helper.make_node("Identity", [feats], ["feats"]))  # a graph output
    g.inits += [
        numpy_helper.from_array(np.zeros(1, np.int64), WRAP_INPUT),
        numpy_helper.from_array(np.array([0, np.iinfo(np.int64).max], np.int64), SPAN_INPUT),
    ]
    return "feats"


def encoder_onnx(
    leaves: Leaves, metadata: Mapping, packing: str = "bits", frontend: bool = False
) -> onnx.ModelProto:
    """The ONNX model of the encoder ``leaves`` (``leaves_from_*``) described by
    ``metadata`` (a model file's: ``model``, ``features``, ``eval``, ``bits``).

    Input ``feats`` ``(batch, frames, n_mels)`` float32 (mean-normalised features);
    output ``embedding`` ``(batch, embed_dim)``. With ``frontend``: input ``wave``
    ``(batch, samples)`` float32 at the features' sample rate, outputs ``embedding`` and
    ``feats`` (the features sqjax computes of each row); two optional int64 inputs cut the
    features as sqjax's evaluation does: ``wrap_frames`` ``(1,)`` frames appended by
    repetition, then ``frame_span`` ``(2,)``, the frames kept (default: all).
    """
    model = _resolved_model(metadata["model"])
    missing = [k for k in (("params", "stem_conv", "kernel"), ("params", "embedding", "kernel"))
               if k not in leaves]  # fmt: skip
    if missing:
        raise ValueError(f"not sqjax ResNet encoder variables: no {missing}")
    g = _Graph(packing)
    p = ("params",)
    feats = _frontend(g, metadata["features"]) if frontend else "feats"
    x = g.op("Transpose", feats, perm=[0, 2, 1])  # (B, F, T): H = frequency, W = time
    x = g.op("Unsqueeze", x, g.const("axis1", np.array([1], np.int64)))
    x = _conv_bn(g, x, leaves, p, "stem_conv", "stem_bn")
    channels = model["width"]
    expansion = 4 if model["block"] == "bottleneck" else 1
    for name, planes, stride in _block_specs(model):
        scope, out = (*p, name), expansion * planes
        if stride == 1 and channels == out:
            short = x
        else:
            short = _conv_bn(
                g, x, leaves, scope, "shortcut_conv", "shortcut_bn", stride, relu=False
            )
        if expansion == 1:
            y = _conv_bn(g, x, leaves, scope, "conv1", "bn1", stride)
            x = _conv_bn(g, y, leaves, scope, "conv2", "bn2", residual=short)
        else:
            y = _conv_bn(g, x, leaves, scope, "conv1", "bn1")
            y = _conv_bn(g, y, leaves, scope, "conv2", "bn2", stride)
            x = _conv_bn(g, y, leaves, scope, "conv3", "bn3", residual=short)
        channels = out
    # Statistics pooling: (B, C, F', T') -> (B, T', C * F'), channel-major as models._head.
    x = g.op("Transpose", x, perm=[0, 3, 1, 2])
    x = g.op("Reshape", x, g.const("btf", np.array([0, 0, -1], np.int64)))
    axis = g.const("time", np.array([1], np.int64))
    mean = g.op("ReduceMean", x, axis, keepdims=0)
    centred = g.op("Sub", x, g.op("Unsqueeze", mean, axis))
    var = g.op("ReduceMean", g.op("Mul", centred, centred), axis, keepdims=0)
    if model["pool_ddof"]:
        t = g.op("Cast", g.op("Shape", x, start=1, end=2), to=TensorProto.FLOAT)
        ddof = g.const("ddof", np.float32(model["pool_ddof"]))
        denom = g.op("Max", g.op("Sub", t, ddof), g.const("one", np.float32(1.0)))
        var = g.op("Mul", var, g.op("Div", t, denom))
    std = g.op("Sqrt", g.op("Add", var, g.const("pool_eps", np.float32(model["pool_eps"]))))
    stats = g.op("Concat", mean, std, axis=-1)
    w = g.weight("embedding", leaves[(*p, "embedding", "kernel")], (1, 0))
    bias = g.const("embedding_bias", np.asarray(leaves[(*p, "embedding", "bias")], np.float32))
    g.nodes.append(helper.make_node("Gemm", [stats, w, bias], ["embedding"], transB=1))

    info = helper.make_tensor_value_info
    feats_info = info(feats, TensorProto.FLOAT, ["batch", "frames", model["n_mels"]])
    outputs = [info("embedding", TensorProto.FLOAT, ["batch", model["embed_dim"]])]
    if frontend:
        inputs = [
            info("wave", TensorProto.FLOAT, ["batch", "samples"]),
            info(WRAP_INPUT, TensorProto.INT64, [1]),
            info(SPAN_INPUT, TensorProto.INT64, [2]),
        ]
        outputs.append(feats_info)
    else:
        inputs = [feats_info]
    graph = helper.make_graph(g.nodes, "sqjax_encoder", inputs, outputs, g.inits)
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="sqjax"
    )
    proto.ir_version = 10  # onnxruntime >= 1.20 reads it
    meta = {**metadata, "onnx": {"packing": packing, "opset": OPSET, "frontend": frontend}}
    helper.set_model_props(proto, {_METADATA_KEY: json.dumps(meta)})
    onnx.checker.check_model(proto)
    return proto


def _save(proto: onnx.ModelProto, out: str | os.PathLike) -> Path:
    from sqjax.workdir import atomic_write

    out = Path(out)
    atomic_write(out, lambda f: f.write(proto.SerializeToString()))
    return out


def export_model_file(
    model_file: str | os.PathLike,
    out: str | os.PathLike | None = None,
    packing: str = "bits",
    frontend: bool = False,
) -> Path:
    """Writes the ONNX encoder of a ``sqjax export`` file (default: beside it, ``.onnx``),
    from the waveform with ``frontend``."""
    leaves, meta = leaves_from_model_file(model_file)
    if meta.get("kind") != "sqjax-encoder":
        raise ValueError(
            f"{model_file}: a packed file without model settings; write it with `sqjax export`"
        )
    out = Path(out) if out else Path(model_file).with_suffix(".onnx")
    return _save(encoder_onnx(leaves, meta, packing, frontend), out)


def export_variables(
    variables: Mapping,
    metadata: Mapping,
    out: str | os.PathLike,
    packing: str = "bits",
    frontend: bool = False,
) -> Path:
    """Writes the ONNX encoder of float encoder ``variables`` (e.g. an FP32 run's)."""
    leaves = leaves_from_variables(variables)
    return _save(encoder_onnx(leaves, metadata, packing, frontend), out)
