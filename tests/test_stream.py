"""Streamed training input: waveform crops read from files, batches independent of the
process count, Grain workers, and host memory that does not grow with the corpus."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import soundfile as sf

from sqjax import jaxfeatures
from sqjax.data import DataError
from sqjax.pipeline import CropSampler, WaveSampler, local_batches, read_crop


def _wav(path, wave, sr=16000):
    sf.write(path, wave, sr, subtype="FLOAT")
    return str(path)


def test_read_crop_is_a_window_of_the_file_or_wraps(tmp_path):
    ramp = np.arange(1000, dtype=np.float32) / 1000
    path = _wav(tmp_path / "a.wav", ramp)
    rng = np.random.default_rng(0)
    for _ in range(5):
        c = read_crop(path, 300, 16000, rng)
        start = round(float(c[0]) * 1000)
        np.testing.assert_array_equal(c, ramp[start : start + 300])
    np.testing.assert_array_equal(
        read_crop(path, 2500, 16000, rng), np.concatenate([ramp, ramp, ramp[:500]])
    )
    stereo = np.stack([ramp, -ramp], axis=1)  # channels are averaged: zeros
    np.testing.assert_array_equal(read_crop(_wav(tmp_path / "s.wav", stereo), 200, 16000, rng), 0)


def test_read_crop_resamples_and_names_bad_files(tmp_path):
    t = np.arange(32000) / 32000
    path = _wav(tmp_path / "32k.wav", np.sin(2 * np.pi * 440 * t).astype(np.float32), sr=32000)
    c = read_crop(path, 3200, 16000, np.random.default_rng(0))
    assert c.shape == (3200,) and c.dtype == np.float32
    # A 440 Hz tone stays a 440 Hz tone at the new rate.
    spectrum = np.abs(np.fft.rfft(c))
    assert abs(np.argmax(spectrum) * 16000 / 3200 - 440) <= 5
    low = _wav(tmp_path / "8k.wav", np.zeros(8000, np.float32), sr=8000)
    with pytest.raises(DataError, match="8k.wav: 8000 Hz audio, below"):
        read_crop(low, 3200, 16000, np.random.default_rng(0))
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    with pytest.raises(DataError, match="bad.wav: cannot read audio"):
        read_crop(str(bad), 100, 16000, np.random.default_rng(0))
    with pytest.raises(DataError, match="missing.wav"):
        read_crop(str(tmp_path / "missing.wav"), 100, 16000, np.random.default_rng(0))


def _wave_corpus(root, n_spk=4, per_spk=3, seconds=0.5):
    rng = np.random.default_rng(1)
    paths, labels = [], []
    for s in range(n_spk):
        for u in range(per_spk):
            # Speaker s's files hold samples around s: a crop's mean names its speaker.
            wave = (s + 0.01 * rng.normal(size=int(16000 * seconds))).astype(np.float32)
            paths.append(_wav(root / f"s{s}u{u}.wav", wave))
            labels.append(s)
    return paths, np.array(labels)


def test_wave_batches_are_balanced_labelled_and_split_by_rows(tmp_path):
    paths, labels = _wave_corpus(tmp_path)
    s = WaveSampler(paths, labels, n_samples=800, sample_rate=16000, seed=3)
    a = s.batch(7, 4)
    assert a["wave"].shape == (4, 800) and a["labels"].dtype == np.int32
    assert sorted(a["labels"]) == [0, 1, 2, 3]  # distinct speakers while there are enough
    np.testing.assert_allclose(a["wave"].mean(1), a["labels"], atol=0.01)
    np.testing.assert_array_equal(a["wave"], s.batch(7, 4)["wave"])
    assert not np.array_equal(a["wave"], s.batch(8, 4)["wave"])
    # Rows [lo, hi) are those rows of the whole batch: any number of processes that
    # split a global batch builds the same global batch.
    halves = [s.batch(7, 4, 0, 2), s.batch(7, 4, 2, 4)]
    np.testing.assert_array_equal(np.concatenate([h["wave"] for h in halves]), a["wave"])
    feats = [np.full((30, 2), float(i), np.float32) for i in range(len(labels))]
    c = CropSampler(feats, labels, n_frames=10, seed=3)
    rows = np.concatenate([c.batch(7, 4, 0, 1)["feats"], c.batch(7, 4, 1, 4)["feats"]])
    np.testing.assert_array_equal(rows, c.batch(7, 4)["feats"])
    # Both samplers make the same draws: crop j of step 7 is from the same utterance.
    np.testing.assert_array_equal(c.batch(7, 4)["labels"], a["labels"])


def test_grain_workers_build_the_same_batches(tmp_path):
    paths, labels = _wave_corpus(tmp_path)
    s = WaveSampler(paths, labels, n_samples=800, sample_rate=16000, seed=0)
    threads = list(local_batches(s, 2, 6, 4, workers=0))
    procs = list(local_batches(s, 2, 6, 4, workers=2))
    assert len(threads) == len(procs) == 4
    for step, (x, y) in enumerate(zip(threads, procs, strict=True), start=2):
        np.testing.assert_array_equal(x["wave"], s.batch(step, 4)["wave"])
        np.testing.assert_array_equal(x["wave"], y["wave"])


# Trains a few streamed steps of a small model on a Kaldi dir and prints peak RSS (MB).
_RSS_SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from sqjax import prepare, train
    from sqjax.config import default_config

    c = default_config()
    c.progress = False
    c.num_devices = 1
    c.data.train, c.data.input, c.data.workers = sys.argv[1], "stream", 0
    c.model.name, c.model.embed_dim = "resnet_tiny", 16
    c.train.num_steps, c.train.batch_size, c.train.n_frames = 4, 8, 100
    c.train.log_every, c.train.checkpoint_every = 2, 4
    data = prepare.training_input(c)
    c.head.num_classes = data.n_speakers
    train.train(c, sys.argv[2], data)
    print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    """
)


