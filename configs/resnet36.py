"""ResNet-36 (basic blocks [3, 4, 7, 3], ~6.9M parameters), the paper's smaller model.

    sqjax train --config configs/resnet36.py --workdir runs/r36 \
        --config.data.train=/data/voxceleb2/dev/aac_wav \
        --config.data.test=/data/voxceleb1 \
        --config.data.test_trials=/data/voxceleb1/veri_test2.txt

The layout [3, 4, 7, 3] is our reading of "ResNet-36" (2*17 + 2 layers); the paper's
exact layout is not public. Training settings as configs/resnet34.py.
"""

from pathlib import Path

from sqjax.config import load_config


def get_config():
    c = load_config(Path(__file__).with_name("resnet34.py"))
    c.model.name = "resnet36"
    return c
