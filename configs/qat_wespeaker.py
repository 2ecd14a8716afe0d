"""QAT of an imported WeSpeaker ResNet (``sqjax import-wespeaker``) on VoxCeleb2 dev.

    sqjax qat --config configs/qat_wespeaker.py --workdir runs/ws_r34_qat \
        --config.quant.init_from=runs/ws_r34 \
        --config.data.train=/data/voxceleb2/dev/aac_wav \
        --config.data.test=/data/voxceleb1 \
        --config.data.test_trials=/data/voxceleb1/veri_test2.txt \
        --config.data.feature_cache=/scratch/kaldi80

The model and its features (Kaldi fbank, WeSpeaker's pooling) come from the imported run;
a training set with another speaker count than the checkpoint's AAM head starts a new
head. Fine-tuning settings are ours, untuned: 20k steps per width at global batch 256
(about 5 passes over VoxCeleb2 dev), AdamW peak LR 1e-4, AAM margin 0.2 from the start.
"""

from pathlib import Path

from sqjax.config import load_config


def get_config():
    c = load_config(Path(__file__).with_name("resnet34.py"))
    c.features.kind = "kaldi"
    c.train.optimizer = "adamw"
    c.train.weight_decay = 1e-4
    c.quant.bits_list = (8, 4, 3, 2)
    c.quant.num_steps = 20_000
    c.quant.learning_rate = 1e-4
    c.quant.warmup_steps = 500
    c.quant.refresh_every = 500
    return c
