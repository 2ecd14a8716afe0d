import numpy as np
import pytest
from scipy.optimize import minimize
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from sqjax import metrics
from sqjax.analysis import calibration


def _trials(seed, n=600, p_tar=0.2, shift=2.0, scale=3.0):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < p_tar
    return scale * (rng.normal(size=n) + shift * y) + 1.0, y


def _cllr_exact(llrs, y):
    # Cllr with llr = +-inf allowed (they cost 0 on the right side), for references.
    with np.errstate(over="ignore"):
        c_tar = np.mean(np.logaddexp(0.0, -llrs[y]))
        c_non = np.mean(np.logaddexp(0.0, llrs[~y]))
    return 0.5 * (c_tar + c_non) / np.log(2.0)


@pytest.mark.parametrize(
    "p_target",
    [0.5, 0.05, 0.01],
)
def test_calibrate_matches_weighted_sklearn_logistic_regression(p_target):
    # Prior weighting: targets weigh p/n_tar, non-targets (1-p)/n_non (times n, which does
    # not move the optimum). sklearn fits the intercept c freely; the LLR offset is
    # b = c - logit(p). C = 1e8 makes its L2 penalty negligible.
    s0, y = _trials(0)
    rng = np.random.default_rng(9)
    scores = np.stack([s0, 0.5 * s0 + rng.normal(size=y.size), 2.0 * s0 - 1.0])
    cal = calibration.calibrate(scores, y, p_target=p_target)
    w = np.where(y, p_target / y.sum(), (1 - p_target) / (~y).sum()) * y.size
    for p in range(3):
        lr = LogisticRegression(C=1e8, tol=1e-12, max_iter=10_000)
        lr.fit(scores[p][:, None], y, sample_weight=w)
        a_ref = lr.coef_[0, 0]
        b_ref = lr.intercept_[0] - np.log(p_target / (1 - p_target))
        assert cal.a[p] == pytest.approx(a_ref, abs=1e-3)
        assert cal.b[p] == pytest.approx(b_ref, abs=1e-3)
    llrs = cal.apply(scores)
    assert llrs.shape == scores.shape
    np.testing.assert_allclose(llrs[1], cal.a[1] * scores[1] + cal.b[1])
    assert cal.to_dict() == {"a": cal.a, "b": cal.b, "p_target": p_target}


def test_calibrate_rejects_wrong_shapes():
    s, y = _trials(0)
    with pytest.raises(ValueError, match=r"scores\[None\]"):
        calibration.calibrate(s, y)
    cal = calibration.calibrate(s[None], y)
    with pytest.raises(ValueError, match="one row per"):
        cal.apply(np.stack([s, s]))


def test_min_cllr_hand_case():
    # Sorted labels 0 1 0 1: PAV pools the middle pair at 1/2, so the posteriors are
    # 0, 1/2, 1/2, 1 at the empirical prior 1/2: LLRs -inf, 0, 0, +inf. Each class has one
    # trial at llr 0 (1 bit) and one free: Cllr = 0.5 * (0.5 + 0.5) = 0.5 bit.
    assert calibration.min_cllr([1.0, 2.0, 3.0, 4.0], [0, 1, 0, 1]) == pytest.approx(0.5, 1e-8)
    # Tied scores share one LLR: here 0 for all, 1 bit.
    assert calibration.min_cllr([1.0, 1.0, 2.0, 2.0], [1, 0, 1, 0]) == pytest.approx(1.0, 1e-8)


def test_min_cllr_separable_is_zero():
    s, y = _trials(1)
    s = np.where(y, 10.0 + s, -10.0 - s)  # every target above every non-target
    assert calibration.min_cllr(s, y) < 1e-8


@pytest.mark.parametrize("seed", range(3))
def test_min_cllr_matches_sklearn_isotonic(seed):
    s, y = _trials(seed, n=300)
    s = np.round(s, 0)  # many ties
    iso = IsotonicRegression(out_of_bounds="clip").fit(s, y.astype(float))
    post = iso.predict(s)
    prior = y.mean()
    with np.errstate(divide="ignore"):
        llr = np.log(post) - np.log1p(-post) - np.log(prior / (1 - prior))
    assert calibration.min_cllr(s, y) == pytest.approx(_cllr_exact(llr, y), abs=1e-8)


def test_min_cllr_matches_brute_force_monotone_optimum():
    # Minimise Cllr over LLR vectors that are non-decreasing in the score, directly.
    s = np.array([0.1, 0.4, 0.5, 0.9, 1.3, 1.7, 2.0, 2.6])
    y = np.array([0, 1, 0, 0, 1, 0, 1, 1], dtype=bool)
    order = np.argsort(s)
    cons = [{"type": "ineq", "fun": lambda v, i=i: v[i + 1] - v[i]} for i in range(len(s) - 1)]
    best = minimize(
        lambda v: _cllr_exact(v, y[order]),
        np.zeros(len(s)),
        constraints=cons,
        bounds=[(-40, 40)] * len(s),
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 1000},
    )
    assert calibration.min_cllr(s, y) == pytest.approx(best.fun, abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_min_cllr_below_every_affine_calibration(seed):
    s, y = _trials(seed)
    bound = calibration.min_cllr(s, y)
    a, b = metrics.fit_calibration(s, y)
    assert bound <= metrics.cllr(metrics.apply_calibration(s, a, b), y)
    rng = np.random.default_rng(seed)
    for a, b in zip(rng.uniform(0.05, 3, 20), rng.normal(scale=3, size=20)):
        assert bound <= metrics.cllr(a * s + b, y)
    assert bound == pytest.approx(calibration.min_cllr(np.exp(s / 3), y))  # monotone-invariant


def test_reliability_bins():
    # Six trials, three bins of two by LLR rank; prior 1/2, so posterior = sigmoid(llr).
    llrs = np.array([-2.0, 0.0, 2.0, -1.0, 1.0, 3.0])
    y = np.array([0, 1, 1, 0, 0, 1], dtype=bool)
    r = calibration.reliability(llrs, y, n_bins=3)
    sig = 1 / (1 + np.exp(-np.array([-2.0, -1.0, 0.0, 1.0, 2.0, 3.0])))
    np.testing.assert_allclose(r["predicted"], sig.reshape(3, 2).mean(1))
    np.testing.assert_allclose(r["observed"], [0.0, 0.5, 1.0])  # {-2,-1}, {0,1}, {2,3}
    assert r["n"] == [2, 2, 2] and r["prior"] == 0.5
