"""sqjax: low-bit K-means quantization of speaker-verification models in JAX/Flax.

The quantizer works on any params pytree (``uniform_quantizer`` for integer grids)::

    import sqjax
    quantizer = sqjax.kmeans_quantizer(sqjax.default_rules(bits=2))
    qstate = quantizer.init(params)            # fit one codebook per kernel
    qparams = quantizer.apply(params, qstate)  # quantized forward, straight-through backward
    qstate = quantizer.update(params, qstate)  # refresh codebooks during training
"""

from sqjax.analysis import calibrate, knee, min_cllr, score_analysis
from sqjax.data import Corpus, DataError, Trials, load_audio, read_corpus, read_trials
from sqjax.evaluate import (
    cosine_scores,
    extract_embeddings,
    extract_embeddings_all,
    precision_embed,
)
from sqjax.export import export_packed, load_packed, read_metadata, size_report
from sqjax.features import extract_features, kaldi_fbank, logmel
from sqjax.kmeans import assign, kmeans_1d, kmeans_1d_batch, kmeans_1d_grouped
from sqjax.metrics import (
    act_dcf,
    apply_calibration,
    cllr,
    det_curve,
    eer,
    fit_calibration,
    min_dcf,
    verification_metrics,
)
from sqjax.models import PRESETS, AAMSoftmax, ResNet, build_encoder, count_params, encoder_macs
from sqjax.quant import (
    KMeansQuantizer,
    Quantizer,
    QuantizerState,
    Rule,
    codebook_indices,
    default_rules,
    distortion_report,
    format_plan,
    kmeans_quantizer,
    path_parts,
    plan,
    ptq_stack,
    quantize_params,
    stack_precisions,
)
from sqjax.synth import generate_corpus
from sqjax.uniform import UniformState, uniform_quantizer
from sqjax.wespeaker import import_wespeaker

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "AAMSoftmax",
    "Corpus",
    "DataError",
    "KMeansQuantizer",
    "Quantizer",
    "QuantizerState",
    "ResNet",
    "Rule",
    "Trials",
    "UniformState",
    "act_dcf",
    "apply_calibration",
    "assign",
    "build_encoder",
    "calibrate",
    "cllr",
    "codebook_indices",
    "cosine_scores",
    "count_params",
    "default_rules",
    "det_curve",
    "distortion_report",
    "eer",
    "encoder_macs",
    "export_packed",
    "extract_embeddings",
    "extract_embeddings_all",
    "extract_features",
    "fit_calibration",
    "format_plan",
    "generate_corpus",
    "import_wespeaker",
    "kaldi_fbank",
    "kmeans_1d",
    "kmeans_1d_batch",
    "kmeans_1d_grouped",
    "kmeans_quantizer",
    "knee",
    "load_audio",
    "load_packed",
    "logmel",
    "min_cllr",
    "min_dcf",
    "path_parts",
    "plan",
    "precision_embed",
    "ptq_stack",
    "quantize_params",
    "read_corpus",
    "read_metadata",
    "read_trials",
    "score_analysis",
    "size_report",
    "stack_precisions",
    "uniform_quantizer",
    "verification_metrics",
]
