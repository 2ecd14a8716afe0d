import numpy as np
import pytest
from sklearn.metrics import roc_curve

from sqjax import metrics


def _random_trials(seed, n=400, decimals=None):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.3
    scores = rng.normal(size=n) + 1.5 * labels
    if decimals is not None:
        scores = np.round(scores, decimals)
    return scores, labels


def _sklearn_eer(scores, labels):
    # Independent ROC from scikit-learn: linear crossing of fnr = 1 - tpr with fpr.
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    fnr = 1.0 - tpr
    k = np.flatnonzero(fnr - fpr >= 0)[-1]
    d0, d1 = fnr[k] - fpr[k], fnr[k + 1] - fpr[k + 1]
    return fpr[k] + d0 / (d0 - d1) * (fpr[k + 1] - fpr[k])


def _brute_min_dcf(scores, labels, p_target):
    tar, non = scores[labels], scores[~labels]
    best = np.inf
    for thr in np.concatenate([np.unique(scores), [-np.inf, np.inf]]):
        p_miss = np.mean(tar < thr)
        p_fa = np.mean(non >= thr)
        best = min(best, p_target * p_miss + (1 - p_target) * p_fa)
    return best / min(p_target, 1 - p_target)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("decimals", [None, 1, 0])
def test_eer_matches_sklearn_roc(seed, decimals):
    scores, labels = _random_trials(seed, decimals=decimals)
    e, thr = metrics.eer(scores, labels)
    assert e == pytest.approx(_sklearn_eer(scores, labels), abs=1e-12)
    # The threshold is a real operating point whose error rates bracket the EER.
    p_miss = np.mean(scores[labels] < thr)
    p_fa = np.mean(scores[~labels] >= thr)
    assert min(p_miss, p_fa) <= e + 1e-12 and max(p_miss, p_fa) >= e - 1e-12


def test_eer_hand_cases():
    # Scores all tied: any threshold gives (0, 1) or (1, 0); the crossing is 0.5.
    assert metrics.eer([1.0, 1.0, 1.0, 1.0], [1, 1, 0, 0])[0] == pytest.approx(0.5)
    # tar {0.9, 0.4}, non {0.6, 0.1}: at threshold 0.6 both rates are 1/2.
    e, thr = metrics.eer([0.9, 0.4, 0.6, 0.1], [1, 1, 0, 0])
    assert (e, thr) == (pytest.approx(0.5), 0.6)
    # Perfect separation.
    assert metrics.eer([3.0, 2.0, 1.0, 0.0], [1, 1, 0, 0])[0] == 0.0


def test_eer_ignores_order_of_tied_trials():
    scores, labels = _random_trials(7, n=1000, decimals=0)
    perm = np.random.default_rng(0).permutation(len(scores))
    assert metrics.eer(scores, labels) == metrics.eer(scores[perm], labels[perm])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("decimals", [None, 1])
@pytest.mark.parametrize("p_target", [0.01, 0.05, 0.5])
def test_min_dcf_matches_brute_force(seed, decimals, p_target):
    scores, labels = _random_trials(seed, n=300, decimals=decimals)
    value, thr = metrics.min_dcf(scores, labels, p_target=p_target)
    assert value == pytest.approx(_brute_min_dcf(scores, labels, p_target), abs=1e-12)
    p_miss = np.mean(scores[labels] < thr)
    p_fa = np.mean(scores[~labels] >= thr)
    at_thr = (p_target * p_miss + (1 - p_target) * p_fa) / min(p_target, 1 - p_target)
    assert at_thr == pytest.approx(value, abs=1e-12)


def test_min_dcf_with_costs():
    # tar {2, 1}, non {0}: threshold 1 accepts both targets and rejects the non-target.
    assert metrics.min_dcf([2.0, 1.0, 0.0], [1, 1, 0], p_target=0.5, c_miss=10.0) == (0.0, 1.0)
    # The target scores lowest. Reject all costs 10*0.5 = 5, accept all 1*0.5 = 0.5 (best),
    # thresholds 1 or 2 miss the target too; normalised by min(5, 0.5) -> 1, at threshold 0.
    v, thr = metrics.min_dcf([0.0, 1.0, 2.0], [1, 0, 0], p_target=0.5, c_miss=10.0)
    assert (v, thr) == (pytest.approx(1.0), 0.0)


