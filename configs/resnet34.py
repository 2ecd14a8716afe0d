"""ResNet34 on VoxCeleb2 dev, scored on VoxCeleb1-O (WeSpeaker-like recipe; ours, untuned).

    sqjax train --config configs/resnet34.py --workdir runs/r34 \
        --config.data.train=/data/voxceleb2/dev/aac_wav \
        --config.data.test=/data/voxceleb1 \
        --config.data.test_trials=/data/voxceleb1/veri_test2.txt \
        --config.data.feature_cache=/scratch/fbank80 \
        --config.data.augment.noise_dir=/data/musan --config.data.augment.rir_dir=/data/RIRS_NOISES

Data: VoxCeleb folder layout (idXXXXX/video/nnnnn.wav, 16 kHz) or Kaldi data dirs, local
or on an object store (gs://, s3://; the feature cache of the test set stays local).
Training input is streamed (data.input="stream"): Grain workers read random 2 s crops
of the audio files, and log-mel and augmentation run on the accelerator, so host memory
does not grow with the corpus. Augmentation as WeSpeaker's in kind: reverberation and
additive noise (SNR 0-15 dB), each with probability 0.3, from MUSAN / RIRS_NOISES when
given, else from synthetic noises and impulse responses (a weaker stand-in).
Settings follow WeSpeaker's ResNet34 recipe where it is public (SGD + Nesterov momentum
0.9, peak LR 0.1 decayed to 5e-5, weight decay 1e-4, AAM s=32 m=0.2 with margin
warm-up, 2 s crops, ~150 passes over 1.09M utterances at global batch 256) but without
its large-margin fine-tuning, so expect an EER above WeSpeaker's 0.72% (Vox1-O). Budget: about 640k steps; on one H100 in bf16 think days,
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
    c.data.workers = 8  # Grain worker processes per host
    c.data.input = "stream"
    c.data.augment.p_noise = 0.3
    c.data.augment.p_reverb = 0.3
    c.data.min_seconds = 1.0
    c.eval.batch_size = 16
    return c
