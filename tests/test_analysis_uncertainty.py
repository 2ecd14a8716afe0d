"""Bootstrap intervals, paired differences, flip tests and verdicts, against independent
references: trial lists with duplicated trials scored by ``sqjax.metrics``,
``scipy.stats.bootstrap``, binomials worked by hand, and coverage on simulated speakers
whose population EER is known in closed form."""

import math

import numpy as np
import pytest
from scipy import stats

from sqjax import metrics
from sqjax.analysis import scores as scores_lib
from sqjax.analysis import uncertainty as u


def _trials(rng, n_speakers, n_trials, tied=False):
    a = rng.integers(0, n_speakers, n_trials)
    y = rng.random(n_trials) < 0.5
    b = np.where(y, a, (a + 1 + rng.integers(0, n_speakers - 1, n_trials)) % n_speakers)
    s = rng.normal(2.0 * y, 1.0)
    return (np.round(s, 1) if tied else s), y, a, b


@pytest.mark.parametrize("level", ["speaker", "trial"])
def test_resample_equals_the_trial_list_with_duplicated_trials(level):
    rng = np.random.default_rng(0)
    s, y, a, b = _trials(rng, 30, 1500, tied=True)  # ties: one operating point per score
    llr = 1.7 * s - 2.5
    boot = u.bootstrap(y, a, b, level=level, n_resamples=6, seed=3)
    got = u.resample_metrics(boot, np.stack([s, -s]), y, llrs=np.stack([llr, llr]))
    names = u.metric_names()
    for r in range(boot.n_resamples):
        if level == "speaker":
            c = boot.counts[r]
            w = np.where(y, c[a], c[a] * c[b])  # the documented weights, written out
        else:
            w = boot.counts[r]
        ss, yy, ll = np.repeat(s, w), np.repeat(y, w), np.repeat(llr, w)
        ref = [
            metrics.eer(ss, yy)[0],
            metrics.min_dcf(ss, yy, 0.01)[0],
            metrics.min_dcf(ss, yy, 0.05)[0],
            metrics.act_dcf(ll, yy, 0.01),
            metrics.act_dcf(ll, yy, 0.05),
            metrics.cllr(ll, yy),
        ]
        np.testing.assert_allclose([got[k][r, 0] for k in names], ref, rtol=1e-12, atol=1e-12)
        assert got["eer"][r, 1] == pytest.approx(metrics.eer(-ss, yy)[0], abs=1e-12)


def test_speaker_counts_are_multinomial_draws_of_all_speakers():
    rng = np.random.default_rng(1)
    _, y, a, b = _trials(rng, 25, 800)
    boot = u.bootstrap(y, a, b, n_resamples=400, seed=0)
    assert boot.counts.shape == (400, 25)
    assert (boot.counts.sum(axis=1) == 25).all()
    # each speaker drawn Binomial(25, 1/25) times: mean 1, variance 24/25
    assert boot.counts.mean() == pytest.approx(1.0, abs=0.03)
    assert boot.counts.var() == pytest.approx(24 / 25, rel=0.1)
    same = u.bootstrap(y, a, b, n_resamples=400, seed=0)
    np.testing.assert_array_equal(same.counts, boot.counts)


@pytest.mark.parametrize("method", ["percentile", "bca"])
def test_trial_level_interval_matches_scipy_bootstrap(method):
    rng = np.random.default_rng(2)
    s, y, _, _ = _trials(rng, 10, 300)
    boot = u.bootstrap(y, level="trial", n_resamples=4000, seed=0)
    res = u.compare(s[None], y, ["sys"], boot, method=method)
    lo, hi = res["systems"]["sys"]["eer_ci"]
    ref = stats.bootstrap(
        (s, y),
        lambda s, y: metrics.eer(s, y)[0],
        paired=True,
        vectorized=False,
        n_resamples=4000,
        method="BCa" if method == "bca" else "percentile",
        rng=np.random.default_rng(5),
    ).confidence_interval
    width = ref.high - ref.low
    assert abs(lo - ref.low) < 0.12 * width and abs(hi - ref.high) < 0.12 * width


