"""The cascade bundle (``sqjax export --cascade``) and its Verifier, run where JAX cannot
be imported, against the cascade's analysis path on the same claims."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from sqjax import builders, cli, evaluate, prepare, runs
from sqjax.analysis import calibration, cascade
from sqjax.deploy import commands
from sqjax.experiments import cascade as exp_cascade
from sqjax.experiments import precisions


def random_state(config, seed: int) -> builders.TrainState:
    """A train state holding random encoder variables of ``config``'s shapes (He-scaled
    kernels, BatchNorm statistics away from 0 and 1 so folding them matters): Flax's init
    compiles for ~20 s on this CPU, ``eval_shape`` traces in well under one."""
    encoder = builders.build_encoder(config)
    x = jax.ShapeDtypeStruct((2, config.train.n_frames, encoder.n_mels), jnp.float32)
    shapes = jax.eval_shape(lambda x: encoder.init(jax.random.key(0), x, train=False), x)
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            x = rng.normal(size=s.shape) * np.sqrt(2 / np.prod(s.shape[:-1]))
        elif "var" in name:
            x = rng.uniform(0.5, 1.5, s.shape)
        elif "scale" in name:
            x = rng.uniform(0.8, 1.2, s.shape)
        else:  # biases, BatchNorm shifts and means
            x = rng.normal(size=s.shape) * 0.1
        return jnp.asarray(x, s.dtype)

    v = jax.tree_util.tree_map_with_path(fill, shapes)
    return builders.TrainState(
        step=jnp.zeros((), jnp.int32), params={"encoder": v["params"]},
        batch_stats=v["batch_stats"], opt_state=(), qstate=(),
    )  # fmt: skip


@pytest.fixture(scope="module")
def stages(tiny_config, tmp_path_factory):
    """The tiny model at initialisation (no training: a bundle's decisions need no
    accuracy) and its PTQ cascade 2,4,32 from ``run_cascade``: ``(config, {name:
    variables}, out dir with cascade.json, the train state)``."""
    config = tiny_config.copy_and_resolve_references()
    config.eval.baseline = False
    config.eval.bootstrap.n_resamples = 20  # intervals are not what this file checks
    state = random_state(config, seed=0)
    variables = {"fp32": evaluate.encoder_variables(state)}
    for bits in (4, 2):
        variables[f"{bits}bit"] = runs.ptq_variables(config, state, bits)
    out = tmp_path_factory.mktemp("cascade")
    exp_cascade.run_cascade(config, variables, (2, 4, 32), out, tolerance=0.5)
    return config, variables, out, state


@pytest.fixture(scope="module")
def bundle(stages):
    """The bundle of the cascade: each stage's ONNX file from the state in memory (as
    ``sqjax export --cascade --workdir`` writes them from a run), then the manifest."""
    config, _, out, state = stages
    b = out / "bundle"
    b.mkdir()
    files = [
        commands.export_state_onnx(config, state, b / f"stage{p}_{name}.onnx", bits)
        for p, (name, bits) in enumerate((("2bit", 2), ("4bit", 4), ("fp32", 32)))
    ]
    commands.write_bundle(b, files, (2, 4, 32), out / "cascade.json", out)
    return out, b


def test_bundle_files(bundle):
    run, out = bundle
    m = json.loads((out / "manifest.json").read_text())
    result = json.loads((run / "cascade.json").read_text())
    assert m["format"] == "sqjax-cascade-bundle" and m["version"] == 1
    assert [s["name"] for s in m["stages"]] == result["stages"] == ["2bit", "4bit", "fp32"]
    assert [s["a"] for s in m["stages"]] == result["calibration"]["a"]
    assert [s["tau"] for s in m["stages"][:-1]] == result["chosen"]["taus"]
    assert m["eta"] == result["eta"]["value"]
    sizes = [(out / s["file"]).stat().st_size for s in m["stages"]]
    assert sizes[0] < sizes[1] < sizes[2]
    assert (out / "sqjax_runtime.py").is_file() and (out / "frontend.npz").is_file()


_NO_JAX = """
import importlib.abc, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("jax", "jaxlib", "flax", "sqjax"):
            raise ImportError(f"{name} is blocked in this test")
sys.meta_path.insert(0, Block())
try:
    import jax
except ImportError:
    pass
else:
    raise SystemExit("jax imported")
import numpy as np
sys.path.insert(0, sys.argv[1])
from sqjax_runtime import Verifier
v = Verifier(sys.argv[1])
z = np.load(sys.argv[2])
feats = {k: z[k] for k in z.files}
claims = json.loads(open(sys.argv[3]).read())
for e in sorted({e for e, _ in claims}):
    v.enroll(e, [feats[e]])
out = [v.verify(e, feats[t]) for e, t in claims]
print(json.dumps({"out": out, "jax": "jax" in sys.modules and sys.modules["jax"] is not None}))
"""


def test_verifier_without_jax_decides_as_the_analysis_path(stages, bundle, tmp_path):
    config, variables, run, _ = stages
    out = bundle[1]
    result = json.loads((run / "cascade.json").read_text())
    names = result["stages"]
    split = prepare.test_data(config)
    # The analysis path: every stage's scores from one batched pass, calibrated, decided.
    s = precisions.all_precision_scores(config, {n: variables[n] for n in names}, split)
    llr = calibration.Calibration(**result["calibration"]).apply(s)
    eta, taus = result["eta"]["value"], result["chosen"]["taus"]
    stage = cascade.decided_stage(llr, eta, taus)[0]
    want_llr = cascade.cascade_llrs(llr, stage[None])[0]

    utts = list(split.corpus.utts)
    np.savez(tmp_path / "feats.npz", **{u: split.feats[i] for i, u in enumerate(utts)})
    claims = [[str(e), str(t)] for e, t in zip(split.trials.enroll, split.trials.test)]
    (tmp_path / "claims.json").write_text(json.dumps(claims))
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_NO_JAX), str(out), str(tmp_path / "feats.npz"),
         str(tmp_path / "claims.json")],
        check=False, capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not got["jax"]
    accept, got_llr, got_stage = (np.array(x) for x in zip(*got["out"]))
    np.testing.assert_array_equal(got_stage, stage)
    np.testing.assert_allclose(got_llr, want_llr, atol=1e-4)
    np.testing.assert_array_equal(accept, want_llr >= eta)


def test_verify_command(bundle, tiny_config, tmp_path, capsys):
    """``sqjax verify`` from the audio (the bundle's NumPy front end): one line per claim,
    the count per stage, and the cascade's metrics."""
    _, out = bundle
    paths = prepare.resolve_paths(tiny_config)
    trials = [line.split() for line in Path(paths.test_trials).read_text().splitlines() if line]
    enroll = sorted({t[0] if t[0] not in ("0", "1") else t[1] for t in trials})
    (tmp_path / "enroll.txt").write_text("".join(f"{u} {u}\n" for u in enroll))
    capsys.readouterr()
    cli.main(["verify", "--bundle", str(out), "--data", paths.test, "--enroll",
              str(tmp_path / "enroll.txt"), "--claims", paths.test_trials])  # fmt: skip
    printed = capsys.readouterr().out
    assert sum(line.split()[2] in ("accept", "reject") for line in printed.splitlines()
               if len(line.split()) == 5) == len(trials)  # fmt: skip
    assert "claims decided per stage: 2bit" in printed and "eer" in printed
