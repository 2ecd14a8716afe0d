"""The ONNX front end (``sqjax export --with-frontend``) against NumPy features + ONNX.

    python bench/bench_frontend.py [--seconds 3] [--repeats 30]

Builds the demo preset's encoder (configs/demo.py; random weights: speed does not depend
on training) for each feature kind, and times, per utterance on one thread, the mean of
``--repeats`` runs after a warm-up:
- wave -> embedding in one graph (features computed by its strided ``Conv`` and mel
  ``MatMul``);
- ``sqjax_runtime.features`` (NumPy FFT) then the features-input graph;
- the NumPy features alone.
It also prints the largest difference between the graph's features and sqjax's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import librosa
import numpy as np

from sqjax import features, runs
from sqjax.config import load_config
from sqjax.deploy import onnx_export, runtime

ROOT = Path(__file__).parents[1]


def _wave(seconds: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    t = np.arange(int(16000 * seconds)) / 16000
    x = 0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))
    return (x + 0.05 * rng.normal(size=t.size)).astype(np.float32)


def _random_variables(config) -> dict:
    import jax
    import jax.numpy as jnp

    from sqjax import builders

    enc = builders.build_encoder(config)
    return enc.init(jax.random.key(0), jnp.zeros((1, 120, enc.n_mels)))


def _mean_ms(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def _one_kind(config, variables, wave: np.ndarray, stem: Path, repeats: int) -> str:
    kind = config.features.kind
    meta = runs._model_metadata(config, 32, stem.parent)
    spec = meta["features"]
    with_fe = onnx_export.export_variables(variables, meta, f"{stem}_w.onnx", frontend=True)
    plain = onnx_export.export_variables(variables, meta, f"{stem}.onnx")
    graph, numpy_path = runtime.Encoder(with_fe, threads=1), runtime.Encoder(plain, threads=1)
    mel = librosa.filters.mel(sr=16000, n_fft=512, n_mels=spec["n_mels"])
    extract = features.logmel if kind == "logmel" else features.kaldi_fbank
    want = extract(wave, n_mels=spec["n_mels"])
    got = graph.session.run(["feats"], {"wave": wave[None]})[0][0]
    t_graph = _mean_ms(lambda: graph.run(wave[None]), repeats)
    t_numpy = _mean_ms(lambda: numpy_path.run(runtime.features(wave, spec, mel)[None]), repeats)
    t_feats = _mean_ms(lambda: runtime.features(wave, spec, mel), repeats)
    return (
        f"{kind:>6}: graph {t_graph:6.2f} ms, NumPy features + graph {t_numpy:6.2f} ms "
        f"({t_graph / t_numpy:.2f}x), NumPy features alone {t_feats:5.2f} ms; "
        f"features differ from sqjax's by at most {np.abs(got - want).max():.1e}"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    config = load_config(str(ROOT / "configs/demo.py"))
    variables = _random_variables(config)
    wave = _wave(args.seconds)
    tmp = Path(tempfile.mkdtemp())
    for kind in ("logmel", "kaldi"):
        config.features.kind = kind
        print(_one_kind(config, variables, wave, tmp / kind, args.repeats))


if __name__ == "__main__":
    main()
