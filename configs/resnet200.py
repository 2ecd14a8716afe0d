"""ResNet-200 (bottleneck blocks [3, 24, 36, 3], ~20.9M parameters), the paper's large model.

    sqjax train --config configs/resnet200.py --workdir runs/r200 \
        --config.data.train=/data/voxceleb2/dev/aac_wav \
        --config.data.test=/data/voxceleb1 \
        --config.data.test_trials=/data/voxceleb1/veri_test2.txt

The layout is our reading of "ResNet-200" (3*66 + 2 layers); the paper's exact layout is
not public. Training settings as configs/resnet34.py, with a global batch of 128 to fit
activation memory on one 80 GB GPU in bf16; use several GPUs (the batch is sharded over
every device) for the full batch of 256.
"""

from pathlib import Path

from sqjax.config import load_config


def get_config():
    c = load_config(Path(__file__).with_name("resnet34.py"))
    c.model.name = "resnet200"
    c.train.batch_size = 128
    c.train.num_steps = 1_280_000
    return c
