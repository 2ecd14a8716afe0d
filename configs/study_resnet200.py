"""The paper's whole study at VoxCeleb scale on ResNet-200 (settings ours, untuned; GPU/TPU).

    sqjax study --config configs/study_resnet200.py --workdir runs/study_resnet200 \
        --config.data.train=/data/voxceleb2/dev/aac_wav \
        --config.data.test=/data/voxceleb1 \
        --config.data.test_trials=/data/voxceleb1/veri_test2.txt \
        --config.data.cal=/data/voxceleb1_cal --config.data.cal_trials=/data/voxceleb1_cal/trials

Training as configs/resnet200.py; the QAT, calibration, layer-analysis and cascade
settings, and what they cost, as configs/study_resnet36.py says.
"""

from pathlib import Path

from sqjax.config import load_config


def get_config():
    c = load_config(Path(__file__).with_name("resnet200.py"))
    study = load_config(Path(__file__).with_name("study_resnet36.py"))
    c.quant, c.study = study.quant, study.study
    return c
