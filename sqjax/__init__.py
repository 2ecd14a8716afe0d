"""sqjax: low-bit K-means quantization of speaker-verification models in JAX/Flax.

The quantizer works on any params pytree (``uniform_quantizer`` for integer grids)::

    import sqjax
    quantizer = sqjax.kmeans_quantizer(sqjax.default_rules(bits=2))
    qstate = quantizer.init(params)            # fit one codebook per kernel
    qparams = quantizer.apply(params, qstate)  # quantized forward, straight-through backward
    qstate = quantizer.update(params, qstate)  # refresh codebooks during training

Importing ``sqjax`` imports none of its modules (nor JAX): each public name is imported
from its module on first use (PEP 562), so the command line starts fast.
"""

import importlib

__version__ = "0.1.0"

# Each public name and the module it lives in.
_EXPORTS = {
    "PRESETS": "sqjax.models",
    "AAMSoftmax": "sqjax.models",
    "Corpus": "sqjax.data",
    "DataError": "sqjax.data",
    "KMeansQuantizer": "sqjax.quant",
    "Quantizer": "sqjax.quant",
    "QuantizerState": "sqjax.quant",
    "ResNet": "sqjax.models",
    "Rule": "sqjax.quant",
    "Trials": "sqjax.data",
    "UniformState": "sqjax.uniform",
    "act_dcf": "sqjax.metrics",
    "apply_calibration": "sqjax.metrics",
    "assign": "sqjax.kmeans",
    "build_encoder": "sqjax.models",
    "calibrate": "sqjax.analysis",
    "cllr": "sqjax.metrics",
    "codebook_indices": "sqjax.quant",
    "cosine_scores": "sqjax.evaluate",
    "count_params": "sqjax.models",
    "default_rules": "sqjax.quant",
    "det_curve": "sqjax.metrics",
    "distortion_report": "sqjax.quant",
    "eer": "sqjax.metrics",
    "encoder_macs": "sqjax.models",
    "export_packed": "sqjax.export",
    "extract_embeddings": "sqjax.evaluate",
    "extract_embeddings_all": "sqjax.evaluate",
    "extract_features": "sqjax.features",
    "fit_calibration": "sqjax.metrics",
    "format_plan": "sqjax.quant",
    "generate_corpus": "sqjax.synth",
    "import_wespeaker": "sqjax.wespeaker",
    "kaldi_fbank": "sqjax.features",
    "kmeans_1d": "sqjax.kmeans",
    "kmeans_1d_batch": "sqjax.kmeans",
    "kmeans_1d_grouped": "sqjax.kmeans",
    "kmeans_quantizer": "sqjax.quant",
    "knee": "sqjax.analysis",
    "load_audio": "sqjax.data",
    "load_packed": "sqjax.export",
    "logmel": "sqjax.features",
    "min_cllr": "sqjax.analysis",
    "min_dcf": "sqjax.metrics",
    "path_parts": "sqjax.quant",
    "plan": "sqjax.quant",
    "precision_embed": "sqjax.evaluate",
    "ptq_stack": "sqjax.quant",
    "quantize_params": "sqjax.quant",
    "read_corpus": "sqjax.data",
    "read_metadata": "sqjax.export",
    "read_trials": "sqjax.data",
    "score_analysis": "sqjax.analysis",
    "size_report": "sqjax.export",
    "stack_precisions": "sqjax.quant",
    "uniform_quantizer": "sqjax.uniform",
    "verification_metrics": "sqjax.metrics",
}

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


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sqjax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
