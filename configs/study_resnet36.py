"""The paper's whole study at VoxCeleb scale on RESNET36 (settings ours, untuned; GPU/TPU).

    sqjax study --config configs/study_resnet36.py --workdir runs/study_resnet36 \
        --config.data.train=/data/voxceleb2/dev/aac_wav \
        --config.data.test=/data/voxceleb1 \
        --config.data.test_trials=/data/voxceleb1/veri_test2.txt \
        --config.data.cal=/data/voxceleb1_cal --config.data.cal_trials=/data/voxceleb1_cal/trials

Training as configs/resnet36.py (days of accelerator time), or pass
--config.quant.init_from=RUN to start from a trained FP32 run (e.g. one imported from
WeSpeaker). QAT fine-tunes 20k steps per width at 8, 4, 3, 2 and 1 bits (about 3% of the
FP32 schedule: our choice, not the paper's). Calibration trials must be disjoint from the
test trials (e.g. a trial list drawn from VoxCeleb1 dev speakers); the cascade and actDCF
need them. The layer-wise analysis at 2 bits embeds every test utterance 2 + 2L + G times
(L quantized tensors): on VoxCeleb1-O that is accelerator work, not CPU work.
"""

from pathlib import Path

from sqjax.config import load_config


def get_config():
    c = load_config(Path(__file__).with_name("resnet36.py"))
    c.quant.bits_list = (8, 4, 3, 2, 1)
    c.quant.num_steps = 20_000
    c.quant.learning_rate = 1e-3
    c.quant.warmup_steps = 500
    c.quant.refresh_every = 500
    c.study.layer_bits = (2,)
    c.study.cascade_stages = (2, 4, 8, 32)
    return c
