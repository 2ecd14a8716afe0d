"""Pretrained WeSpeaker ResNets as sqjax runs.

``import_wespeaker`` reads a WeSpeaker ResNet state dict (``avg_model.pt``, or the same
tensors as ``.safetensors`` / ``.npz``) and writes a run directory (``config.json`` and an
orbax checkpoint at step 0) that ``eval``, ``ptq``, ``analyze``, ``layers``, ``grids`` and
``qat --config.quant.init_from=DIR`` take like a run trained here.

The two networks are the same function: WeSpeaker's input (B, 1, F, T) is our NHWC
(B, F, T, 1), so conv kernels only go OIHW -> HWIO and ``seg_1`` (out, in) -> (in, out);
both flatten the pooled map channel-major; BatchNorm has eps 1e-5 and momentum 0.1 (our
0.9). What differs is set in the run's config: statistics pooling with the unbiased
variance + 1e-7 (``model.pool_ddof``/``pool_eps``) and Kaldi fbank features
(``features.kind = "kaldi"``). ``projection.weight``, WeSpeaker's AAM head, becomes the
run's head; other heads are left out (QAT on other data starts a new head anyway).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import jax
import ml_collections
import numpy as np

from sqjax import builders, models
from sqjax import workdir as workdir_lib

log = logging.getLogger("sqjax")

SUFFIXES = (".pt", ".pth", ".safetensors", ".npz")
# WeSpeaker's TSTP pooling: torch.var (unbiased) + 1e-7 under the square root.
POOLING = {"pool_ddof": 1, "pool_eps": 1e-7}


class CheckpointError(ValueError):
    """A checkpoint that is not a WeSpeaker ResNet state dict sqjax can import."""


# ------------------------------------------------------------------------ reading files


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a state dict file as float32/int NumPy arrays, by name.

    ``.pt``/``.pth``: ``torch.load(weights_only=True)`` (never plain unpickling; needs
    PyTorch); ``.safetensors`` (needs ``safetensors``) and ``.npz`` need no PyTorch. A
    ``{"model": ...}`` or ``{"state_dict": ...}`` wrapper is unwrapped; a ``module.``
    prefix (DistributedDataParallel) is dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        tensors = _read_torch(path)
    elif suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError as err:
            raise CheckpointError(
                f"{path}: reading .safetensors needs the safetensors package "
                "(pip install safetensors)"
            ) from err
        try:
            tensors = load_file(str(path))
        except Exception as err:  # the Rust reader raises its own error types
            raise CheckpointError(f"{path}: not a readable .safetensors file ({err})") from err
    elif suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                tensors = {k: z[k] for k in z.files}
        except (OSError, ValueError) as err:
            raise CheckpointError(f"{path}: not a readable .npz file ({err})") from err
    else:
        raise CheckpointError(f"{path}: unknown checkpoint type; give one of {', '.join(SUFFIXES)}")
    return {k.removeprefix("module."): np.asarray(v) for k, v in tensors.items()}


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as err:
        raise CheckpointError(
            f"{path}: reading a PyTorch checkpoint needs torch (pip install torch), or save "
            "its state dict as .safetensors or .npz where torch is installed"
        ) from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and torch errors alike: not a checkpoint
        raise CheckpointError(
            f"{path}: not a PyTorch state dict torch.load(weights_only=True) can read ({err})"
        ) from err
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and set(obj) == {key}:
            obj = obj[key]
    if not (isinstance(obj, Mapping) and obj and all(torch.is_tensor(v) for v in obj.values())):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a state dict (a mapping of names "
            "to tensors, as WeSpeaker's avg_model.pt)"
        )
    return {k: v.detach().cpu().numpy() for k, v in obj.items()}


# ------------------------------------------------------------------ names and geometry


_MODULES = {
    "stem_conv": "conv1",
    "stem_bn": "bn1",
    "shortcut_conv": "shortcut.0",
    "shortcut_bn": "shortcut.1",
    "embedding": "seg_1",
}
_LEAVES = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}


def torch_name(path: tuple[str, ...]) -> str:
    """WeSpeaker's state-dict key of an encoder variable path, e.g. ``("layer2_0",
    "shortcut_conv", "kernel")`` -> ``layer2.0.shortcut.0.weight``."""
    *mods, leaf = path
    mods = [_MODULES.get(m, re.sub(r"^layer(\d)_(\d+)$", r"layer\1.\2", m)) for m in mods]
    return ".".join([*mods, _LEAVES[leaf]])


def to_torch(value: np.ndarray) -> np.ndarray:
    """Our array -> WeSpeaker's layout: conv kernels HWIO -> OIHW, dense (in, out) -> (out, in)."""
    if value.ndim == 4:
        return value.transpose(3, 2, 0, 1)
    return value.T if value.ndim == 2 else value


