"""Configs: the defaults every config file starts from, and loading with overrides.

Config files are Python files with ``get_config()`` returning a ``ConfigDict`` (as in
big_vision); they start from ``default_config()`` and override it. Command-line
overrides look like ``--config.train.num_steps=100``.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import ml_collections


class ConfigError(ValueError):
    """A config file or override the user can fix."""


class ConfigKeyError(ConfigError, KeyError):
    """An override names a key the config does not have."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ConfigTypeError(ConfigError, TypeError):
    """An override's value has another type than the default's."""


def default_config() -> ml_collections.ConfigDict:
    """Every setting sqjax reads, with its default. Names no data, so it cannot run alone."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.progress = True
    c.num_devices = 0  # 0 = every device; the batch is sharded over them
    c.distributed = False  # call jax.distributed.initialize() (multi-host GPU/TPU)

    c.data = ml_collections.ConfigDict()
    c.data.synth = False  # generate and use the built-in synthetic corpus
    c.data.synth_dir = "data/synth"
    c.data.synth_args = ml_collections.ConfigDict(
        {
            "n_train_speakers": 100,
            "n_dev_speakers": 100,
            "n_test_speakers": 500,
            "utts_per_speaker": 16,
            "test_utts_per_speaker": 16,
            "min_duration": 2.0,
            "max_duration": 4.0,
            "n_trials": 120_000,
            "difficulty": 1.0,
            "seed": 0,
            "workers": 2,
        }
    )
    c.data.train = ""  # Kaldi data dir or VoxCeleb root (idXXXXX/video/nnnnn.wav)
    c.data.test = ""
    c.data.test_trials = ""  # VoxCeleb ("1 enroll test") or Kaldi ("enroll test target")
    # Calibration trials (score -> LLR maps), speakers disjoint from train and test; the
    # built-in corpus uses its dev split.
    c.data.cal = ""
    c.data.cal_trials = ""
    c.data.feature_cache = ""  # directory for cached log-mel features ("" = no cache)
    # Training input. "cache": features extracted once (cached on disk), cropped in host
    # memory: fastest for small corpora (the built-in one). "stream": random audio crops
    # read per step by Grain workers (data.workers), log-mel and augmentation computed in
    # the jitted step: host memory independent of the corpus size (VoxCeleb).
    c.data.input = "cache"
    # Augmentation of streamed crops on the device (WeSpeaker-style): reverberation with a
    # room impulse response, then additive noise at a random SNR, each with its
    # probability. Folders of .wav/.flac (MUSAN, RIRS_NOISES); empty: synthetic ones.
    c.data.augment = ml_collections.ConfigDict(
        {
            "p_noise": 0.0,
            "p_reverb": 0.0,
            "snr_db": (0.0, 15.0),
            "noise_dir": "",
            "rir_dir": "",
            "noise_seconds": 6.0,  # each noise file cut (or tiled) to this length
            "rir_seconds": 1.0,
            "max_files": 256,  # files read from a folder (sorted), held on the device
            "n_synthetic": 64,  # synthetic noises / impulse responses
        }
    )
    c.data.sample_rate = 16000
    # Shorter files are an error, not silently padded (streamed training input, which
    # never reads whole files up front, repeats a short file to fill its crop).
    c.data.min_seconds = 0.5
    c.data.workers = 2

    c.model = ml_collections.ConfigDict()
    c.model.name = "resnet34"
    c.model.n_mels = 80
    c.model.embed_dim = 256
    c.model.width = 0  # 0 = the preset's width
    c.model.stage_sizes = ()  # () = the preset's blocks per stage, e.g. (3, 4, 6, 3)
    c.model.dtype = "float32"  # computation dtype; "bfloat16" on GPU/TPU
    # Statistics pooling's std: sqrt(var + pool_eps), var with pool_ddof (0 biased, 1
    # unbiased). WeSpeaker's models (sqjax import-wespeaker): 1 and 1e-7.
    c.model.pool_ddof = 0
    c.model.pool_eps = 1e-5

    c.features = ml_collections.ConfigDict()
    # "logmel": librosa log-mel (ours; Hann window, Slaney mel). "kaldi": Kaldi fbank as
    # WeSpeaker computes it (hamming window, pre-emphasis, HTK-style mel, int16 scale).
    c.features.kind = "logmel"

    c.head = ml_collections.ConfigDict()
    c.head.scale = 32.0
    c.head.margin = 0.2
    c.head.margin_warmup_steps = 0
    c.head.num_classes = 0  # set from the training data when a run starts

    c.train = ml_collections.ConfigDict()
    c.train.num_steps = 1000
    c.train.batch_size = 128  # global; split over devices
    c.train.microbatches = 1  # >1: accumulate gradients over chunks (faster conv grads on CPU)
    # Conv kernel gradients over slices of this many examples, summed (same gradients;
    # faster steps on XLA:CPU, bench/bench_torch.py). -1: on CPU sized per layer (one
    # example at 32-128 input channels, else eight; sqjax.cpu.slice_examples), elsewhere 0
    # (the whole batch).
    c.train.conv_slice = -1
    c.train.n_frames = 200  # 2 s crops
    c.train.optimizer = "sgd"
    c.train.learning_rate = 0.1
    c.train.final_lr_ratio = 0.01
    c.train.warmup_steps = 100
    c.train.momentum = 0.9
    c.train.weight_decay = 1e-4
    c.train.clip_norm = 0.0
    c.train.log_every = 10
    c.train.checkpoint_every = 500
    c.train.keep_checkpoints = 3

    c.quant = ml_collections.ConfigDict()
    c.quant.bits = 0  # 0 = FP32 training; 1..8 = QAT at that width
    c.quant.init_from = ""  # FP32 workdir to fine-tune from
    c.quant.per_channel = False
    c.quant.keep_float = ()  # regexes of encoder parameter paths kept in FP32
    c.quant.iters = 50  # Lloyd iterations at initialisation
    c.quant.refresh_every = 50  # steps between codebook refreshes
    c.quant.refresh_iters = 5  # warm-started Lloyd iterations per refresh
    # Train the centroids too (gradient: the sum of their members'); a refresh then only
    # re-seeds empty clusters. Off: centroids follow the weights by Lloyd refreshes.
    c.quant.learn_centroids = False
    # "kmeans": a codebook of 2^b levels fitted by Lloyd per tensor/channel; "uniform": 2^b
    # evenly spaced levels with a scale (and zero point) per tensor/channel (qwix, AQT).
    c.quant.method = "kmeans"
    c.quant.symmetric = False  # uniform: a grid symmetric about 0 (no zero point)
    c.quant.scale = "mse"  # uniform: "mse" (least-squares scale) or "minmax"
    # uniform: train the scales (LSQ); a refresh then keeps them, refitting zero points.
    c.quant.learn_scale = False
    # `sqjax qat` studies: one fine-tuning run per width, with these training settings.
    c.quant.bits_list = (8, 4, 3, 2, 1)
    c.quant.num_steps = 200
    c.quant.learning_rate = 1e-3
    c.quant.warmup_steps = 20

    # `sqjax study`: the analyses after training (resume-free: changing them reruns only
    # the analyses).
    c.study = ml_collections.ConfigDict()
    c.study.ptq_bn_utts = 256  # PTQ also with BatchNorm re-estimated on this many crops
    c.study.layer_bits = (2,)  # widths of the layer-wise analysis (PTQ and QAT)
    # layer-wise analysis on the trials among this many test (and calibration) speakers:
    # it embeds every utterance once per variant (~100 variants); 0 = all of them
    c.study.layer_speakers = 50
    c.study.protect_bits = (4, 8)  # widths the mixed-precision suggestion may use
    c.study.layer_tolerance = 0.10  # mix target: EER within this (relative) of FP32
    c.study.cascade_stages = (2, 4, 8, 32)  # 32 = FP32
    c.study.cascade_tolerance = 0.05  # cascade: EER within this (relative) of FP32

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 32
    c.eval.max_frames = 3000  # longer utterances are embedded in chunks and averaged
    c.eval.baseline = False  # also score the raw-feature baseline
    # Intervals of every comparison (sqjax.analysis.uncertainty). Ours: resample speakers
    # (trials share speakers; "trial" resamples trials), 1,000 resamples, 95% percentile
    # intervals; paired differences use the same resamples for every precision.
    c.eval.bootstrap = ml_collections.ConfigDict(
        {"unit": "speaker", "n_resamples": 1000, "level": 0.95, "seed": 0}
    )
    return c


def load_config(path: str | Path, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    """Runs ``get_config()`` of the file at ``path`` and applies ``key.path=value`` overrides.

    Values are parsed as Python literals when they parse (``3``, ``0.1``, ``True``,
    ``(1, 2)``) and taken as strings otherwise; a key the config lacks is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found (see configs/ for examples)")
    spec = importlib.util.spec_from_file_location(f"sqjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} has no get_config() function")
    return check_config(apply_overrides(module.get_config(), overrides, source=path), path)


