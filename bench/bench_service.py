"""The cascade's cost in a verification service: enroll once, then one claim per utterance.

    python bench/bench_service.py --random-init [--speakers 20] [--claims 200]
    python bench/bench_service.py --workdir runs/demo          # PTQ stages of an FP32 run
    python bench/bench_service.py --study runs/qat_demo        # QAT stages of a study

N speakers are enrolled once at every stage (one utterance each); then M claims arrive,
one test utterance each, and are decided as ``sqjax.deploy.Verifier`` decides them: embed
at the first stage, escalate while ``|llr - eta| < tau``, the last stage decides. For each
tau of a sweep (one tau shared by the stages, chosen so that 0, 10, ..., 100% of the claims
leave the first stage) it reports, per claim, the embeddings computed at each stage and the
wall time, against FP32 alone (one FP32 embedding per claim), for both runtimes: sqjax's
jitted embedding (JAX) and ONNX Runtime (``sqjax.deploy.runtime.Encoder``).

The llr of a stage is its raw cosine (a = 1, b = 0) and eta FP32's median claim score:
the escalation fraction is set by tau, so the cost curve does not depend on calibration.
``--random-init`` builds the demo preset (configs/demo.py) with random weights and random
(frames, 80) utterances of 2 to 4 s: no trained run needed, and the cost is the same as a
trained model's (what a claim costs depends on the stages it reaches, not on the weights).
With a run or a study, enrollments and claims come from its test set.

ONNX Runtime: every stage is its own session with its own thread pool; with the default
(one thread per core, spinning) the sessions slowed each other down on a 2-core CPU, so
a claim that reached all three stages took 7.0x one FP32 embedding instead of ~3x.
``--ort-threads 1`` gives each session one thread.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).parents[1]


def random_state(config, seed: int = 0):
    """A train state of random encoder variables (He-scaled kernels, BatchNorm statistics
    away from 0 and 1), shapes from ``eval_shape`` so nothing compiles."""
    import jax
    import jax.numpy as jnp

    from sqjax import builders

    encoder = builders.build_encoder(config)
    x = jax.ShapeDtypeStruct((2, 200, encoder.n_mels), jnp.float32)
    shapes = jax.eval_shape(lambda x: encoder.init(jax.random.key(0), x, train=False), x)
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            v = rng.normal(size=s.shape) * np.sqrt(2 / np.prod(s.shape[:-1]))
        elif "var" in name:
            v = rng.uniform(0.5, 1.5, s.shape)
        elif "scale" in name:
            v = rng.uniform(0.8, 1.2, s.shape)
        else:
            v = rng.normal(size=s.shape) * 0.1
        return jnp.asarray(v, s.dtype)

    v = jax.tree_util.tree_map_with_path(fill, shapes)
    return builders.TrainState(
        step=jnp.zeros((), jnp.int32), params={"encoder": v["params"]},
        batch_stats=v["batch_stats"], opt_state=(), qstate=(),
    )  # fmt: skip


def stage_models(args, tmp: Path):
    """``(config, {name: JAX variables}, {name: ONNX file}, utterances, speakers)``."""
    from sqjax import evaluate, prepare, runs
    from sqjax.config import load_config
    from sqjax.deploy import commands
    from sqjax.experiments import cascade as cascade_lib
    from sqjax.experiments import precisions

    names = cascade_lib.stage_names(args.stages)
    low = [b for b in args.stages if b != 32]
    files = {n: tmp / f"{n}.onnx" for n in names}
    if args.random_init:
        config = load_config(str(ROOT / "configs" / "demo.py"))
        state = random_state(config)
        variables = {"fp32": evaluate.encoder_variables(state)}
        for n, b in zip(names, args.stages):
            commands.export_state_onnx(config, state, files[n], b)
            if b != 32:
                variables[n] = runs.ptq_variables(config, state, b)
        rng = np.random.default_rng(1)
        n_utts = args.speakers * 2 + args.claims
        utts = [
            rng.normal(size=(int(rng.integers(200, 401)), config.model.n_mels)).astype(np.float32)
            for _ in range(n_utts)
        ]
        speakers = np.concatenate(
            [np.arange(args.speakers)] * 2 + [rng.integers(0, args.speakers, args.claims)]
        )
        return config, variables, files, utts, speakers
    if args.study:
        config, variables = precisions.study_precisions(args.study)
        fp32_dir = Path(
            runs.workdir_lib.load_run_config(Path(args.study) / names[0]).quant.init_from
        )
        for n in names:
            src = fp32_dir if n == "fp32" else Path(args.study) / n
            commands.export_onnx(workdir=src, out=files[n])
    else:
        config, variables = precisions.ptq_precisions(args.workdir, low)
        for n, b in zip(names, args.stages):
            commands.export_onnx(workdir=args.workdir, out=files[n], bits=None if b == 32 else b)
    split = prepare.test_data(config)
    spk = np.unique(split.corpus.speakers, return_inverse=True)[1]
    return config, variables, files, list(split.feats), spk


def claims_of(speakers: np.ndarray, n_speakers: int, n_claims: int, seed: int = 0):
    """Enrollment utterance per speaker (its first) and ``n_claims`` claims ``(speaker,
    utterance)`` on the others, half of them target claims."""
    rng = np.random.default_rng(seed)
    ids = np.unique(speakers)[:n_speakers]
    enroll = {int(s): int(np.flatnonzero(speakers == s)[0]) for s in ids}
    rest = np.array([i for i in range(len(speakers)) if i not in enroll.values()])
    claims = []
    for k in range(n_claims):
        u = int(rest[k % len(rest)])
        own = int(speakers[u])
        if k % 2 == 0 and own in enroll:
            claims.append((own, u))
        else:
            claims.append((int(rng.choice([s for s in enroll if s != own])), u))
    return enroll, claims


def serve(embed, enroll, claims, feats, eta: float, tau: float):
    """Enrolls, then decides each claim through the stages (``Verifier.verify``'s rule).
    Returns ``(stage per claim, embeddings per stage, claim wall s, enrollment wall s)``."""
    n = len(embed)
    t = time.perf_counter()
    models = {s: [embed[p](feats[u]) for p in range(n)] for s, u in enroll.items()}
    t_enroll = time.perf_counter() - t
    stage, counts = np.zeros(len(claims), int), np.zeros(n, int)
    t = time.perf_counter()
    for c, (s, u) in enumerate(claims):
        for p in range(n):
            e, x = models[s][p], embed[p](feats[u])
            counts[p] += 1
            llr = float(np.dot(e, x) / (np.linalg.norm(e) * np.linalg.norm(x)))
            if p == n - 1 or abs(llr - eta) >= tau:
                stage[c] = p
                break
    return stage, counts, time.perf_counter() - t, t_enroll


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="a trained FP32 run: PTQ stages")
    src.add_argument("--study", help="a `sqjax qat` study: its QAT stages")
    src.add_argument("--random-init", action="store_true", help="the demo preset, random weights")
    p.add_argument("--stages", default="2,4,32")
    p.add_argument("--speakers", type=int, default=20, help="N enrolled speakers")
    p.add_argument("--claims", type=int, default=200, help="M claims")
    p.add_argument("--fractions", default="0,0.1,0.2,0.3,0.5,0.7,1.0",
                   help="shares of claims that leave the first stage (each sets one tau)")  # fmt: skip
    p.add_argument("--runtimes", default="jax,onnx")
    p.add_argument("--ort-threads", type=int, default=0,
                   help="intra-op threads per ONNX Runtime session (0: its default)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="passes per setting; the fastest counts")
    args = p.parse_args()
    args.stages = [int(b) for b in args.stages.split(",")]

    from sqjax import builders, evaluate
    from sqjax.deploy import runtime

    tmp = Path(tempfile.mkdtemp(prefix="bench_service_"))
    config, variables, files, feats, speakers = stage_models(args, tmp)
    names = list(files)
    enroll, claims = claims_of(speakers, args.speakers, args.claims)
    # One claim, one utterance: batches of 1 (a batch of eval.batch_size would pad it).
    kw = {"batch_size": 1, "max_frames": config.eval.max_frames}

    def jax_embed(fn, v):
        return lambda f: evaluate.extract_embeddings(fn, v, [f], **kw)[0]

    def onnx_embed(encoder):
        return lambda f: encoder.embed([f])[0]

    embedders = {}
    if "jax" in args.runtimes:
        fn = evaluate.jitted_embed(builders.build_encoder(config))
        embedders["jax"] = [jax_embed(fn, variables[n]) for n in names]
    if "onnx" in args.runtimes:
        embedders["onnx"] = [
            onnx_embed(runtime.Encoder(files[n], threads=args.ort_threads)) for n in names
        ]

    used = sorted({u for _, u in claims} | set(enroll.values()))
    # Every length rung compiled (JAX) and every session warm before any timing.
    for emb in embedders.values():
        for e in emb:
            for u in used:
                e(feats[u])
    # Scores of the first stage and FP32 on the claims, to set eta and the taus.
    ref = embedders.get("onnx") or embedders["jax"]
    cos = lambda a, b: float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    s0 = np.array([cos(ref[0](feats[enroll[s]]), ref[0](feats[u])) for s, u in claims])
    s_last = np.array([cos(ref[-1](feats[enroll[s]]), ref[-1](feats[u])) for s, u in claims])
    eta = float(np.median(s_last))
    margin = np.sort(np.abs(s0 - eta))
    fractions = [float(f) for f in args.fractions.split(",")]

    bits = np.array(args.stages, float)
    print(f"{'demo preset, random init' if args.random_init else args.workdir or args.study}: "
          f"stages {', '.join(names)}; {len(enroll)} speakers enrolled once per stage, "
          f"{len(claims)} claims, one utterance each ({np.mean([len(feats[u]) for _, u in claims]):.0f} frames mean)")  # fmt: skip
    head = ["runtime", "escalated", *[f"@{n}" for n in names], "emb/claim", "rel bitops",
            "ms/claim", "FP32 ms/claim", "wall / FP32"]  # fmt: skip
    rows = [head]
    for rt, emb in embedders.items():

        def best(stages, tau):  # the fastest of --repeats passes (this CPU is shared)
            runs = [serve(stages, enroll, claims, feats, eta, tau) for _ in range(args.repeats)]
            return min(runs, key=lambda r: r[2])

        _, _, t_fp32, t_enr = best([emb[-1]], 0.0)
        for f in fractions:
            # tau: claims with |s0 - eta| < tau escalate; f of them.
            k = round(f * len(claims))
            tau = (
                0.0
                if k == 0
                else (np.inf if k >= len(claims) else float(margin[k - 1] + margin[k]) / 2)
            )
            stage, counts, wall, _ = best(emb, tau)
            per_claim = counts / len(claims)
            rows.append([
                rt, f"{np.mean(stage > 0):.0%}",
                *[f"{100 * np.mean(stage == p):.0f}%" for p in range(len(names))],
                f"{per_claim.sum():.2f}", f"{(per_claim * bits).sum() / 32:.3f}",
                f"{1e3 * wall / len(claims):.2f}", f"{1e3 * t_fp32 / len(claims):.2f}",
                f"{wall / t_fp32:.2f}",
            ])  # fmt: skip
        rows.append(
            [f"  ({rt}: enrolling {len(enroll)} speakers in FP32 alone took {t_enr:.2f} s)"]
        )
    widths = [max(len(r[i]) for r in rows if len(r) == len(head)) for i in range(len(head))]
    for r in rows:
        print(r[0] if len(r) == 1 else "  ".join(c.rjust(w) for c, w in zip(r, widths)))
    print("@stage: share of claims decided there; emb/claim: embeddings computed per claim "
          "(FP32 alone: 1.00); rel bitops: per claim against FP32 alone (weight bits x MACs; "
          "the same MACs at every stage); wall / FP32: claim time against one FP32 "
          "embedding per claim, same runtime")  # fmt: skip


if __name__ == "__main__":
    main()
