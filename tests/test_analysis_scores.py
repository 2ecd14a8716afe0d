import json

import numpy as np
import pytest

from sqjax import metrics
from sqjax.analysis import calibration, scores

# Twelve trials decided at theta = 0 (accept when score >= 0), listed by distance
# |s_32 - theta| = 0, 0.25, ..., 2.75 (all exact in binary, all distinct):
#  #   s_32    s_b   label  FP32 decision   b-bit decision  outcome
#  1   0.00  -0.25   tar    accept (right)  reject (wrong)  harmful
#  2  -0.25   0.50   tar    reject (wrong)  accept (right)  beneficial
#  3   0.50  -0.50   non    accept (wrong)  reject (right)  beneficial
#  4  -0.75   0.25   non    reject (right)  accept (wrong)  harmful
#  5   1.00  -0.25   tar    accept (right)  reject (wrong)  harmful
#  6  -1.25  -1.00   non    reject (right)  reject          -
#  7   1.50   1.75   tar    accept (right)  accept          -
#  8  -1.75   0.00   non    reject (right)  accept (wrong)  harmful (b at 0 accepts)
#  9   2.00   2.50   non    accept (wrong)  accept          -
# 10  -2.25  -2.00   tar    reject (wrong)  reject          -
# 11   2.50   2.25   tar    accept (right)  accept          -
# 12  -2.75  -3.00   non    reject (right)  reject          -
# All: 6 flips (1-5, 8), 4 harmful (1, 4, 5, 8), 2 beneficial (2, 3).
# Targets (1, 2, 5, 7, 10, 11): 3 flips, 2 harmful, 1 beneficial.
# Non-targets (3, 4, 6, 8, 9, 12): 3 flips, 2 harmful, 1 beneficial.
# FP32 errors: 2, 3, 9, 10 = 4 (2 per class); b-bit errors: 1, 4, 5, 8, 9, 10 = 6
# (3 per class); 6 - 4 = harmful - beneficial.
S32 = np.array([0.0, -0.25, 0.5, -0.75, 1.0, -1.25, 1.5, -1.75, 2.0, -2.25, 2.5, -2.75])
SB = np.array([-0.25, 0.5, -0.5, 0.25, -0.25, -1.0, 1.75, 0.0, 2.5, -2.0, 2.25, -3.0])
Y = np.array([1, 1, 0, 0, 1, 0, 1, 0, 0, 1, 1, 0], dtype=bool)
# The functions must not depend on trial order: feed them shuffled.
PERM = np.random.default_rng(0).permutation(12)


def _shuffled():
    return SB[PERM], S32[PERM], Y[PERM]


def test_flips_hand_case():
    f = scores.flips(*_shuffled(), theta=0.0)
    assert (f["n"], f["flips"], f["harmful"], f["beneficial"]) == (12, 6, 4, 2)
    assert (f["errors_32"], f["errors_b"]) == (4, 6)
    assert f["flip_rate"] == pytest.approx(6 / 12)
    assert f["harmful_rate"] == pytest.approx(4 / 12)
    assert f["beneficial_rate"] == pytest.approx(2 / 12)
    for cls in ("target", "nontarget"):
        c = f[cls]
        assert (c["n"], c["flips"], c["harmful"], c["beneficial"]) == (6, 3, 2, 1)
        assert (c["errors_32"], c["errors_b"]) == (2, 3)
        assert c["harmful_rate"] == pytest.approx(2 / 6)