def _widths(value, key: str, extra=()) -> None:
    if not isinstance(value, (tuple, list)) or any(
        not isinstance(b, int) or not (1 <= b <= 8 or b in extra) for b in value
    ):
        also = "".join(f" or {e}" for e in extra)
        raise ConfigError(f"config.{key}={tuple(value)}: widths are ints in 1..8{also}")


def check_config(config: ml_collections.ConfigDict, source: str | Path = "config"):
    """Refuses sizes, counts and widths no run can use, naming the setting (``source``:
    the file it came from); returns ``config``. ``load_config`` calls it: a bad value
    stops a command before it reads data or trains."""
    t, q, st = config.train, config.quant, config.study
    for key in ("num_steps", "batch_size", "n_frames", "log_every", "checkpoint_every"):
        if t[key] <= 0:
            raise ConfigError(f"config.train.{key}={t[key]} must be positive (in {source})")
    for key in ("microbatches", "keep_checkpoints"):
        if t[key] <= 0:
            raise ConfigError(f"config.train.{key}={t[key]} must be positive (in {source})")
    if config.eval.batch_size <= 0:
        raise ConfigError(f"config.eval.batch_size={config.eval.batch_size} must be positive")
    if q.bits and not 1 <= q.bits <= 8:
        raise ConfigError(f"config.quant.bits={q.bits}: use 1..8 (QAT width) or 0 (FP32)")
    _widths(q.bits_list, "quant.bits_list")
    _widths(st.layer_bits, "study.layer_bits")
    _widths(st.protect_bits, "study.protect_bits")
    stages = tuple(st.cascade_stages)
    _widths(stages, "study.cascade_stages", extra=(32,))
    if len(stages) < 2 or list(stages) != sorted(set(stages)):
        raise ConfigError(
            f"config.study.cascade_stages={stages}: give 2+ increasing widths like (2, 4, 8, 32)"
        )
    normalise_paths(config)
    s = config.data.synth_args
    if config.data.synth and (s.n_train_speakers < 2 or s.utts_per_speaker < 1):
        raise ConfigError(
            f"config.data.synth_args: n_train_speakers={s.n_train_speakers} and "
            f"utts_per_speaker={s.utts_per_speaker}: training needs 2+ speakers with 1+ "
            "utterance each"
        )
    return config


