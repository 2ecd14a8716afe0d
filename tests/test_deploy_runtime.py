"""``sqjax.deploy.runtime``: it imports without JAX, and its NumPy front end computes the
features of ``sqjax.features`` (librosa's log-mel, Kaldi's fbank)."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from sqjax import features
from sqjax.deploy import commands, runtime

_BLOCK_JAX = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("jax", "jaxlib", "flax", "optax", "librosa"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
import sqjax.deploy
from sqjax.deploy import Encoder, Verifier, runtime
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax", "optax"))
print("imported:", bad)
assert not bad
"""


def test_deploy_imports_without_jax():
    """``import sqjax.deploy`` (its ``__init__`` and ``runtime``) in a process where
    importing jax, flax, optax or librosa fails."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_BLOCK_JAX)],
        check=False, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    assert "imported: []" in proc.stdout


def _wave(n: int, seed: int) -> np.ndarray:
    """Noise plus two tones, at speech-like level (the front ends' log floors stay away)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    w = 0.05 * rng.standard_normal(n) + 0.3 * np.sin(2 * np.pi * 220 * t)
    return (w + 0.1 * np.sin(2 * np.pi * 3100 * t)).astype(np.float32)


SPEC = {"sample_rate": 16000, "win_ms": 25.0, "hop_ms": 10.0}


@pytest.mark.parametrize("n_mels", [40, 80])
@pytest.mark.parametrize("mean_norm", [True, False])
@pytest.mark.parametrize("n", [400, 512, 16000, 24321])
def test_logmel_front_end_matches_sqjax_features(n_mels, mean_norm, n):
    spec = {**SPEC, "n_mels": n_mels, "mean_norm": mean_norm, "kind": "logmel"}
    wave = _wave(n, n)
    if n < 512:  # logmel needs n_fft samples: both refuse it
        with pytest.raises(ValueError):
            runtime.features(wave, spec, commands.mel_filters(spec))
        return
    want = features.logmel(wave, 16000, n_mels, mean_norm=mean_norm)
    got = runtime.features(wave, spec, commands.mel_filters(spec))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)


@pytest.mark.parametrize("n_mels", [40, 80])
@pytest.mark.parametrize("mean_norm", [True, False])
@pytest.mark.parametrize("n", [400, 16000, 24321])
def test_kaldi_front_end_matches_sqjax_features(n_mels, mean_norm, n):
    spec = {**SPEC, "n_mels": n_mels, "mean_norm": mean_norm, "kind": "kaldi"}
    wave = _wave(n, n)
    want = features.kaldi_fbank(wave, 16000, n_mels, mean_norm=mean_norm)
    got = runtime.features(wave, spec)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-3, rtol=0)


def test_logmel_needs_the_filters():
    with pytest.raises(ValueError, match="mel filters"):
        runtime.features(_wave(16000, 0), {**SPEC, "n_mels": 80, "kind": "logmel"})