def test_act_dcf_hand_cases():
    # Bayes threshold at p_target=0.01 is log(99) = 4.595; an llr equal to it is accepted.
    theta = np.log(99.0)
    llrs = np.array([5.0, 3.0, -3.0, 4.7])
    labels = np.array([1, 1, 0, 0])
    # p_miss = 1/2, p_fa = 1/2 -> (0.01*0.5 + 0.99*0.5) / 0.01 = 50.
    assert metrics.act_dcf(llrs, labels, p_target=0.01) == pytest.approx(50.0)
    assert metrics.act_dcf([theta, -10.0], [1, 0], p_target=0.01) == pytest.approx(0.0)
    # p_target=0.5: threshold 0, one miss out of two targets -> 0.5*0.5/0.5 = 0.5.
    assert metrics.act_dcf([1.0, -1.0, -2.0], [1, 1, 0], p_target=0.5) == pytest.approx(0.5)
    # c_fa=99 with p=0.5 also puts the threshold at log(99).
    assert metrics.act_dcf(llrs, labels, p_target=0.5, c_fa=99.0) == pytest.approx(
        (0.5 * 0.5 + 99 * 0.5 * 0.5) / 0.5
    )


@pytest.mark.parametrize("seed", range(3))
def test_act_dcf_is_at_least_min_dcf(seed):
    scores, labels = _random_trials(seed)
    for p in (0.01, 0.05, 0.5):
        assert metrics.act_dcf(scores, labels, p) >= metrics.min_dcf(scores, labels, p)[0] - 1e-12


def test_cllr_known_values():
    labels = np.array([1, 1, 1, 0, 0])
    assert metrics.cllr(np.zeros(5), labels) == pytest.approx(1.0, abs=1e-15)
    assert metrics.cllr(np.where(labels, 50.0, -50.0), labels) < 1e-15
    # llr = +-log 3 on the right side: each trial costs log2(1 + 1/3) bits.
    llr = np.where(labels, np.log(3.0), -np.log(3.0))
    assert metrics.cllr(llr, labels) == pytest.approx(np.log2(4.0 / 3.0))
    # Confidently wrong: cost grows linearly, ~ |llr| / ln 2 bits; no overflow.
    assert metrics.cllr(np.where(labels, -1000.0, 1000.0), labels) == pytest.approx(
        1000.0 / np.log(2.0)
    )


def test_calibration_recovers_gaussian_llr():
    # Equal-variance Gaussian scores have an exactly linear LLR:
    # llr(s) = (mu1 - mu0) / var * s - (mu1^2 - mu0^2) / (2 var).
    rng = np.random.default_rng(0)
    mu0, mu1, sd = -0.5, 1.5, 0.8
    n_tar, n_non = 20_000, 100_000  # unbalanced: the prior weighting must undo it
    scores = np.concatenate([rng.normal(mu1, sd, n_tar), rng.normal(mu0, sd, n_non)])
    labels = np.arange(n_tar + n_non) < n_tar
    a_true = (mu1 - mu0) / sd**2
    b_true = -(mu1**2 - mu0**2) / (2 * sd**2)
    a, b = metrics.fit_calibration(scores, labels)
    assert a == pytest.approx(a_true, rel=0.03)
    assert b == pytest.approx(b_true, abs=0.05)
    a, b = metrics.fit_calibration(scores, labels, p_target=0.05)
    assert a == pytest.approx(a_true, rel=0.05)
    assert b == pytest.approx(b_true, abs=0.1)
    llr = metrics.apply_calibration(scores, a, b)
    np.testing.assert_allclose(llr, a * scores + b)
    # Calibrated llrs are decided well at the Bayes threshold.
    assert metrics.act_dcf(llr, labels, 0.05) < 1.05 * metrics.min_dcf(llr, labels, 0.05)[0]


def test_calibration_edge_cases_are_finite():
    # Uninformative constant scores: llr = 0 whatever the class ratio.
    a, b = metrics.fit_calibration(np.ones(10), np.arange(10) < 3)
    assert (a, b) == (pytest.approx(0.0, abs=1e-9), pytest.approx(0.0, abs=1e-9))
    # Separable classes: a large positive but finite slope.
    a, b = metrics.fit_calibration([2.0, 1.0, -1.0, -2.0], [1, 1, 0, 0])
    assert np.isfinite(a) and np.isfinite(b) and a > 1.0


def test_det_curve_endpoints():
    scores, labels = _random_trials(3, decimals=1)
    p_fa, p_miss, thr = metrics.det_curve(scores, labels)
    assert len(p_fa) == len(p_miss) == len(thr) == len(np.unique(scores)) + 1
    assert (p_fa[0], p_miss[0], thr[0]) == (0.0, 1.0, np.inf)
    assert (p_fa[-1], p_miss[-1], thr[-1]) == (1.0, 0.0, scores.min())
    assert np.all(np.diff(thr) < 0)
    assert np.all(np.diff(p_fa) >= 0) and np.all(np.diff(p_miss) <= 0)
    i = len(thr) // 2
    assert p_fa[i] == pytest.approx(np.mean(scores[~labels] >= thr[i]))
    assert p_miss[i] == pytest.approx(np.mean(scores[labels] < thr[i]))


