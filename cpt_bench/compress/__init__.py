"""Post-training compression of causal LMs: GPTQ, SparseGPT (alone or joint), RTN, magnitude and Wanda.

``compress_model(model, Spec.parse("sparsegpt-50+gptq-w4g64"), calibration_ids, settings)`` compresses the
decoder-layer Linears in place; ``save_compressed`` / ``load_compressed`` store and restore the result.
"""

from cpt_bench.compress.sequential import (
    CalibrationSettings,
    CompressionResult,
    LayerReport,
    calibration_windows,
    check_model,
    compress_model,
)
from cpt_bench.compress.spec import Pruning, Quantization, Spec, SpecError
from cpt_bench.compress.storage import StorageError, load_compressed, read_manifest, save_compressed

__all__ = [
    "CalibrationSettings",
    "CompressionResult",
    "LayerReport",
    "Pruning",
    "Quantization",
    "Spec",
    "SpecError",
    "StorageError",
    "calibration_windows",
    "check_model",
    "compress_model",
    "load_compressed",
    "read_manifest",
    "save_compressed",
]