def from_torch(value: np.ndarray) -> np.ndarray:
    """WeSpeaker's layout -> ours (the inverse of ``to_torch``)."""
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    return value.T if value.ndim == 2 else value


def geometry(state: Mapping[str, np.ndarray], source: str = "checkpoint") -> dict:
    """``config.model`` settings of a WeSpeaker ResNet state dict, read off its shapes:
    preset name, ``stage_sizes``, ``width`` (m_channels), ``n_mels``, ``embed_dim``."""
    if "conv1.weight" not in state or "seg_1.weight" not in state:
        keys = ", ".join(sorted(state)[:6]) or "none"
        raise CheckpointError(
            f"{source}: not a WeSpeaker ResNet state dict (no conv1.weight and seg_1.weight; "
            f"its first keys: {keys})"
        )
    if any(k.startswith(("seg_2.", "seg_bn_1.")) for k in state):
        raise CheckpointError(
            f"{source}: a two_emb_layer=True model (seg_2); sqjax encoders have one embedding "
            "layer (WeSpeaker's ResNet configs use two_emb_layer: False)"
        )
    block = "bottleneck" if any(k.endswith(".conv3.weight") for k in state) else "basic"
    blocks = {
        tuple(map(int, m.groups())) for k in state if (m := re.match(r"layer(\d)\.(\d+)\.", k))
    }
    stages = tuple(sum(1 for i, _ in blocks if i == s) for s in (1, 2, 3, 4))
    width = int(state["conv1.weight"].shape[0])
    embed_dim, pooled = (int(n) for n in state["seg_1.weight"].shape)
    channels = 8 * width * (4 if block == "bottleneck" else 1)
    if not all(stages) or pooled % (2 * channels):
        raise CheckpointError(
            f"{source}: stages {stages} and seg_1 input {pooled} do not fit a WeSpeaker ResNet "
            f"of width {width} ({block} blocks)"
        )
    preset = next(
        (
            n
            for n, p in models.PRESETS.items()
            if p["block"] == block and p["stage_sizes"] == stages
        ),
        "resnet34" if block == "basic" else "resnet221",  # + stage_sizes: any depth
    )
    return {
        "name": preset,
        "stage_sizes": stages,
        "width": width,
        "n_mels": 8 * (pooled // (2 * channels)),  # three stride-2 stages: F / 8 rows left
        "embed_dim": embed_dim,
        **POOLING,
    }


def to_variables(
    state: Mapping[str, np.ndarray], encoder: models.ResNet, source: str = "checkpoint"
) -> dict:
    """``{"params", "batch_stats"}`` of ``encoder`` from a WeSpeaker state dict. Every
    encoder tensor must be there with its shape; keys left over (but ``projection.*`` and
    BatchNorm's ``num_batches_tracked``) are an error too, listed by name."""
    abstract = jax.eval_shape(
        lambda: encoder.init(jax.random.key(0), np.zeros((1, 200, encoder.n_mels), np.float32))
    )
    used = set()
    missing, shapes = [], []

    def take(path, leaf):  # path: (collection, module..., leaf)
        name = torch_name(tuple(k.key for k in path[1:]))
        used.add(name)
        if name not in state:
            missing.append(name)
            return np.zeros(leaf.shape, np.float32)
        value = from_torch(np.asarray(state[name], np.float32))
        if value.shape != leaf.shape:
            want = to_torch(np.empty(leaf.shape)).shape
            shapes.append(f"{name} {tuple(state[name].shape)} (expected {want})")
        return value

    variables = jax.tree_util.tree_map_with_path(take, abstract)
    extra = sorted(
        k
        for k in state
        if k not in used and not k.startswith("projection.") and "num_batches_tracked" not in k
    )
    problems = [
        f"{what}: {_listed(names, sep)}"
        for what, names, sep in (
            ("missing keys", missing, ", "),
            ("unexpected keys", extra, ", "),
            ("wrong shapes", shapes, "; "),
        )
        if names
    ]
    if problems:
        raise CheckpointError(
            f"{source}: does not match a WeSpeaker {encoder.block} ResNet with stages "
            f"{tuple(encoder.stage_sizes)} and width {encoder.width}: " + "; ".join(problems)
        )
    return {c: variables[c] for c in ("params", "batch_stats")}


def _listed(names: list[str], sep: str, most: int = 12) -> str:
    more = f"{sep}... ({len(names) - most} more)" if len(names) > most else ""
    return sep.join(names[:most]) + more


def to_state_dict(variables: Mapping) -> dict[str, np.ndarray]:
    """WeSpeaker's state dict (NumPy arrays) of encoder ``variables``: the inverse of
    ``to_variables``, e.g. to run a quantized encoder in WeSpeaker."""
    out = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in jax.tree_util.tree_leaves_with_path(variables[collection]):
            name = torch_name(tuple(k.key for k in path))
            out[name] = to_torch(np.asarray(leaf))
    return out


# ---------------------------------------------------------------------------- import


def import_wespeaker(
    checkpoint: str | Path,
    out: str | Path,
    *,
    model: str | None = None,
    data: str = "",
    trials: str = "",
) -> ml_collections.ConfigDict:
    """Writes the WeSpeaker ResNet ``checkpoint`` as a sqjax run directory ``out`` (which
    must not exist or be empty) and returns its config.

    ``model``: the preset the checkpoint should be (``resnet34``, ``resnet221``, ...);
    a checkpoint of another depth is refused. ``data``/``trials`` become the run's test
    set (``sqjax eval --workdir OUT`` scores it). Also writes ``wespeaker.json``: the
    source file, its SHA-256 and the keys left out.
    """
    from sqjax.config import default_config

    checkpoint, out = Path(checkpoint), Path(out)
    # The writer's lock (``sqjax.workdir.lock``) may be there already.
    if out.exists() and any(p.name != workdir_lib.LOCK_FILE for p in out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; give a new --out directory")
    state = read_state_dict(checkpoint)
    geo = geometry(state, str(checkpoint))
    if model is not None:
        if model not in models.PRESETS:
            raise ValueError(f"--model {model!r}: choose one of {sorted(models.PRESETS)}")
        want, have = models.PRESETS[model], models.PRESETS[geo["name"]]
        if (want["block"], want["stage_sizes"]) != (have["block"], geo["stage_sizes"]):
            raise CheckpointError(
                f"{checkpoint}: a ResNet with {geo['stage_sizes']} blocks per stage, not "
                f"--model {model} ({want['stage_sizes']}); leave --model out to take its own"
            )
        geo["name"] = model
    config = default_config()
    config.model.update(geo)
    config.features.kind = "kaldi"
    config.data.test, config.data.test_trials = data, trials
    head_w = state.get("projection.weight")
    heads = [k for k in state if k.startswith("projection.")]
    keep_head = heads == ["projection.weight"] and head_w.shape[1:] == (geo["embed_dim"],)
    config.head.num_classes = int(head_w.shape[0]) if keep_head else 1
    encoder = builders.build_encoder(config)
    variables = to_variables(state, encoder, str(checkpoint))
    head, tx = builders.build_head(config), builders.make_optimizer(config)
    fresh = builders.create_train_state(jax.random.key(0), encoder, head, tx, config.train.n_frames)
    head_params = (
        {"kernel": np.asarray(head_w, np.float32).T} if keep_head else fresh.params["head"]
    )
    params = {"encoder": variables["params"], "head": head_params}
    # Same shapes as ``fresh``'s, so its optimizer state (zeros) stays valid.
    run = fresh.replace(params=params, batch_stats=variables["batch_stats"])
    left_out = sorted(
        k for k in state if "num_batches_tracked" in k or (k in heads and not keep_head)
    )
    import orbax.checkpoint as ocp

    with workdir_lib.checkpoint_manager(out, keep=1) as mngr:
        mngr.save(0, args=ocp.args.StandardSave(run))
        mngr.wait_until_finished()
    workdir_lib.write_json(
        out / "wespeaker.json",
        {
            "source": str(checkpoint.absolute()),
            "sha256": hashlib.sha256(checkpoint.read_bytes()).hexdigest(),
            "model": geo,
            "head": f"projection.weight ({config.head.num_classes} speakers)"
            if keep_head
            else None,
            "left_out": left_out,
        },
    )
    workdir_lib.write_json(out / "config.json", json.loads(config.to_json()))  # last: complete
    log.info(
        "imported %s: WeSpeaker %s ResNet %s x%d, %d mels, %d-dim embedding -> %s",
        checkpoint,
        encoder.block,
        geo["stage_sizes"],
        geo["width"],
        geo["n_mels"],
        geo["embed_dim"],
        out,
    )
    return config
