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

from pathlib import Path

from sqjax.config import load_config

DEVICES = 8  # GPUs the batch is written for (one host)
PER_DEVICE_BATCH = 32
GLOBAL_BATCH = DEVICES * PER_DEVICE_BATCH  # 256, WeSpeaker's ResNet34 batch
BASE_LR, BASE_BATCH = 0.1, 256  # configs/resnet34.py: peak LR 0.1 at batch 256


def get_config():
    # configs/resnet34.py: ResNet34 in bf16, streamed input with augmentation, the SGD
    # recipe at batch 256; here its batch, learning rate and step counts for GLOBAL_BATCH.
    c = load_config(Path(__file__).with_name("resnet34.py"))
    scale = GLOBAL_BATCH / BASE_BATCH  # the recipe's steps divided by this, its LR times it
    c.data.workers = 16  # input worker processes per host
    c.head.margin_warmup_steps = round(40_000 / scale)
    c.train.batch_size = GLOBAL_BATCH
    c.train.conv_slice = 0  # the sliced kernel gradients are an XLA:CPU workaround
    c.train.num_steps = round(640_000 / scale)  # ~150 passes over 1.09M utterances
    c.train.learning_rate = BASE_LR * scale
    c.train.warmup_steps = round(25_000 / scale)
    c.train.log_every = 200
    c.train.checkpoint_every = 10_000  # resume loses at most this many steps
    c.eval.batch_size = 8 * DEVICES  # utterances of up to eval.max_frames, 8 per device
    return c