def test_identical_systems_differ_by_exactly_zero():
    rng = np.random.default_rng(3)
    s, y, a, b = _trials(rng, 20, 600)
    boot = u.bootstrap(y, a, b, n_resamples=50)
    res = u.compare(np.stack([s, s]), y, ["a", "b"], boot, llrs=np.stack([s - 1, s - 1]))
    row = res["systems"]["b"]
    for m in u.metric_names():
        assert row["delta_" + m] == 0.0
        assert row["delta_" + m + "_ci"] == [0.0, 0.0]


def _speaker_sets(n_sets, n_speakers=40, tar_per_spk=10, non_per_spk=20, seed=0):
    """Score sets from a speaker-effects model: target = 2 + u_s + e, non-target = v_a +
    v_b + e. The population EER is that of N(2, su^2 + se^2) against N(0, 2 sv^2 + se^2)."""
    su, sv, se = 0.6, 0.4, 0.4
    sd_t, sd_n = math.hypot(su, se), math.sqrt(2 * sv**2 + se**2)
    true_eer = stats.norm.cdf(-2.0 / (sd_t + sd_n))  # where the two error rates meet
    rng = np.random.default_rng(seed)
    for _ in range(n_sets):
        us, vs = rng.normal(0, su, n_speakers), rng.normal(0, sv, n_speakers)
        at = np.repeat(np.arange(n_speakers), tar_per_spk)
        an = np.repeat(np.arange(n_speakers), non_per_spk)
        bn = (an + 1 + rng.integers(0, n_speakers - 1, an.size)) % n_speakers
        s = np.concatenate(
            [2 + us[at] + rng.normal(0, se, at.size), vs[an] + vs[bn] + rng.normal(0, se, an.size)]
        )
        y = np.r_[np.ones(at.size, bool), np.zeros(an.size, bool)]
        yield s, y, np.r_[at, an], np.r_[at, bn], true_eer


def test_speaker_bootstrap_covers_the_true_eer_and_the_trial_bootstrap_does_not():
    hits = {"speaker": 0, "trial": 0}
    n = 200
    for i, (s, y, a, b, true_eer) in enumerate(_speaker_sets(n)):
        for level in hits:
            boot = u.bootstrap(y, a, b, level=level, n_resamples=300, seed=i)
            samples = u.resample_metrics(boot, s[None], y, p_targets=())["eer"][:, 0]
            lo, hi = u.interval(samples, metrics.eer(s, y)[0])
            hits[level] += lo <= true_eer <= hi
    assert 0.90 <= hits["speaker"] / n <= 0.99, hits
    assert hits["trial"] / n < 0.85, hits


def test_mcnemar_matches_the_binomial_by_hand():
    # 7 harmful against 2 beneficial: P(X >= 7 or X <= 2), X ~ Binomial(9, 1/2)
    tail = sum(math.comb(9, k) for k in (7, 8, 9)) / 2**9
    assert u.mcnemar(7, 2)["p_value"] == pytest.approx(2 * tail)
    assert u.mcnemar(7, 2)["n_discordant"] == 9
    assert u.mcnemar(0, 0)["p_value"] == 1.0
    assert u.mcnemar(5, 5)["p_value"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="flip counts"):
        u.mcnemar(-1, 2)


def test_flip_tests_against_the_flip_table():
    rng = np.random.default_rng(4)
    s, y, a, b = _trials(rng, 30, 3000)
    s_b = s + rng.normal(0, 0.3, s.size)  # a perturbation of the kind the null draws
    theta = metrics.eer(s, y)[1]
    boot = u.bootstrap(y, a, b, n_resamples=200)
    res = u.flip_tests(s_b, s, y, theta, boot, n_null=30)
    table = scores_lib.flips(s_b, s, y, theta)
    assert res["mcnemar"]["harmful"] == table["harmful"]
    assert res["mcnemar"]["beneficial"] == table["beneficial"]
    assert res["net_harmful_rate"] == pytest.approx(
        (table["harmful"] - table["beneficial"]) / s.size
    )
    lo, hi = res["net_harmful_rate_ci"]
    assert lo <= res["net_harmful_rate"] <= hi
    share = scores_lib.harmful_share_nearest(s_b, s, y, theta, 0.1)
    assert res["share_nearest"] == pytest.approx(share)
    # noise of the drift's spread is what the null is made of: the observed share lies
    # within the null's spread, and both are far above the 10% of trials they cover
    nlo, nhi = res["null_share_nearest_range"]
    assert nlo - 0.1 <= share <= nhi + 0.1
    assert res["null_share_nearest"] > 0.3


