"""ResNet34 on VoxCeleb2 dev, scored on VoxCeleb1-O: bf16 data-parallel training on GPUs.

The recipe of configs/resnet34.py (WeSpeaker-like, ours, untuned) laid out for one host
with 8 GPUs (H100/H200/A100): global batch 256 = 8 GPUs x 32 per GPU, split over the
``data`` axis of the device mesh. One host, every local GPU:

    sqjax train --config configs/resnet34_gpu.py --workdir runs/r34-gpu \
        --config.data.train=/data/voxceleb2/dev/aac_wav \
        --config.data.test=/data/voxceleb1 \
        --config.data.test_trials=/data/voxceleb1/veri_test2.txt \
        --config.data.feature_cache=/scratch/fbank80

Several hosts (one process per host, every process with the same arguments; the workdir
and the data where every host reads them at the same path: a shared filesystem or a
bucket), e.g. 2 x 8 GPUs under
SLURM, where ``jax.distributed.initialize()`` finds the coordinator by itself:

    srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 \
        sqjax train --config configs/resnet34_gpu.py --workdir /shared/runs/r34-gpu16 \
        --config.distributed=True \
        --config.train.batch_size=512 --config.train.learning_rate=0.2 \
        --config.train.num_steps=320000 --config.train.warmup_steps=12500 \
        --config.head.margin_warmup_steps=20000 \
        --config.data.train=/shared/voxceleb2/dev/aac_wav \
        --config.data.test=/shared/voxceleb1 \
        --config.data.test_trials=/shared/voxceleb1/veri_test2.txt

i.e. keep 32 per GPU, scale the learning rate with the global batch (linear scaling with
warm-up, Goyal et al. 2017, from 0.1 at 256) and the step counts inversely (the same
~150 passes over the 1.09M utterances). With fewer GPUs on one host, the global batch
of 256 stays and each GPU holds more (4 GPUs: 64 each).

Speed: not measured here; ``python bench/bench_mfu.py`` on the target machine gives
examples/s and MFU of this model's training step (640k steps x 256 examples) with this
config's input: ``--input stream --augment 0.3``.
"""

from sqjax.config import default_config

DEVICES = 8  # GPUs the batch is written for (one host)
PER_DEVICE_BATCH = 32
GLOBAL_BATCH = DEVICES * PER_DEVICE_BATCH  # 256, WeSpeaker's ResNet34 batch
BASE_LR, BASE_BATCH = 0.1, 256  # configs/resnet34.py: peak LR 0.1 at batch 256


def get_config():
    c = default_config()
    c.model.name = "resnet34"
    c.model.dtype = "bfloat16"  # bf16 convolutions; params, BN, pooling, loss in float32

    # Data: set on the command line (--config.data.train=... etc.).
    c.data.train = ""  # VoxCeleb2 dev root (idXXXXX/video/nnnnn.wav) or a Kaldi data dir
    c.data.test = ""  # VoxCeleb1 root
    c.data.test_trials = ""  # e.g. veri_test2.txt (VoxCeleb1-O cleaned)
    c.data.min_seconds = 1.0
    c.data.workers = 16  # input worker processes per host
    # Streamed input: Grain workers read random crops of the audio files; log-mel and
    # augmentation (reverberation, noise at 0-15 dB SNR; MUSAN / RIRS_NOISES through
    # data.augment.noise_dir / rir_dir, synthetic otherwise) run on the accelerator.
    c.data.input = "stream"
    c.data.augment.p_noise = 0.3
    c.data.augment.p_reverb = 0.3

    c.head.margin_warmup_steps = 40_000
    c.train.batch_size = GLOBAL_BATCH
    c.train.microbatches = 1
    c.train.conv_slice = 0  # the sliced kernel gradients are an XLA:CPU workaround
    c.train.num_steps = 640_000  # ~150 passes over 1.09M utterances
    c.train.optimizer = "sgd"
    c.train.learning_rate = BASE_LR * GLOBAL_BATCH / BASE_BATCH
    c.train.final_lr_ratio = 5e-4
    c.train.warmup_steps = 25_000
    c.train.weight_decay = 1e-4
    c.train.log_every = 200
    c.train.checkpoint_every = 10_000  # resume loses at most this many steps
    c.train.keep_checkpoints = 3
    c.eval.batch_size = 8 * DEVICES  # utterances of up to eval.max_frames, 8 per GPU
    return c
