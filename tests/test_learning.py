"""Learning: the tiny config, given a little more data and steps, beats the raw-feature baseline.

The tiny config itself (8 speakers, 6 steps) does not learn (EER 0.47 vs baseline 0.43).
With 32 training speakers, 400 trials and 300 steps of a width-8 model on 50-frame crops,
seed 0 gives EER 0.170 against the raw-feature baseline's 0.350 (ratio 0.49), and one
step of training gives 0.425 (1.21): the bar, EER <= 0.6 x baseline, separates the two.
About 50 s on 2 cores. ``SQJAX_LEARNING_SEED=N`` runs another seed.
"""

import os

import pytest

from sqjax import runs
from sqjax.config import load_config

from .conftest import CONFIGS

SEED = int(os.environ.get("SQJAX_LEARNING_SEED", "0"))

OVERRIDES = [
    "--config.data.synth_args.n_train_speakers=32",
    "--config.data.synth_args.utts_per_speaker=8",
    "--config.data.synth_args.n_test_speakers=16",
    "--config.data.synth_args.test_utts_per_speaker=4",
    "--config.data.synth_args.n_trials=400",
    "--config.model.n_mels=40",
    "--config.model.width=8",
    "--config.head.scale=16.0",
    "--config.head.margin=0.0",
    "--config.train.num_steps=300",
    "--config.train.batch_size=32",
    "--config.train.n_frames=50",
    "--config.train.learning_rate=3e-3",
    "--config.train.warmup_steps=5",
    "--config.train.log_every=50",
    "--config.train.checkpoint_every=1000",
]

RATIO = 0.6


@pytest.fixture(scope="module")
def learning_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    return load_config(
        CONFIGS / "tiny.py",
        [
            f"--config.data.synth_dir={root}/synth",
            "--config.progress=False",
            "--config.data.synth_args.workers=1",
            "--config.data.workers=1",
            f"--config.seed={SEED}",
            f"--config.data.synth_args.seed={SEED}",
            *OVERRIDES,
        ],
    )


def test_trained_model_beats_raw_feature_baseline(learning_config, tmp_path):
    result = runs.train_and_evaluate(learning_config, tmp_path)
    print("trained", SEED, result["eer"], result["baseline/eer"])
    assert result["eer"] <= RATIO * result["baseline/eer"], result


def test_untrained_model_does_not(learning_config, tmp_path):
    c = learning_config.copy_and_resolve_references()
    c.train.num_steps = 1
    result = runs.train_and_evaluate(c, tmp_path)
    print("untrained", SEED, result["eer"], result["baseline/eer"])
    assert result["eer"] > RATIO * result["baseline/eer"], result
