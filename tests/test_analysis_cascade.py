"""The multi-precision cascade: decisions worked by hand, metrics against the scalar
functions, the deployment path against the analysis path, and a tau choice that never
sees the test labels."""

import numpy as np
import pytest

from sqjax import evaluate, metrics
from sqjax.analysis import cascade
from sqjax.experiments import cascade as cascade_cmd
from sqjax.experiments import precisions

# Three stages, four trials, eta = 0.
LLRS = np.array(
    [
        [3.0, 0.5, -2.0, 0.1],
        [2.0, 1.5, -0.2, -3.0],
        [1.0, -1.0, 1.0, -1.0],
    ]
)


def test_hand_built_three_stage_decisions():
    taus = [[1.0, 1.0], [np.inf, 1.0], [0.0, 5.0], [np.inf, np.inf]]
    stage = cascade.decided_stage(LLRS, 0.0, taus)
    np.testing.assert_array_equal(
        stage,
        [
            [0, 1, 0, 1],  # |3|, |-2| >= 1 at stage 0; 0.5 and 0.1 go on, decided at stage 1
            [1, 1, 2, 1],  # stage 0 escalates all; |-0.2| < 1 goes on to the last stage
            [0, 0, 0, 0],  # tau 0 decides everything at once
            [2, 2, 2, 2],  # all escalated: the last stage decides
        ],
    )
    np.testing.assert_array_equal(
        cascade.cascade_llrs(LLRS, stage)[:2], [[3.0, 1.5, -2.0, -3.0], [2.0, 1.5, 1.0, -3.0]]
    )
    f = cascade.stage_fractions(stage, 3)
    np.testing.assert_allclose(f[:2], [[0.5, 0.5, 0.0], [0.0, 0.75, 0.25]])
    np.testing.assert_allclose(cascade.reach_fractions(f)[1], [1.0, 1.0, 0.25])
    # Stage costs 1, 2, 10: row 0 pays 1 + 0.5 * 2; row 1 pays 1 + 2 + 0.25 * 10.
    res = cascade.evaluate_cascades(LLRS, [1, 1, 0, 0], 0.0, taus, [1.0, 2.0, 10.0])
    np.testing.assert_allclose(res["cost"], [2.0, 5.5, 1.0, 13.0])
    # Trial 1's enroll/test utterances: stage 1 needs the utterances of trials 1 and 3.
    enroll, test = np.array([0, 1, 2, 3]), np.array([4, 5, 4, 6])
    needed = cascade.embeddings_needed(stage, enroll, test, 7, 3)
    np.testing.assert_array_equal(needed[0], [7, 4, 0])
    np.testing.assert_array_equal(needed[1], [7, 7, 2])


def test_cascade_metrics_equal_the_scalar_metrics():
    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.3
    llrs = rng.normal(size=(3, 400)) + 2.5 * y
    taus = cascade.tau_grid(llrs, 0.0, n=5)
    assert taus.shape == (25, 2)
    res = cascade.evaluate_cascades(llrs, y, 0.0, taus, [1, 2, 3])
    out = cascade.cascade_llrs(llrs, res["stage"])
    for g in range(len(taus)):
        assert res["eer"][g] == pytest.approx(metrics.eer(out[g], y)[0], abs=1e-12)
        assert res["min_dcf@0.01"][g] == pytest.approx(metrics.min_dcf(out[g], y)[0], abs=1e-12)
        assert res["act_dcf@0.05"][g] == pytest.approx(metrics.act_dcf(out[g], y, 0.05))
        assert res["cllr"][g] == pytest.approx(metrics.cllr(out[g], y))


def test_taus_never_sit_on_a_margin():
    rng = np.random.default_rng(1)
    llrs = rng.normal(size=(2, 101))
    margins = np.abs(llrs[0] - 0.3)
    for t in cascade.tau_grid(llrs, 0.3, n=12)[:, 0]:
        assert not np.isin(t, margins)


def _fake_study(rng, n_utts=40, n_trials=600, dim=16, stages=3):
    """Per stage, embeddings = a speaker direction + stage-dependent noise (less at higher
    precision); trials over the utterances."""
    spk = rng.integers(0, 8, n_utts)
    base = rng.normal(size=(8, dim))[spk]
    emb = [base + (1.5 / (p + 1)) * rng.normal(size=(n_utts, dim)) for p in range(stages)]
    enroll = rng.integers(0, n_utts, n_trials)
    test = rng.integers(0, n_utts, n_trials)
    return [e.astype(np.float32) for e in emb], enroll, test, spk[enroll] == spk[test]


