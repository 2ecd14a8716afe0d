"""ResNet34 on VoxCeleb2 dev, scored on VoxCeleb1-O: bf16 data-parallel training on a
TPU pod slice.

The recipe of configs/resnet34.py (WeSpeaker-like, ours, untuned) laid out for 32 TPU
devices (JAX devices: one per chip on v4/v5p megacore and on v5e/v6e): global batch
512 = 32 devices x 16 per device, e.g. a v5e-32 (v5litepod-32: 32 chips, 8 hosts), a
v4-64 or a v5p-64 (32 chips each). On a v4-32 (16 chips) the same global batch is 32
per chip. The learning rate is scaled linearly from 0.1 at batch 256 (Goyal et al.
2017, with warm-up) and the step counts halved: the same ~150 passes over the 1.09M
utterances as configs/resnet34.py.

Pod slice: the same command on every host, ``jax.distributed.initialize()`` finding the
slice by itself; the workdir and the data where every host reads them at the same path
(a bucket, gs://, or a shared filesystem):

    gcloud compute tpus tpu-vm ssh $TPU_NAME --zone=$ZONE --worker=all --command="\
        cd sqjax && .venv/bin/sqjax train --config configs/resnet34_tpu.py \
        --workdir gs://$BUCKET/runs/r34-tpu --config.distributed=True \
        --config.data.train=gs://$BUCKET/voxceleb2/dev/aac_wav \
        --config.data.test=gs://$BUCKET/voxceleb1 \
        --config.data.test_trials=gs://$BUCKET/voxceleb1/veri_test2.txt"

One host (e.g. a v5e-8 or v6e-8, 8 chips): without --config.distributed, and with a
batch of 16 per chip:

    sqjax train --config configs/resnet34_tpu.py --workdir runs/r34-tpu8 \
        --config.train.batch_size=128 --config.train.learning_rate=0.05 \
        --config.train.num_steps=1280000 --config.train.warmup_steps=50000 \
        --config.head.margin_warmup_steps=80000 \
        --config.data.train=/data/voxceleb2/dev/aac_wav \
        --config.data.test=/data/voxceleb1 \
        --config.data.test_trials=/data/voxceleb1/veri_test2.txt

Speed: not measured here; ``python bench/bench_mfu.py --batch 16 --distributed`` on
every host of the slice (as above) gives examples/s and MFU of this model's training
step (320k steps x 512 examples) with this config's input: ``--input stream --augment 0.3``.
"""

from pathlib import Path

from sqjax.config import load_config

DEVICES = 32  # TPU devices the batch is written for (v5e-32, v4-64, v5p-64)
PER_DEVICE_BATCH = 16
GLOBAL_BATCH = DEVICES * PER_DEVICE_BATCH  # 512
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
    c.train.log_every = 100
    c.train.checkpoint_every = 5_000  # resume loses at most this many steps
    c.eval.batch_size = 4 * DEVICES  # utterances of up to eval.max_frames, 4 per device
    return c