# The settings that hold a path. Where a config enters (load_config, check_config from
# runs.train_and_evaluate, workdir.load_run_config), file:// URLs in them become local
# paths, so that the code below sees a local path or an object store's URL, nothing else.
PATH_KEYS = (
    "data.synth_dir",
    "data.train",
    "data.test",
    "data.test_trials",
    "data.cal",
    "data.cal_trials",
    "data.feature_cache",
    "data.augment.noise_dir",
    "data.augment.rir_dir",
    "quant.init_from",
)


def normalise_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` (in place; also returned) with each ``PATH_KEYS`` setting's ``file://``
    prefix removed (``fileio.local``); settings a config lacks (an older run's) are skipped."""
    from sqjax import fileio

    for key in PATH_KEYS:
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if node is not None else None
        value = node.get(leaf) if node is not None else None
        if isinstance(value, str):
            node[leaf] = fileio.local(value)
    return config


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: list[str], source: str | Path = "config"
) -> ml_collections.ConfigDict:
    """Sets ``--config.key.path=value`` items on ``config`` (in place; also returned)."""
    path = source
    for item in overrides:
        key, sep, text = item.removeprefix("--").removeprefix("config.").partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected --config.<key>=<value>")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        parent, _, leaf = key.rpartition(".")
        node = config
        for part in filter(None, parent.split(".")):
            if part not in node:
                raise ConfigKeyError(f"override {item!r}: config has no key {part!r} (in {path})")
            node = node[part]
        if leaf not in node:
            raise ConfigKeyError(f"override {item!r}: config has no key {key!r} (in {path})")
        old = node[leaf]
        if isinstance(old, str):
            value = text  # a path like "2024" stays a string
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(old, (tuple, list)) and isinstance(value, (tuple, list)):
            value = type(old)(value)  # JSON round trips (config.json) turn tuples to lists
        if old is not None and type(old) is not type(value):
            raise ConfigTypeError(
                f"override {item!r}: {key} is {type(old).__name__}, got {type(value).__name__}"
            )
        node[leaf] = value
    return config
