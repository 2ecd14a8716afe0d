"""Training: the step's maths, data parallelism, exact resume, and QAT.

The runs use configs/tiny.py on a tiny synthetic corpus built once per session.
"""

import functools
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sqjax import builders, metrics, models, prepare, runs, train, workdir
from sqjax.experiments import qat_study


def _params(workdir):
    _, state, _ = runs.restore_run(workdir)
    return state.params, state.batch_stats


def _assert_trees(a, b, **tol):
    if tol:
        chex.assert_trees_all_close(a, b, **tol)
    else:
        chex.assert_trees_all_equal(a, b)


def test_margin_warmup():
    assert float(train.margin_at(jnp.array(0), 0.2, 10)) == 0.0
    assert abs(float(train.margin_at(jnp.array(5), 0.2, 10)) - 0.1) < 1e-7
    assert abs(float(train.margin_at(jnp.array(50), 0.2, 10)) - 0.2) < 1e-7
    assert abs(float(train.margin_at(jnp.array(0), 0.2, 0)) - 0.2) < 1e-7


def test_microbatches_equal_full_batch_when_chunks_are_identical():
    # Chunk c holds examples c, c+m, ...: with each example repeated m times in a row,
    # every chunk equals the de-duplicated batch, so BatchNorm statistics, loss and
    # gradients -- and the running-statistics update -- must equal the single-chunk step
    # on that batch.
    encoder = models.build_encoder("resnet_tiny", embed_dim=8)
    head = models.AAMSoftmax(num_classes=3, scale=8.0)
    tx = optax.sgd(0.1)
    state = builders.create_train_state(jax.random.key(0), encoder, head, tx, 40)
    rng = np.random.default_rng(0)
    small = {
        "feats": jnp.asarray(rng.normal(size=(4, 40, 80)), jnp.float32),
        "labels": jnp.array([0, 1, 2, 1], jnp.int32),
    }
    doubled = jax.tree.map(lambda x: jnp.repeat(x, 2, axis=0), small)
    kw = {"encoder": encoder, "head": head, "tx": tx, "margin": 0.2, "margin_warmup_steps": 0}
    # Jitted as train.train runs it (op by op it took 50 s, nearly all dispatch).
    one, m1 = jax.jit(functools.partial(train.train_step, **kw))(state, small)
    two, m2 = jax.jit(functools.partial(train.train_step, microbatches=2, **kw))(state, doubled)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    _assert_trees(one.params, two.params, rtol=1e-4, atol=1e-6)
    _assert_trees(one.batch_stats, two.batch_stats, rtol=1e-4, atol=1e-6)


def test_one_and_two_devices_train_the_same(tiny_config, tmp_path):
    assert jax.device_count() >= 2, "conftest sets two simulated CPU devices"
    for n in (1, 2):
        c = tiny_config.copy_and_resolve_references()
        c.num_devices, c.train.num_steps = n, 4
        runs.train_and_evaluate(c, tmp_path / f"dev{n}")
    p1, s1 = _params(tmp_path / "dev1")
    p2, s2 = _params(tmp_path / "dev2")
    # Same global batch; only the order of float reductions differs.
    _assert_trees(p1, p2, rtol=2e-4, atol=2e-5)
    _assert_trees(s1, s2, rtol=2e-4, atol=2e-5)


