"""QAT study on the demo model: FP32 training, then K-means QAT at 8, 4, 3, 2 and 1 bits.

    sqjax qat --config configs/qat_demo.py --workdir runs/qat_demo

Trains the FP32 demo model into runs/qat_demo/fp32 (or fine-tunes from an existing run
with --config.quant.init_from=runs/demo), then one QAT run per width in
runs/qat_demo/<b>bit, and prints test EER / minDCF per precision.
"""

from pathlib import Path

from sqjax.config import load_config


def get_config():
    c = load_config(Path(__file__).with_name("demo.py"))
    c.quant.bits_list = (8, 4, 3, 2, 1)
    c.quant.num_steps = 150
    c.quant.learning_rate = 1e-3
    c.quant.warmup_steps = 10
    c.quant.refresh_every = 25
    return c