def test_flip_concentration_hand_case():
    c = scores.flip_concentration(*_shuffled(), theta=0.0, n_quantile_bins=4)
    # Quantile bins of 3 trials by distance: {1,2,3} {4,5,6} {7,8,9} {10,11,12}.
    q = c["quantile"]
    assert q["n"] == [3, 3, 3, 3]
    assert q["flips"] == [3, 2, 1, 0]
    assert q["harmful"] == [1, 2, 1, 0]
    assert q["edges"] == [0.0, 0.75, 1.5, 2.25, 2.75]
    np.testing.assert_allclose(q["flip_rate"], [1, 2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(q["harmful_rate"], [1 / 3, 2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(q["harmful_share"], [0.25, 0.5, 0.25, 0])
    # std(s_32) = 1.6186 (population), so the edges 0, .25, .5, 1, 2, inf std are 0, .405,
    # .809, 1.619, 3.237, inf in score units: bins {1,2} {3,4} {5,6,7} {8..12} {}.
    sd = c["std"]
    assert sd["std"] == pytest.approx(np.std(S32))
    assert sd["edges"] == [0.0, 0.25, 0.5, 1.0, 2.0, None]
    assert sd["n"] == [2, 2, 3, 5, 0]
    assert sd["flips"] == [2, 2, 1, 1, 0]
    assert sd["harmful"] == [1, 1, 1, 1, 0]
    assert sd["flip_rate"][:4] == pytest.approx([1, 1, 1 / 3, 1 / 5])
    assert sd["flip_rate"][4] is None and sd["harmful_rate"][4] is None
    # Nearest 10% = ceil(1.2) = 2 trials: {1, 2}, one harmful flip of four.
    assert c["harmful_share_nearest"] == pytest.approx(0.25)
    json.dumps(c, allow_nan=False)


@pytest.mark.parametrize("frac, share", [(0.25, 1 / 4), (0.5, 3 / 4), (1.0, 1.0)])
def test_harmful_share_nearest(frac, share):
    # Nearest 3: {1,2,3} holds harmful 1; nearest 6: {1..6} holds harmful 1, 4, 5.
    assert scores.harmful_share_nearest(*_shuffled(), theta=0.0, frac=frac) == pytest.approx(share)


def test_harmful_share_nearest_without_harmful_flips_is_none():
    assert scores.harmful_share_nearest(S32, S32, Y, theta=0.0) is None


def test_flip_concentration_rejects_bad_edges_and_infinite_theta():
    with pytest.raises(ValueError, match="from 0 to inf"):
        scores.flip_concentration(SB, S32, Y, 0.0, std_edges=(0, 1, 2))
    with pytest.raises(ValueError, match="finite"):
        scores.flip_concentration(SB, S32, Y, np.inf)


def test_drift_stats_against_numpy():
    rng = np.random.default_rng(1)
    y = rng.random(500) < 0.3
    s32 = rng.normal(size=500) + y
    sb = s32 + rng.normal(0.1, 0.3, size=500) + 0.2 * y
    d = sb - s32
    stats = scores.drift_stats(sb, s32, y)
    for key, m in [("all", np.ones_like(y)), ("target", y), ("nontarget", ~y)]:
        x = d[m]
        ref = {
            "mean": x.mean(),
            "std": x.std(),
            "mean_abs": np.abs(x).mean(),
            "q05": np.percentile(x, 5),
            "q50": np.median(x),
            "q95": np.percentile(x, 95),
        }
        for k, v in ref.items():
            assert stats[key][k] == pytest.approx(v, rel=1e-12, abs=1e-12), (key, k)
        assert stats[key]["n"] == int(m.sum())


def test_fp32_threshold():
    s, y = S32, Y
    assert scores.fp32_threshold(s, y) == metrics.eer(s, y)[1]
    assert scores.fp32_threshold(s, y, "min_dcf", 0.05) == metrics.min_dcf(s, y, 0.05)[1]
    with pytest.raises(ValueError, match="'eer' or 'min_dcf'"):
        scores.fp32_threshold(s, y, "dcf")


def test_flips_own_threshold():
    rng = np.random.default_rng(2)
    y = rng.random(300) < 0.4
    s32 = rng.normal(size=300) + 2 * y
    # A monotone (affine) change of the scores moves theta but no decision at own thresholds.
    shifted = 3.0 * s32 - 5.0
    own = scores.flips_own_threshold(shifted, s32, y)
    assert own["flips"] == 0
    assert own["theta_b"] == pytest.approx(3.0 * own["theta_32"] - 5.0)
    # ... while at the FP32 theta every trial between the two thresholds flips.
    t32 = own["theta_32"]
    at_theta = scores.flips(shifted, s32, y, t32)["flips"]
    assert at_theta == np.sum((shifted >= t32) != (s32 >= t32)) > 0
    # A noisy model: same count as deciding each at its own metrics.eer threshold by hand.
    sb = s32 + rng.normal(scale=0.5, size=300)
    own = scores.flips_own_threshold(sb, s32, y)
    t32, tb = metrics.eer(s32, y)[1], metrics.eer(sb, y)[1]
    acc32, accb = s32 >= t32, sb >= tb
    assert own["flips"] == np.sum(acc32 != accb)
    assert own["harmful"] == np.sum((acc32 != accb) & (acc32 == y))


BITS = [32, 8, 4, 3, 2, 1]


def test_knee_of_a_clear_two_bit_curve():
    k = scores.knee(BITS, [0.05, 0.05, 0.051, 0.052, 0.06, 0.40])
    assert k["knee"] == 2
    assert k["bits"] == BITS and k["strength"] > 0.5
    assert "knee at 2 bits" in k["statement"]
    # Order of the input does not matter; FP32 comes first in the curve returned.
    k2 = scores.knee(BITS[::-1], [0.40, 0.06, 0.052, 0.051, 0.05, 0.05])
    assert k2 == k


def test_knee_of_the_briefs_curve_is_three_bits():
    # EER 5, 5, 5.1, 6, 20, 40 % at FP32, 8, 4, 3, 2, 1: the slope per rung goes 0.1 ->
    # 0.9 -> 14 -> 20 points, so the sharpest bend (14 - 0.9 at 3 bits against 20 - 14 at
    # 2) and Kneedle's knee are at 3 bits, the last width before the collapse.
    k = scores.knee(BITS, [0.05, 0.05, 0.051, 0.06, 0.20, 0.40])
    assert k["knee"] == 3


def test_knee_none_for_straight_flat_and_concave_curves():
    line = scores.knee(BITS, np.linspace(0.05, 0.40, 6))
    assert line["knee"] is None and "no knee stands out" in line["statement"]
    flat = scores.knee(BITS, [0.1] * 6)
    assert flat["knee"] is None and "flat" in flat["statement"]
    # Worse by the same amount per bit on a bits axis: concave on the ordinal axis, no bend
    # of the expected kind (Kneedle's best point is an end of the curve).
    concave = scores.knee(BITS, 0.4 - 0.01 * (np.array(BITS) - 1))
    assert concave["knee"] is None
    short = scores.knee([32, 2], [0.05, 0.4])
    assert short["knee"] is None and "at least 3" in short["statement"]


def test_knee_increasing_direction():
    # An accuracy rises with bits and saturates: the mirror image of the 2-bit curve.
    acc = 1 - np.array([0.05, 0.05, 0.051, 0.052, 0.06, 0.40])
    assert scores.knee(BITS, acc, direction="increasing")["knee"] == 2


def test_score_analysis_wiring_and_json():
    rng = np.random.default_rng(3)
    t = 800
    y = rng.random(t) < 0.3
    s32 = rng.normal(size=t) + 2.0 * y
    noise = [0.0, 0.05, 0.1, 0.2, 0.6, 1.5]
    s = np.stack([s32 + rng.normal(scale=n, size=t) for n in noise])
    names = ["fp32", "8bit", "4bit", "3bit", "2bit", "1bit"]
    llrs = calibration.calibrate(s, y).apply(s)
    res = scores.score_analysis(s, llrs, y, names)
    json.dumps(res, allow_nan=False)
    assert res["bits"] == BITS and res["fp32"] == "fp32"
    theta = metrics.eer(s32, y)[1]
    assert res["theta"] == {"kind": "eer", "p_target": 0.01, "value": theta}
    fp = res["per_precision"]["fp32"]
    assert fp["flips"]["flips"] == 0 and fp["drift"]["all"]["mean_abs"] == 0.0
    two = res["per_precision"]["2bit"]
    assert two["metrics"]["eer"] == metrics.eer(s[4], y)[0]
    assert two["metrics"]["cllr"] == metrics.cllr(llrs[4], y)
    assert two["metrics"]["act_dcf@0.05"] == metrics.act_dcf(llrs[4], y, 0.05)
    assert two["metrics"]["min_cllr"] <= two["metrics"]["cllr"]
    assert two["flips"]["flips"] == np.sum((s[4] >= theta) != (s32 >= theta))
    assert two["llr_drift"]["all"]["mean"] == pytest.approx(np.mean(llrs[4] - llrs[0]))
    assert res["knee"]["mean_abs_drift"]["values"][0] == 0.0
    assert set(res["knee"]) == {"eer", "min_dcf@0.01", "mean_abs_drift"}

    no_llr = scores.score_analysis(s[:3], None, y, ["fp32", "8", "4bit"], threshold="min_dcf")
    assert no_llr["per_precision"]["8"]["llr_drift"] is None
    assert "cllr" not in no_llr["per_precision"]["8"]["metrics"]
    assert no_llr["theta"]["value"] == metrics.min_dcf(s32, y, 0.01)[1]
    with pytest.raises(ValueError, match="bits="):
        scores.score_analysis(s[:2], None, y, ["fp32", "tiny"])


def test_score_analysis_with_reject_all_theta():
    # Two well-separated trials only: at p_target 0.01 rejecting everything is optimal, so
    # the minDCF threshold is +inf: theta is None and there is no concentration.
    y = np.array([1, 0, 0, 0], dtype=bool)
    s = np.array([[0.1, 0.2, 0.3, 0.4], [0.2, 0.1, 0.3, 0.5]])
    res = scores.score_analysis(s, None, y, ["fp32", "2bit"], threshold="min_dcf")
    assert res["theta"]["value"] is None
    assert res["per_precision"]["2bit"]["concentration"] is None
    assert res["per_precision"]["2bit"]["flips"]["flips"] == 0
    json.dumps(res, allow_nan=False)