def test_knee_stability_counts_kneedle_per_resample():
    bits = [32, 8, 4, 3, 2, 1]
    sharp = np.array([0.04, 0.04, 0.041, 0.042, 0.05, 0.30])
    rng = np.random.default_rng(5)
    eer = sharp + rng.normal(0, 0.0005, (50, 6))
    drift = np.array([0, 0.01, 0.02, 0.03, 0.06, 0.4]) + rng.normal(0, 0.004, (50, 6))
    res = u.knee_stability(bits, {"eer": eer, "drift": drift})
    assert res["n"] == 50
    knees = {
        k: [scores_lib.knee(bits, row)["knee"] for row in x]
        for k, x in [("eer", eer), ("drift", drift)]
    }
    for k, found in knees.items():
        for width, share in res[k]["share"].items():
            want = sum((str(e) if e is not None else "none") == width for e in found) / 50
            assert share == pytest.approx(want)
        assert sum(res[k]["share"].values()) == pytest.approx(1.0)
    both = sum(e == d == 2 for e, d in zip(knees["eer"], knees["drift"])) / 50
    assert res["joint"].get("2", 0.0) == pytest.approx(both)


def test_drift_samples_are_weighted_means():
    rng = np.random.default_rng(6)
    s, y, a, b = _trials(rng, 15, 400)
    other = s + rng.normal(0, 0.2, s.size)
    boot = u.bootstrap(y, a, b, n_resamples=5)
    d = u.drift_samples(boot, np.stack([s, other]))
    c = boot.counts[2]
    w = np.where(y, c[a], c[a] * c[b])
    assert d[2, 0] == 0.0
    assert d[2, 1] == pytest.approx(np.average(np.abs(other - s), weights=w))


@pytest.mark.parametrize(
    "fn, args, expected",
    [
        (u.verdict_below, ([-0.02, -0.01],), u.SUPPORTED),
        (u.verdict_below, ([0.01, 0.02],), u.CONTRADICTED),
        (u.verdict_below, ([-0.01, 0.02],), u.UNDETERMINED),
        (u.verdict_below, ([None, None],), u.UNDETERMINED),
        (u.verdict_at_most, ([-0.1, 0.04], 0.05), u.SUPPORTED),
        (u.verdict_at_most, ([0.06, 0.2], 0.05), u.CONTRADICTED),
        (u.verdict_at_most, ([0.0, 0.1], 0.05), u.UNDETERMINED),
        (u.verdict_above, ([0.6, 0.9], 0.5), u.SUPPORTED),
        (u.verdict_above, ([0.1, 0.4], 0.5), u.CONTRADICTED),
        (u.verdict_above, ([0.4, 0.6], 0.5), u.UNDETERMINED),
        (u.verdict_share, (0.9,), u.SUPPORTED),
        (u.verdict_share, (0.1,), u.CONTRADICTED),
        (u.verdict_share, (0.5,), u.UNDETERMINED),
    ],
)
def test_verdicts(fn, args, expected):
    assert fn(*args) == expected


def test_bad_inputs_name_the_parameter():
    y = np.array([1, 0, 1, 0], bool)
    with pytest.raises(ValueError, match="enroll_speakers and test_speakers"):
        u.bootstrap(y)
    with pytest.raises(ValueError, match="trial 0 is a target trial"):
        u.bootstrap(y, [1, 1, 2, 3], [2, 2, 2, 1])
    with pytest.raises(ValueError, match="level must be"):
        u.bootstrap(y, level="utterance")
    boot = u.bootstrap(y, level="trial", n_resamples=3)
    with pytest.raises(ValueError, match="drawn for 4 trials"):
        u.resample_metrics(boot, np.zeros((1, 5)), np.array([1, 0, 1, 0, 1]))
    with pytest.raises(ValueError, match="bca"):
        u.interval([0.1, 0.2], 0.1, method="bca")
    assert u.format_ci(0.0455, [0.041, 0.05]) == "0.0455 [0.0410, 0.0500]"