def test_deployment_makes_the_analysis_decisions_and_embeds_only_what_they_need():
    rng = np.random.default_rng(2)
    emb, enroll, test, _ = _fake_study(rng)
    scores = np.stack([evaluate.cosine_scores(e, enroll, test) for e in emb])
    llrs = 4.0 * scores - 1.0  # any affine calibration, the same on both paths
    taus = cascade.tau_grid(llrs, 0.0, n=6)[[7, 20, 33]]
    stages = cascade.decided_stage(llrs, 0.0, taus)
    needed = cascade.embeddings_needed(stages, enroll, test, len(emb[0]), 3)
    calls = []

    def embedder(p):
        def fn(ids):
            calls.append((p, len(ids)))
            return emb[p][ids]

        return fn

    for g, tau in enumerate(taus):
        calls.clear()
        caches = [{} for _ in range(3)]
        dep = cascade.deploy(
            [embedder(p) for p in range(3)], [(4.0, -1.0)] * 3, 0.0, tau, enroll, test, caches
        )
        np.testing.assert_array_equal(dep["stage"], stages[g])
        np.testing.assert_allclose(dep["llr"], cascade.cascade_llrs(llrs, stages)[g])
        np.testing.assert_array_equal(dep["embedded"], needed[g])
        assert sum(n for _, n in calls) == needed[g].sum()
        # A second batch of the same trials embeds nothing new: the caches hold them.
        again = cascade.deploy(
            [embedder(p) for p in range(3)], [(4.0, -1.0)] * 3, 0.0, tau, enroll, test, caches
        )
        assert again["embedded"].sum() == 0
        np.testing.assert_array_equal(again["stage"], stages[g])


def test_tau_is_chosen_without_the_test_labels():
    rng = np.random.default_rng(3)
    emb, enroll, test, y = _fake_study(rng, n_trials=800)
    emb_c, _, _, y_c = _fake_study(rng, n_trials=800)
    s = np.stack([evaluate.cosine_scores(e, enroll, test) for e in emb])
    s_c = np.stack([evaluate.cosine_scores(e, enroll, test) for e in emb_c])
    cost = {"macs": np.ones(3), "bitops": np.array([2.0, 8.0, 32.0]), "bytes": np.ones(3)}
    kw = {"enroll": enroll, "test": test, "tolerance": 0.1}
    a, _ = cascade.cascade_analysis(s_c, y_c, s, y, ["2bit", "8bit", "fp32"], cost, **kw)
    b, _ = cascade.cascade_analysis(
        s_c, y_c, s, rng.permutation(y), ["2bit", "8bit", "fp32"], cost, **kw
    )
    assert a["chosen"] is not None
    assert a["chosen"]["taus"] == b["chosen"]["taus"]
    assert a["chosen"]["fractions"] == b["chosen"]["fractions"]
    assert a["chosen"]["eer"] != b["chosen"]["eer"]  # the test metrics did use the labels
    # Chosen on calibration: within tolerance there, and the cheapest such grid point.
    assert a["chosen_cal"]["eer"] <= 1.1 * a["reference_cal"] + 1e-12
    # Relative bit-ops of the chosen cascade: reach-weighted stage costs over FP32's.
    reach = cascade.reach_fractions(np.array([a["chosen"]["fractions"]]))[0]
    assert a["chosen"]["rel_bitops"] == pytest.approx(reach @ cost["bitops"] / 32.0)
    assert a["systems"]["2bit"]["rel_bitops"] == pytest.approx(2 / 32)
    # A service's embeddings per claim: one at each stage reached (1 + the shares that
    # leave the first stage + those that leave the second), one for a stage alone.
    f = a["chosen"]["fractions"]
    assert a["chosen"]["embeddings_per_claim"] == pytest.approx(1 + (f[1] + f[2]) + f[2])
    assert a["systems"]["fp32"]["embeddings_per_claim"] == 1.0


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="taus must be"):
        cascade.decided_stage(LLRS, 0.0, [[1.0]])
    with pytest.raises(ValueError, match="metric 'auc'"):
        cascade.check_options("auc", 0.05, "bitops")
    with pytest.raises(ValueError, match="--stages"):
        cascade_cmd.stage_names([4, 2])
    with pytest.raises(ValueError, match="--stages"):
        cascade_cmd.stage_names([2, 16])
    assert cascade_cmd.stage_names([2, 4, 32]) == ["2bit", "4bit", "fp32"]


def test_cascade_of_a_trained_model_end_to_end(learned_run, tmp_path):
    """PTQ 2 -> 8 -> FP32 of a trained model: the deployment path decides every test trial
    as the analysis path did, embedding what it reported, and the files are written."""
    _, workdir, _ = learned_run
    config, variables = precisions.ptq_precisions(workdir, (8, 2))
    test_dir = str(config.data.synth_dir) + "/test"
    # Calibrating on the test trials is fine for this check (the choice is tested above).
    result = cascade_cmd.run_cascade(
        config,
        variables,
        (2, 8, 32),
        tmp_path,
        cal_data=test_dir,
        cal_trials=test_dir + "/trials",
        tolerance=0.2,
    )
    assert result["chosen"] is not None
    d = result["deployment"]
    assert d["same_decisions"]
    assert d["embedded"] == result["chosen"]["embedded"]
    assert d["embedded"][0] == d["utterances"] == 100
    assert result["storage_bytes"] == sum(result["model_bytes"].values())
    assert (
        result["model_bytes"]["2bit"]
        < result["model_bytes"]["8bit"]
        < result["model_bytes"]["fp32"]
    )
    lines = (tmp_path / "cascade_curve.csv").read_text().splitlines()
    assert len(lines) == 51 and lines[0].startswith("tau,frac_2bit,frac_8bit,frac_fp32")
    for name in ("tradeoff", "escalations"):
        assert (tmp_path / "figures" / f"cascade_{name}.png").stat().st_size > 10_000
    assert "cascade (tau from cal)" in cascade_cmd.format_cascade(result)
