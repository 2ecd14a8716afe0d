"""The cascade bundle (``sqjax export --cascade``) and its Verifier, run where JAX cannot
be imported, against the cascade's analysis path on the same claims."""

import io
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from sqjax import cli, prepare
from sqjax.analysis import calibration, cascade
from sqjax.experiments import precisions

pytest.importorskip("onnxruntime")

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.fixture(scope="module")
def bundle(tiny_config, tmp_path_factory):
    """A tiny FP32 run, its PTQ cascade 2,4,32 and the bundle of it."""
    run = tmp_path_factory.mktemp("run")
    synth = tiny_config.data.synth_dir
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("sys.stdout", io.StringIO())
        cli.main(["train", "--config", str(CONFIGS / "tiny.py"), "--workdir", str(run),
                  f"--config.data.synth_dir={synth}", "--config.progress=False",
                  "--config.data.synth_args.workers=1", "--config.train.num_steps=2",
                  "--config.eval.baseline=False"])  # fmt: skip
        cli.main(["cascade", "--workdir", str(run), "--ptq", "2,4", "--stages", "2,4,32",
                  "--tolerance", "0.5"])  # fmt: skip
        out = run / "bundle"
        cli.main(["export", "--cascade", "--workdir", str(run), "--stages", "2,4,32",
                  "--out", str(out)])  # fmt: skip
    return run, out


def test_bundle_files(bundle):
    run, out = bundle
    m = json.loads((out / "manifest.json").read_text())
    result = json.loads((run / "cascade" / "cascade.json").read_text())
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


def test_verifier_without_jax_decides_as_the_analysis_path(bundle, tmp_path):
    run, out = bundle
    result = json.loads((run / "cascade" / "cascade.json").read_text())
    config, variables = precisions.ptq_precisions(run, (2, 4))
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
