"""Multi-host: two local processes joined by ``jax.distributed`` (CPU devices, gloo
collectives) train on streamed input, checkpoint, resume and evaluate together, and
match one process with the same global batch."""

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import chex
import numpy as np
import pytest

from sqjax import prepare, runs

# Process i of 2: one CPU device each, so the mesh spans both processes.
_WORKER = textwrap.dedent(
    """
    import json, sys
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2])
    )
    import ml_collections
    from sqjax import runs

    config = ml_collections.ConfigDict(json.loads(sys.argv[3]))
    result = runs.train_and_evaluate(config, sys.argv[4])
    assert jax.device_count() == 2 and jax.local_device_count() == 1
    print("RESULT " + json.dumps(result))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _two_processes(config, workdir) -> list[dict]:
    address = f"localhost:{_free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, address, str(i), config.to_json(), str(workdir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    results = []
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-4000:]
        line = next(l for l in out.splitlines() if l.startswith("RESULT "))
        results.append(json.loads(line.removeprefix("RESULT ")))
    return results


def _params(workdir):
    _, state, _ = runs.restore_run(workdir)
    return state.params, state.batch_stats


@pytest.fixture(scope="module")
def one_process(tiny_config, tmp_path_factory):
    """The reference: one process, two devices, on streamed input with augmentation
    (Grain crops, features and noise in the step); 4 steps, checkpoints at 2 and 4."""
    c = tiny_config.copy_and_resolve_references()
    c.train.num_steps, c.train.checkpoint_every, c.eval.baseline = 4, 2, False
    c.data.input, c.data.workers = "stream", 0
    c.data.augment.p_noise = c.data.augment.p_reverb = 0.5
    prepare.training_data(c), prepare.test_data(c)  # corpus and feature cache, made once
    workdir = tmp_path_factory.mktemp("multihost") / "one"
    return c, workdir, runs.train_and_evaluate(c, workdir)


def _like_one(one_dir, two_dir, one, two):
    """Two processes' run equals the one-process run: every process got the gathered
    scores, parameters and scores agree to float reduction order, metrics written once."""
    assert two[0] == two[1]
    # Same global batch on 1 x 2 and 2 x 1 devices: only float reduction order differs.
    chex.assert_trees_all_close(_params(one_dir), _params(two_dir), rtol=2e-4, atol=2e-5)
    assert abs(two[0]["eer"] - one["eer"]) <= 1 / 30  # at most one trial of 60 flips
    scores = [np.load(d / "scores_test.npz")["scores"] for d in (one_dir, two_dir)]
    np.testing.assert_allclose(scores[0], scores[1], atol=1e-4)
    rows = (two_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [2, 4]  # written once, by process 0


def test_two_processes_train_and_evaluate_like_one(one_process, tmp_path):
    c, one_dir, one = one_process
    two = _two_processes(c, tmp_path / "two")
    _like_one(one_dir, tmp_path / "two", one, two)


def test_two_processes_resume_a_one_process_run(one_process, tmp_path):
    # Killed after step 2's checkpoint, then resumed on two processes: the checkpoint is
    # read onto the other topology and training goes on as if never stopped.
    c, one_dir, one = one_process
    shutil.copytree(one_dir, tmp_path / "two")
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "4")
    for name in ("scores_test.npz", "metrics_test.json"):
        (tmp_path / "two" / name).unlink(missing_ok=True)
    resumed = _two_processes(c, tmp_path / "two")
    _like_one(one_dir, tmp_path / "two", one, resumed)