def _precision_scores(rng, n_speakers=40, n_trials=4000):
    s, y, a, b = _trials(rng, n_speakers, n_trials)
    noise = [0.0, 0.02, 0.05, 0.1, 0.4, 1.2]  # fp32, 8, 4, 3, 2, 1 bits
    rows = np.stack([s + rng.normal(0, sd, s.size) for sd in noise])
    return rows, y, a, b


def test_score_analysis_carries_paired_intervals_and_verdict_inputs():
    from sqjax.analysis.report import claims

    rng = np.random.default_rng(7)
    rows, y, a, b = _precision_scores(rng)
    names = ["fp32", "8bit", "4bit", "3bit", "2bit", "1bit"]
    boot = u.bootstrap(y, a, b, n_resamples=100)
    res = scores_lib.score_analysis(rows, 0.8 * rows - 1.0, y, names, boot=boot)
    two = res["per_precision"]["2bit"]["metrics"]
    lo, hi = two["eer_ci"]
    assert lo <= two["eer"] <= hi
    assert two["delta_eer"] == pytest.approx(
        two["eer"] - res["per_precision"]["fp32"]["metrics"]["eer"]
    )
    assert res["per_precision"]["fp32"]["metrics"]["delta_eer_ci"] == [0.0, 0.0]
    one = res["per_precision"]["1bit"]["metrics"]
    assert one["delta_eer_ci"][0] > 0  # 1.2 of noise on unit-variance scores: surely worse
    for m in ("min_dcf@0.01", "act_dcf@0.05", "cllr"):
        assert len(two[m + "_ci"]) == 2 and "rel_delta_" + m + "_ci" in two
    assert (
        res["per_precision"]["2bit"]["flip_tests"]["mcnemar"]["harmful"]
        == (res["per_precision"]["2bit"]["flips"]["harmful"])
    )
    assert res["knee_stability"]["n"] == 100
    assert res["uncertainty"]["bootstrap"] == {
        "level": "speaker",
        "n_resamples": 100,
        "n_units": 40,
        "n_failed": 0,
    }
    verdicts = {c["claim"].split(":")[1].strip(): c for c in claims(res, None, {}, None)}
    assert {c["verdict"] for c in verdicts.values()} <= {
        u.SUPPORTED,
        u.CONTRADICTED,
        u.UNDETERMINED,
    }
    knee = next(c for k, c in verdicts.items() if k.startswith("the EER"))
    share = res["knee_stability"]["joint"].get("2", 0.0)
    assert knee["verdict"] == u.verdict_share(share)


def test_cascade_analysis_intervals_and_claim():
    from sqjax.analysis import cascade
    from sqjax.analysis.report import claims

    rng = np.random.default_rng(8)
    rows, y, a, b = _precision_scores(rng)
    rows = rows[[4, 0]]  # 2 bits, then FP32
    cal, y_cal, _, _ = _precision_scores(rng)
    per = {
        "macs": np.array([1.0, 1.0]),
        "bitops": np.array([2.0, 32.0]),
        "bytes": np.array([1.0, 16]),
    }
    enroll, test = np.arange(y.size), np.arange(y.size) + y.size
    boot = u.bootstrap(y, a, b, n_resamples=100)
    res, arrays = cascade.cascade_analysis(
        cal[[4, 0]], y_cal, rows, y, ["2bit", "fp32"], per, enroll=enroll, test=test, boot=boot
    )
    fp32 = res["systems"]["fp32"]
    assert fp32["delta_eer_ci"] == [0.0, 0.0]
    ch = res["chosen"]
    lo, hi = ch["eer_ci"]
    assert lo <= ch["eer"] <= hi
    assert ch["delta_eer"] == pytest.approx(ch["eer"] - fp32["eer"])
    assert arrays["curve"]["eer_ci"].shape == (len(arrays["curve"]["eer"]), 2)
    claim = claims(None, None, {}, res)[0]
    if ch["fractions"][0] > 0.5:
        assert claim["verdict"] == u.verdict_at_most(ch["rel_delta_eer_ci"], res["tolerance"])
    else:
        assert claim["verdict"] == u.CONTRADICTED
