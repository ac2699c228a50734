"""Post-training compression of causal LMs: GPTQ, SparseGPT (alone or joint), RTN, magnitude and Wanda.

``compress_model(model, Spec.parse("sparsegpt-50+gptq-w4g64"), calibration_ids, settings)`` compresses the
decoder-layer Linears in place; ``save_compressed`` / ``load_compressed`` store and restore the result.
``compress_to_dir`` / ``load_or_compress`` compress a model once into the cache (calibration windows from a
corpus's train split) and load it simulated or with real low-bit CPU kernels; ``export_gptq`` writes the
standard GPTQ format.
"""

from cpt_bench.compress.cache import ModelError, compress_to_dir, load_or_compress, model_fingerprint
from cpt_bench.compress.calibration import CalibrationError, calibration_windows, corpus_calibration_ids
from cpt_bench.compress.export import ExportError, export_gptq
from cpt_bench.compress.kernels import LowBitLinear, UnsupportedLayerError, to_real_kernels
from cpt_bench.compress.pipeline import load_compressed_model, memory_table
from cpt_bench.compress.sequential import (
    CalibrationSettings,
    CompressionResult,
    LayerReport,
    check_model,
    compress_model,
)
from cpt_bench.compress.spec import Pruning, Quantization, Spec, SpecError
from cpt_bench.compress.storage import StorageError, load_compressed, read_manifest, save_compressed

__all__ = [
    "CalibrationError",
    "CalibrationSettings",
    "CompressionResult",
    "ExportError",
    "LayerReport",
    "LowBitLinear",
    "ModelError",
    "Pruning",
    "Quantization",
    "Spec",
    "SpecError",
    "StorageError",
    "UnsupportedLayerError",
    "calibration_windows",
    "check_model",
    "compress_model",
    "compress_to_dir",
    "corpus_calibration_ids",
    "export_gptq",
    "load_compressed",
    "load_compressed_model",
    "load_or_compress",
    "memory_table",
    "model_fingerprint",
    "read_manifest",
    "save_compressed",
    "to_real_kernels",
]
