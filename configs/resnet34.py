"""ResNet34 on VoxCeleb2 dev, scored on VoxCeleb1-O (WeSpeaker-like recipe; ours, untuned).

    sqjax train --config configs/resnet34.py --workdir runs/r34 \
        --config.data.train=/data/voxceleb2/dev/aac_wav \
        --config.data.test=/data/voxceleb1 \
        --config.data.test_trials=/data/voxceleb1/veri_test2.txt \
        --config.data.feature_cache=/scratch/fbank80

Data: VoxCeleb folder layout (idXXXXX/video/nnnnn.wav, 16 kHz) or Kaldi data dirs.
Settings follow WeSpeaker's ResNet34 recipe where it is public (SGD + Nesterov momentum
0.9, peak LR 0.1 decayed to 5e-5, weight decay 1e-4, AAM s=32 m=0.2 with margin
warm-up, 2 s crops, ~150 passes over 1.09M utterances at global batch 256) but without
its MUSAN/RIR augmentation and large-margin fine-tuning, so expect an EER above
WeSpeaker's 0.72% (Vox1-O). Budget: about 640k steps; on one H100 in bf16 think days,
not hours; on a 2-core CPU, do not. The model has 6.63M parameters (4.55 GMACs per 2 s).
"""

from sqjax.config import default_config


def get_config():
    c = default_config()
    c.model.name = "resnet34"
    c.model.dtype = "bfloat16"
    c.head.margin_warmup_steps = 40_000
    c.train.num_steps = 640_000
    c.train.batch_size = 256
    c.train.optimizer = "sgd"
    c.train.learning_rate = 0.1
    c.train.final_lr_ratio = 5e-4
    c.train.warmup_steps = 25_000
    c.train.weight_decay = 1e-4
    c.train.log_every = 100
    c.train.checkpoint_every = 5_000
    c.data.workers = 8
    c.data.min_seconds = 1.0
    c.eval.batch_size = 16
    return c
