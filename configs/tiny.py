"""Tiny: a 4-channel ResNet on a tiny synthetic corpus, for tests and smoke runs (~1 min).

    sqjax train --config configs/tiny.py --workdir runs/tiny

Only checks that everything runs; expect an EER not far below the baseline's.
"""

from sqjax.config import default_config


def get_config():
    c = default_config()
    c.data.synth = True
    c.data.synth_dir = "data/synth-tiny"
    c.data.synth_args.update(
        n_train_speakers=8,
        n_dev_speakers=2,
        n_test_speakers=6,
        utts_per_speaker=4,
        test_utts_per_speaker=3,
        n_trials=60,
        min_duration=1.0,
        max_duration=1.5,
    )
    c.data.min_seconds = 0.5
    c.model.name = "resnet_tiny"
    c.model.embed_dim = 32
    c.train.num_steps = 6
    c.train.batch_size = 8
    c.train.n_frames = 100
    c.train.optimizer = "adamw"
    c.train.learning_rate = 1e-3
    c.train.warmup_steps = 2
    c.train.log_every = 2
    c.train.checkpoint_every = 3
    c.quant.bits_list = (2,)
    c.quant.num_steps = 3
    c.quant.refresh_every = 2
    c.quant.warmup_steps = 1
    c.eval.batch_size = 8
    c.eval.baseline = True
    return c
