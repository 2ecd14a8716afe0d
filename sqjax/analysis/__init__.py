"""Analyses of scores, calibration and their plots: arrays in, plain results out.

Nothing here reads run directories or parses command lines; ``runs``/``experiments``/``cli`` do.
"""

from sqjax.analysis.calibration import Calibration, calibrate, min_cllr, pav_llrs, reliability
from sqjax.analysis.scores import (
    drift_stats,
    flip_concentration,
    flips,
    flips_own_threshold,
    fp32_threshold,
    harmful_share_nearest,
    knee,
    score_analysis,
)

__all__ = [
    "Calibration",
    "calibrate",
    "drift_stats",
    "flip_concentration",
    "flips",
    "flips_own_threshold",
    "fp32_threshold",
    "harmful_share_nearest",
    "knee",
    "min_cllr",
    "pav_llrs",
    "reliability",
    "score_analysis",
]