def _kaldi_dir(root, n_utts, seconds, seed):
    rng = np.random.default_rng(seed)
    root.mkdir()
    wav_scp, utt2spk = [], []
    for i in range(n_utts):
        name = f"spk{i % 50:03d}-u{i:05d}"
        wave = (0.1 * rng.normal(size=int(16000 * seconds))).astype(np.float32)
        sf.write(root / f"{name}.wav", wave, 16000, subtype="PCM_16")
        wav_scp.append(f"{name} {name}.wav\n")
        utt2spk.append(f"{name} spk{i % 50:03d}\n")
    (root / "wav.scp").write_text("".join(wav_scp))
    (root / "utt2spk").write_text("".join(utt2spk))
    return root


def test_streamed_training_memory_does_not_grow_with_the_corpus(tmp_path):
    # 250 and 1000 utterances of 8 s (64 and 256 MB of 16-bit audio). Their 80-bin
    # log-mel features would hold 64 and 256 MB of RAM with data.input="cache": the
    # difference exceeds the allowance below (10% of about 1.2 GB, plus 20 MB).
    sizes = (250, 1000)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    procs = {  # both at once (each process's own peak RSS; mostly one core each)
        n: subprocess.Popen(
            [sys.executable, "-c", _RSS_SCRIPT, str(_kaldi_dir(tmp_path / f"c{n}", n, 8.0, n))]
            + [str(tmp_path / f"run{n}")],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for n in sizes
    }
    rss = {}
    for n, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        rss[n] = json.loads(out.strip().splitlines()[-1])["rss_mb"]
        metrics = (tmp_path / f"run{n}" / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(r)["step"] for r in metrics] == [2, 4]
    print(f"peak RSS: {rss[250]:.0f} MB (250 utterances), {rss[1000]:.0f} MB (1000)")
    assert rss[1000] <= 1.10 * rss[250] + 20, rss


def test_frames_to_samples_gives_the_training_crop_length():
    n = jaxfeatures.frames_to_samples(200)
    assert 1 + (n - 512) // 160 == 200 and 1 + (n - 1 - 512) // 160 == 199


@pytest.mark.parametrize("kind", ["logmel", "kaldi"])
def test_stream_features_equal_the_host_features(kind):
    from sqjax import features, train
    from sqjax.config import default_config

    c = default_config()
    c.features.kind, c.model.n_mels = kind, 40
    featurize, banks, n = train.stream_input(c, 50)
    assert banks == {}  # no augmentation by default
    wave = (0.1 * np.random.default_rng(0).normal(size=(2, n))).astype(np.float32)
    got = np.asarray(featurize(0, wave, banks))
    host = {"logmel": features.logmel, "kaldi": features.kaldi_fbank}[kind]
    ref = np.stack([host(w, 16000, 40, mean_norm=True) for w in wave])
    assert got.shape == ref.shape == (2, 50, 40)
    np.testing.assert_allclose(got, ref, atol=5e-4)

    c.data.augment.p_noise = c.data.augment.p_reverb = 1.0
    featurize, banks, _ = train.stream_input(c, 50)
    assert banks["noises"].shape == (64, 96000) and banks["rirs"].shape == (64, 16000)
    a, b = (np.asarray(featurize(s, wave, banks)) for s in (0, 1))
    assert not np.allclose(a, got, atol=0.1) and not np.allclose(a, b, atol=0.1)
    np.testing.assert_array_equal(
        a, np.asarray(featurize(0, wave, banks))
    )  # a function of the step
    c.data.augment.p_noise = 1.5
    with pytest.raises(ValueError, match="p_noise=1.5 must be within"):
        train.stream_input(c, 50)


def test_closing_the_input_stops_its_thread_and_grain_workers(tmp_path):
    import multiprocessing
    import threading
    import time

    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from sqjax.pipeline import prefetch

    paths, labels = _wave_corpus(tmp_path)
    s = WaveSampler(paths, labels, n_samples=800, sample_rate=16000, seed=0)
    sharding = NamedSharding(Mesh(np.array(jax.devices()[:1]), ("data",)), P("data"))
    threads = threading.active_count()
    batches = prefetch(s, 0, 1000, 4, sharding, workers=2)
    np.testing.assert_array_equal(np.asarray(next(batches)["wave"]), s.batch(0, 4)["wave"])
    assert len(multiprocessing.active_children()) >= 2
    batches.close()  # as a training loop that raised (contextlib.closing in train.train)
    deadline = time.monotonic() + 30
    while (multiprocessing.active_children() or threading.active_count() > threads) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.2)
    assert not multiprocessing.active_children()
    assert threading.active_count() <= threads
