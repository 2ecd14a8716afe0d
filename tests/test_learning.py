"""Learning: a small variant of configs/tiny.py beats the raw-feature baseline.

configs/tiny.py itself only checks that everything runs: 8 training speakers and 6 steps
give a test EER of 0.47 against the raw-feature baseline's 0.43. ``LEARNING_OVERRIDES`` in
conftest.py is the cheapest variant found that learns reliably, on its own synthetic
corpus (the ``learned_run`` fixture trains it once per session; other tests reuse it):

- corpus: 48 training speakers x 6 utterances (1-1.5 s, as in tiny); 20 test speakers x 5
  utterances and 1000 trials, so that both EERs are less noisy than on tiny's 6 x 3 / 60;
- features: 40 mel bands and 50-frame crops (half the cost of each per example);
- model: resnet_tiny at width 8, embed_dim 256 (embed_dim 32 needed 1.5x the steps for the
  same EER: at 200 steps it gave ratios 0.71/0.68 on seeds 0/1, 256 gave 0.51/0.39);
- head: scale 16, no margin (scale 32 or the 0.2 margin barely moved in 200 steps);
- training: 250 AdamW steps of 32 crops, lr 3e-3, 5 warm-up steps.

Measured with ``config.seed = data.synth_args.seed = s`` (the test runs s = 0): test EER of
the trained model, of the raw-feature baseline, their ratio, and the ratio for untrained
models -- the fresh initialisation that training starts from (what the second test
scores), one step of training (lr 0 in warm-up: BatchNorm statistics only), and 250 steps
at learning rate 0 (random weights with fitted BatchNorm statistics):

    s   trained  baseline  ratio | untrained ratio: init  1 step  lr=0
    0    0.172    0.340    0.51  |                  1.28   1.25   1.25
    1    0.120    0.318    0.38  |                  1.21   1.25   1.09
    2    0.150    0.344    0.44  |                  1.12   1.10   1.19
    3    0.142    0.298    0.48  |                  1.11   1.09   1.34
    4    0.142    0.328    0.43  |                  1.04   1.08   1.23
    5    0.118    0.352    0.34  |                  1.14   1.08   1.03
    6    0.148    0.324    0.46  |                  1.21   1.22
    7    0.098    0.324    0.30  |                  1.07   1.02
    8    0.136    0.312    0.44  |                  1.03   1.01
    9    0.156    0.322    0.48  |                  1.30   1.32

Trained ratios 0.30-0.51, untrained ones 1.01-1.34. Rounding alone moves a seed's
outcome: with training's Winograd threshold at 64 channels instead of 32 (cpu.conv,
commit cc89430), the same seeds gave 0.66 / 0.34 / 0.41 / 0.49 / 0.32 / 0.30 for s = 0, 1, 2,
3, 5, 7: seed 0 moved from 0.51 to 0.66, the others by at most 0.04. So the bar sits midway
between the two sides, EER <= 0.8 x the baseline's: a margin of 0.14 above the worst
trained ratio seen and 0.21 below the best untrained one (200 steps instead of 250
reached ratios of 0.62; 500 steps gave 0.56 for seed 0). ``SQJAX_LEARNING_SEED=s`` runs
another seed.

Time on an idle 2-core machine, both tests: 32 s as pytest reports it, 34.5 s with the
interpreter's start (corpus 4 s, features 1.5 s, parameter initialisation 9 s of eager
compiles, step compilation 3.5 s, 250 steps 8 s, checkpoint 1 s, scoring 2 s; the
untrained check, 1.6 s, reuses the corpus, features and compiled functions).
"""

import jax

from sqjax import builders, evaluate, prepare, runs

RATIO = 0.8  # pass: EER <= RATIO x the raw-feature baseline's EER on the same trials

# The config (OVERRIDES, SEED) and the run are the ``learned_run`` fixture in conftest.py.


def test_trained_model_beats_raw_feature_baseline(learned_run):
    config, _, result = learned_run
    assert result["step"] == config.train.num_steps
    assert result["eer"] <= RATIO * result["baseline/eer"], result


def test_untrained_model_does_not_pass_the_bar(learned_run, tmp_path):
    # The state training starts from (same seed, same initialisation), scored as is.
    config = learned_run[0].copy_and_resolve_references()
    data = prepare.training_data(config)
    config.head.num_classes = data.n_speakers
    state = builders.create_train_state(
        jax.random.key(config.seed),
        builders.build_encoder(config),
        builders.build_head(config),
        builders.make_optimizer(config),
        config.train.n_frames,
    )
    variables = evaluate.encoder_variables(state)
    result = runs.evaluate_run(config, tmp_path, variables, step=0, train_split=data)
    assert result["eer"] > RATIO * result["baseline/eer"], result
