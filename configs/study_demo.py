"""The paper's whole study on the demo model and the built-in synthetic corpus, 2-core CPU.

    sqjax study --config configs/study_demo.py --workdir runs/study_demo

FP32 training of the demo model (configs/demo.py), QAT at 8, 4, 3, 2 and 1 bits
(configs/qat_demo.py's settings), PTQ at the same widths (with and without BatchNorm
re-estimation), the score-level analyses of QAT and PTQ, the layer-wise analysis at 2 bits
(PTQ with a mixed-precision suggestion, and QAT), the cascade 2 -> 4 -> 8 -> FP32 on the
QAT models, and the report in runs/study_demo/report/index.html. Interrupted, it resumes;
--config.quant.init_from=runs/demo reuses a trained FP32 demo run.
"""

from pathlib import Path

from sqjax.config import load_config


def get_config():
    c = load_config(Path(__file__).with_name("qat_demo.py"))
    c.study.layer_bits = (2,)
    c.study.cascade_stages = (2, 4, 8, 32)
    return c
