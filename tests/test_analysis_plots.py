import matplotlib.image
import numpy as np
import pytest

from sqjax.analysis import calibration, plots, scores

NAMES = ["fp32", "8bit", "4bit", "3bit", "2bit", "1bit"]


@pytest.fixture(scope="module")
def study():
    rng = np.random.default_rng(0)
    t = 600
    y = rng.random(t) < 0.3
    s32 = rng.normal(size=t) + 2.5 * y
    s = np.stack([s32 + rng.normal(scale=n, size=t) for n in [0, 0.05, 0.1, 0.2, 0.6, 1.5]])
    llrs = calibration.calibrate(s, y).apply(s)
    return s, llrs, y, scores.score_analysis(s, llrs, y, NAMES)


def _assert_png(path, width, height):
    assert path.stat().st_size > 5_000  # a blank canvas of this size compresses far smaller
    img = matplotlib.image.imread(path)
    assert img.shape[:2] == (height, width)
    assert img[..., :3].std() > 0.05  # something is drawn, not one flat colour


def test_plot_degradation(study, tmp_path):
    path = plots.plot_degradation(study[3], tmp_path / "sub" / "degradation.png")
    _assert_png(path, 1000, 400)


def test_plot_drift_histograms(study, tmp_path):
    s, _, y, _ = study
    path = plots.plot_drift_histograms(s, y, NAMES, tmp_path / "drift.png")
    _assert_png(path, 5 * 320, 320)  # one 3.2-inch panel per non-FP32 width


def test_plot_flip_concentration(study, tmp_path):
    _assert_png(plots.plot_flip_concentration(study[3], tmp_path / "conc.png"), 1000, 700)


def test_plot_det(study, tmp_path):
    s, _, y, _ = study
    _assert_png(plots.plot_det(s, y, NAMES, tmp_path / "det.png"), 600, 600)


def test_plot_reliability(study, tmp_path):
    _, llrs, y, _ = study
    rel = {n: calibration.reliability(llrs[p], y) for p, n in enumerate(NAMES)}
    _assert_png(plots.plot_reliability(rel, tmp_path / "rel.png"), 500, 500)


def test_plots_never_touch_pyplot(study, tmp_path):
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from sqjax.analysis import plots\n"
        "rel = {'a': {'predicted': [0.2, 0.8], 'observed': [0.1, 0.9]}}\n"
        f"plots.plot_reliability(rel, {str(tmp_path / 'r.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
