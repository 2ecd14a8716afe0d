"""Demo: a small ResNet trained on the built-in synthetic corpus, on a 2-core CPU.

    sqjax train --config configs/demo.py --workdir runs/demo

Generates the corpus into data/synth-demo (first run only), trains, then prints test EER
and minDCF beside the raw-feature baseline on the same trials.
"""

from sqjax.config import default_config


def get_config():
    c = default_config()
    c.data.synth = True
    c.data.synth_dir = "data/synth-demo"
    c.model.name = "resnet_demo"
    c.model.width = 8
    c.model.embed_dim = 128
    c.head.margin_warmup_steps = 200
    c.train.num_steps = 600
    c.train.batch_size = 32
    c.train.n_frames = 200
    c.train.optimizer = "adamw"
    c.train.learning_rate = 3e-3
    c.train.weight_decay = 1e-4
    c.train.warmup_steps = 50
    c.train.checkpoint_every = 100
    c.eval.baseline = True
    return c
