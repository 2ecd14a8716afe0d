"""Speaker-identity baselines on the built-in synthetic corpus (no learning beyond LDA).

Generates (or reuses) a corpus with `sqjax.synth.generate_corpus`, pools raw log-mel
features per utterance and reports the EER of cosine scoring on the test trials:

  raw-std:   log-mel, NOT mean-normalised, pooled mean+std, each dim standardised with
             train-set statistics (the library's baseline), then cosine;
  cmn-std:   the same with per-utterance mean normalisation (the pooled mean is then 0, so
             this is the std over time only);
  raw/cmn:   the same without standardisation;
  raw-lda:   raw-std embeddings projected by LDA fitted on the train speakers: a cheap
             learned model, showing how much identity a trained system can recover.

Usage:
  python bench/synth_baseline.py --out /tmp/sqjax_synth_d1 --difficulty 1.0 --workers 2
  taskset -c 0 python bench/synth_baseline.py --speed   # x real time of one core
"""

import argparse
import concurrent.futures
import pathlib
import time

import librosa
import numpy as np
import soundfile as sf
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.metrics import roc_curve

from sqjax import synth


def pooled_logmel(path: str) -> np.ndarray:
    """(2, 160): [raw, mean-normalised] log-mel pooled as concat(mean, std) over time."""
    wave, sr = sf.read(path, dtype="float32")
    mel = librosa.feature.melspectrogram(
        y=wave, sr=sr, n_fft=512, win_length=400, hop_length=160, n_mels=80
    )
    logmel = np.log(mel + 1e-6)  # (80, frames)
    cmn = logmel - logmel.mean(axis=1, keepdims=True)
    return np.stack([np.concatenate([f.mean(1), f.std(1)]) for f in (logmel, cmn)])


def read_split(split_dir: pathlib.Path) -> tuple[list[str], list[str], list[str]]:
    """Utterance ids, speaker ids and wav paths of a Kaldi data dir, in wav.scp order."""
    scp = dict(line.split(maxsplit=1) for line in (split_dir / "wav.scp").read_text().splitlines())
    u2s = dict(line.split() for line in (split_dir / "utt2spk").read_text().splitlines())
    utts = sorted(scp)
    return utts, [u2s[u] for u in utts], [scp[u] for u in utts]


def eer(scores: np.ndarray, labels: np.ndarray) -> float:
    """Equal error rate (%) from the ROC curve."""
    fpr, tpr, _ = roc_curve(labels, scores)
    fnr = 1 - tpr
    i = np.nanargmin(np.abs(fnr - fpr))
    return 100 * (fpr[i] + fnr[i]) / 2


def cosine_eer(emb: dict[str, np.ndarray], trials: list[tuple[str, str, int]]) -> float:
    """EER of cosine scoring of L2-normalised embeddings over Kaldi trials."""
    unit = {u: e / np.linalg.norm(e) for u, e in emb.items()}
    scores = np.array([unit[a] @ unit[b] for a, b, _ in trials])
    return eer(scores, np.array([t for _, _, t in trials]))


def speed(difficulty: float, n: int = 60) -> None:
    """Prints seconds of audio synthesised per second of one process (x real time)."""
    rngs = [np.random.default_rng([0, 2, i]) for i in range(n)]
    voices = [synth.sample_voice(np.random.default_rng([0, 1, i])) for i in range(n)]
    durations = [rng.uniform(2.0, 4.0) for rng in rngs]
    synth.synthesize_utterance(voices[0], np.random.default_rng(0), 1.0)  # warm-up
    start = time.process_time()  # CPU time: robust to other jobs on a shared machine
    for voice, rng, duration in zip(voices, rngs, durations):
        synth.synthesize_utterance(voice, rng, duration, 16000, difficulty)
    elapsed = time.process_time() - start
    print(
        f"{sum(durations):.0f} s of audio in {elapsed:.2f} s CPU: "
        f"{sum(durations) / elapsed:.0f}x real time (difficulty={difficulty})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/sqjax_synth_bench")
    parser.add_argument("--difficulty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=100)
    parser.add_argument("--n-test", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--speed", action="store_true", help="only time the synthesiser")
    args = parser.parse_args()
    if args.speed:
        return speed(args.difficulty)

    start = time.perf_counter()
    root = synth.generate_corpus(
        args.out,
        n_train_speakers=args.n_train,
        n_test_speakers=args.n_test,
        difficulty=args.difficulty,
        seed=args.seed,
        workers=args.workers,
    )
    print(f"corpus {root} ready in {time.perf_counter() - start:.0f} s")

    feats, speakers = {}, {}
    for split in ("train", "test"):
        utts, spks, paths = read_split(root / split)
        with concurrent.futures.ProcessPoolExecutor(args.workers) as pool:
            pooled = np.stack(list(pool.map(pooled_logmel, paths, chunksize=16)))
        feats[split] = dict(zip(utts, pooled))
        speakers[split] = spks
    trials = [
        (a, b, int(label == "target"))
        for a, b, label in (
            line.split() for line in (root / "test" / "trials").read_text().splitlines()
        )
    ]

    train = np.stack(list(feats["train"].values()))  # (utts, 2, 160)
    mean, std = train.mean(0), train.std(0) + 1e-8
    results = {}
    for k, name in enumerate(("raw", "cmn")):
        results[name] = cosine_eer({u: f[k] for u, f in feats["test"].items()}, trials)
        results[f"{name}-std"] = cosine_eer(
            {u: (f[k] - mean[k]) / std[k] for u, f in feats["test"].items()}, trials
        )
    lda = LinearDiscriminantAnalysis().fit((train[:, 0] - mean[0]) / std[0], speakers["train"])
    results["raw-lda"] = cosine_eer(
        {u: lda.transform(((f[0] - mean[0]) / std[0])[None])[0] for u, f in feats["test"].items()},
        trials,
    )
    print(
        f"difficulty={args.difficulty} train_spk={args.n_train} test_spk={args.n_test} "
        f"trials={len(trials)}"
    )
    for name, value in results.items():
        print(f"  EER {name:8s} {value:5.1f} %")


if __name__ == "__main__":
    main()