def test_interrupted_run_resumes_exactly(tiny_config, tmp_path):
    c = tiny_config.copy_and_resolve_references()
    c.train.num_steps, c.train.checkpoint_every = 6, 3
    result = runs.train_and_evaluate(c, tmp_path)
    full = _params(tmp_path)
    # As if killed after step 3's checkpoint: the step-6 checkpoint never got written.
    shutil.rmtree(tmp_path / "checkpoints" / "6")
    resumed = runs.train_and_evaluate(c, tmp_path)
    _assert_trees(full, _params(tmp_path))
    assert resumed["eer"] == result["eer"]
    steps = [
        int(line.split('"step": ')[1].split(",")[0].rstrip("}"))
        for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [2, 4, 6]  # log_every=2: the same rows as without the interruption
    c.train.log_every, c.eval.batch_size = 3, 4  # may change: the parameters do not
    assert runs.train_and_evaluate(c, tmp_path)["eer"] == result["eer"]
    c.train.learning_rate = 0.5
    with pytest.raises(ValueError, match="changed: train.learning_rate"):
        runs.train_and_evaluate(c, tmp_path)


def test_qat_study_trains_on_codebook_and_resumes(tiny_config, tmp_path):
    c = tiny_config.copy_and_resolve_references()
    c.train.num_steps = 4
    c.quant.bits_list, c.quant.num_steps = (2,), 4
    c.train.checkpoint_every, c.quant.refresh_every = 2, 2
    rows = qat_study.quantization_study(c, tmp_path)
    assert set(rows) == {"fp32", "2bit"}
    config, state, quantizer = runs.restore_run(tmp_path / "2bit")
    assert config.quant.bits == 2 and int(state.step) == 4
    qparams = quantizer.apply(state.params["encoder"], state.qstate)
    for path, w in jax.tree_util.tree_leaves_with_path(qparams):
        if jax.tree_util.keystr(path).endswith("['kernel']"):
            assert len(np.unique(np.asarray(w))) <= 4, path
    # The latent weights moved away from the FP32 start (STE gradients reached them).
    _, fp32, _ = runs.restore_run(tmp_path / "fp32")
    moved = jax.tree.map(
        lambda a, b: float(jnp.abs(a - b).max()), state.params["encoder"], fp32.params["encoder"]
    )
    assert max(jax.tree.leaves(moved)) > 0
    # No refresh after the last step: the saved codebooks are those refreshed before step
    # 3 from the step-2 weights, the ones the last two steps (and their BatchNorm
    # statistics) ran with.
    _, state2, _ = runs.restore_run(tmp_path / "2bit", step=2)
    used = quantizer.update(state2.params["encoder"], state2.qstate)
    _assert_trees(used, state.qstate, rtol=1e-6, atol=1e-6)  # jit vs eager rounding
    # The evaluated network is that model: its EER is the one of these variables.
    variables = {"params": qparams, "batch_stats": state.batch_stats}
    scores = runs.score_variables(config, variables, prepare.test_data(config))
    labels = prepare.test_data(config).trials.labels
    assert rows["2bit"]["eer"] == pytest.approx(metrics.eer(scores, labels)[0])

    # A study grows: another width trains only that width's run.
    before = (tmp_path / "2bit" / "metrics.jsonl").read_text()
    c.quant.bits_list = (2, 1)
    rows = qat_study.quantization_study(c, tmp_path)
    assert set(rows) == {"fp32", "2bit", "1bit"}
    assert (tmp_path / "2bit" / "metrics.jsonl").read_text() == before
    assert int(runs.restore_run(tmp_path / "1bit")[1].step) == 4

    full = state
    shutil.rmtree(tmp_path / "2bit" / "checkpoints" / "4")
    runs.train_and_evaluate(workdir.load_run_config(tmp_path / "2bit"), tmp_path / "2bit")
    _, again, _ = runs.restore_run(tmp_path / "2bit")
    _assert_trees((full.params, full.qstate), (again.params, again.qstate))


def test_reestimated_batch_stats_are_the_mean_of_batch_moments():
    # Reference: the stem conv's output for each batch (captured), its per-channel mean
    # and biased variance in NumPy, averaged over the batches.
    encoder = models.build_encoder("resnet_tiny", embed_dim=8)
    x0 = jnp.zeros((2, 40, 80))
    variables = encoder.init(jax.random.key(0), x0, train=False)
    rng = np.random.default_rng(0)
    batches = [jnp.asarray(rng.normal(size=(3, 40, 80)) + i, jnp.float32) for i in range(3)]
    stats = train.reestimate_batch_stats(encoder, variables, batches)
    means, variances = [], []
    for x in batches:
        _, inter = encoder.apply(
            variables, x, train=False, capture_intermediates=lambda m, _: m.name == "stem_conv"
        )
        h = np.asarray(inter["intermediates"]["stem_conv"]["__call__"][0], np.float64)
        h = h.reshape(-1, h.shape[-1])
        means.append(h.mean(0))
        variances.append(h.var(0))
    np.testing.assert_allclose(stats["stem_bn"]["mean"], np.mean(means, 0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(stats["stem_bn"]["var"], np.mean(variances, 0), rtol=1e-3, atol=1e-5)
    assert jax.tree.structure(stats) == jax.tree.structure(variables["batch_stats"])


def test_learned_centroids_are_trained_and_kept_by_refresh(tiny_config, tmp_path):
    c = tiny_config.copy_and_resolve_references()
    c.train.num_steps = 2
    runs.train_and_evaluate(c, tmp_path / "fp32")
    _, fp32, _ = runs.restore_run(tmp_path / "fp32")
    q = qat_study.qat_run_config(c, 2, tmp_path / "fp32")
    q.quant.learn_centroids, q.quant.refresh_every, q.train.num_steps = True, 100, 3
    q.train.learning_rate = 1e-2
    runs.train_and_evaluate(q, tmp_path / "learn")
    _, state, quantizer = runs.restore_run(tmp_path / "learn")
    start = quantizer.init(fp32.params["encoder"])
    moved = [
        float(np.abs(a - b).max())
        for a, b in zip(jax.tree.leaves(state.qstate), jax.tree.leaves(start))
    ]
    assert min(moved) > 0  # every codebook was trained (no refresh ran)


def test_streamed_run_with_augmentation_resumes_exactly(tiny_config, tmp_path):
    # data.input="stream": audio crops read per step, log-mel and augmentation (synthetic
    # noises and impulse responses) in the jitted step; resume is still exact.
    c = tiny_config.copy_and_resolve_references()
    c.data.input, c.data.workers = "stream", 0
    c.data.augment.p_noise = c.data.augment.p_reverb = 0.5
    c.train.num_steps, c.train.checkpoint_every = 4, 2
    result = runs.train_and_evaluate(c, tmp_path)
    assert np.isfinite(result["eer"])
    full = _params(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "4")
    runs.train_and_evaluate(c, tmp_path)
    _assert_trees(full, _params(tmp_path))
    # PTQ re-estimates BatchNorm on crops of the audio (no feature extraction of the
    # training set): the statistics move off the FP32 ones.
    config, state, _ = runs.restore_run(tmp_path)
    data = prepare.training_input(config)
    assert data.raw_feats is None
    variables = runs.ptq_variables(config, state, 2)
    stats = runs.reestimated_variables(config, variables, data, 16)["batch_stats"]
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), stats, state.batch_stats)
    assert min(jax.tree.leaves(moved)) > 0
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(stats))
    c.data.input = "cache"
    with pytest.raises(ValueError, match="changed: data.input"):
        runs.train_and_evaluate(c, tmp_path)