def test_verification_metrics_keys_and_values():
    scores, labels = _random_trials(1, decimals=1)
    out = metrics.verification_metrics(scores, labels)
    assert set(out) == {
        "eer",
        "eer_threshold",
        "min_dcf@0.01",
        "min_dcf@0.05",
        "n_target",
        "n_nontarget",
    }
    assert (out["eer"], out["eer_threshold"]) == metrics.eer(scores, labels)
    assert out["min_dcf@0.05"] == metrics.min_dcf(scores, labels, 0.05)[0]
    assert out["n_target"] == labels.sum() and out["n_nontarget"] == (~labels).sum()


def _searchsorted_min_dcf(scores, labels, p_target):
    # Rates at every distinct threshold by binary search in the sorted class scores: an
    # O(n log n) twin of _brute_min_dcf for sizes where the O(n^2) loop is too slow.
    tar, non = np.sort(scores[labels]), np.sort(scores[~labels])
    thr = np.concatenate([np.unique(scores), [np.inf]])
    p_miss = np.searchsorted(tar, thr, side="left") / len(tar)
    p_fa = 1.0 - np.searchsorted(non, thr, side="left") / len(non)
    return np.min(p_target * p_miss + (1 - p_target) * p_fa) / min(p_target, 1 - p_target)


def test_one_million_tied_trials_match_references():
    # Large and heavily tied (3 decimals): the sweep's cumulative counts must stay exact.
    rng = np.random.default_rng(0)
    labels = rng.random(1_000_000) < 0.05
    scores = np.round(rng.normal(size=labels.size) + 2.0 * labels, 3)
    out = metrics.verification_metrics(scores, labels)
    assert out["eer"] == pytest.approx(_sklearn_eer(scores, labels), abs=1e-12)
    assert out["eer"] == pytest.approx(0.1587, abs=0.005)  # Gaussian d'=2: Phi(-1)
    for p in (0.01, 0.05):
        assert out[f"min_dcf@{p}"] == pytest.approx(
            _searchsorted_min_dcf(scores, labels, p), abs=1e-12
        )
    # Scores as llrs: act_dcf at the Bayes threshold log(99), cllr from its definition.
    tar, non = scores[labels], scores[~labels]
    theta = np.log(99.0)
    p_miss = np.searchsorted(np.sort(tar), theta, side="left") / len(tar)
    p_fa = 1.0 - np.searchsorted(np.sort(non), theta, side="left") / len(non)
    act = (0.01 * p_miss + 0.99 * p_fa) / 0.01
    assert metrics.act_dcf(scores, labels) == pytest.approx(act, rel=1e-12)
    ref_cllr = 0.5 * (np.mean(np.log2(1 + np.exp(-tar))) + np.mean(np.log2(1 + np.exp(non))))
    assert metrics.cllr(scores, labels) == pytest.approx(ref_cllr, rel=1e-9)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: metrics.eer(np.zeros((2, 2)), [1, 0, 1, 0]), r"scores must be 1-D.*ravel"),
        (lambda: metrics.eer([0.1, 0.2, 0.3], [1, 0]), r"same length, got 3 and 2"),
        (lambda: metrics.eer([0.1, np.nan], [1, 0]), r"scores must be finite.*index 1"),
        (lambda: metrics.cllr([0.1, np.inf], [1, 0]), r"llrs must be finite"),
        (lambda: metrics.eer([0.1, 0.2], [1, 1]), r"no non-target trial"),
        (lambda: metrics.min_dcf([0.1, 0.2], [0, 0]), r"no target trial"),
        (lambda: metrics.eer([0.1, 0.2], [1, 2]), r"labels must be bool or 0/1.*\[2\]"),
        (lambda: metrics.min_dcf([0.1, 0.2], [1, 0], p_target=1.0), r"p_target must be in"),
        (lambda: metrics.act_dcf([0.1, 0.2], [1, 0], c_fa=0.0), r"c_fa must be > 0|c_fa=0"),
    ],
)
def test_errors_name_the_parameter(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_row_metrics_equal_the_scalar_ones_with_ties():
    rng = np.random.default_rng(7)
    y = rng.random(300) < 0.3
    s = rng.normal(size=(6, 300)) + 1.5 * y
    s[1] = np.round(s[1], 1)  # many ties
    s[2] = np.round(s[2])  # a few values only
    s[3] = 0.0  # all tied
    for g in range(6):
        assert metrics.eer_rows(s, y)[g] == pytest.approx(metrics.eer(s[g], y)[0], abs=1e-12)
        for p in (0.01, 0.05):
            assert metrics.min_dcf_rows(s, y, p)[g] == pytest.approx(
                metrics.min_dcf(s[g], y, p)[0], abs=1e-12
            )
            assert metrics.act_dcf_rows(s, y, p)[g] == pytest.approx(metrics.act_dcf(s[g], y, p))
        assert metrics.cllr_rows(s, y)[g] == pytest.approx(metrics.cllr(s[g], y))
    with pytest.raises(ValueError, match=r"\(systems, trials\)"):
        metrics.eer_rows(s[0], y)
