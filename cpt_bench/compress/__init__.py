"""Post-training compression of causal LMs: GPTQ, SparseGPT (alone or joint), RTN, magnitude and Wanda.

One entry per job:

- ``compress_model(model, Spec.parse("sparsegpt-50+gptq-w4g64"), calibration_ids, settings)``: compress an
  in-memory model's decoder-layer Linears in place (``sequential``);
- ``compress_to_folder`` / ``cached_checkpoint``: compress a model into a checkpoint folder of one's own, or look
  up (build on first use) the cache's (``checkpoints``);
- ``load_checkpoint``: a runnable model from a checkpoint folder, simulated or on real low-bit kernels.

To load a model by name, dense or compressed, use ``cpt_bench.models.load_model``. ``export_gptq`` writes the
standard GPTQ format; ``import_gptq`` reads one written elsewhere into a checkpoint folder.
"""

from cpt_bench.compress.calibration import CalibrationError
from cpt_bench.compress.checkpoints import cached_checkpoint, compress_to_folder, load_checkpoint
from cpt_bench.compress.export import ExportError, export_gptq
from cpt_bench.compress.gptq_import import GptqImportError, import_gptq
from cpt_bench.compress.kernels import UnsupportedLayerError
from cpt_bench.compress.sequential import compress_model
from cpt_bench.compress.spec import CalibrationSettings, CompressionResult, Spec, SpecError
from cpt_bench.compress.storage import StorageError, memory_table, read_manifest, save_compressed

__all__ = [
    "CalibrationError",
    "CalibrationSettings",
    "CompressionResult",
    "ExportError",
    "GptqImportError",
    "Spec",
    "SpecError",
    "StorageError",
    "UnsupportedLayerError",
    "cached_checkpoint",
    "compress_model",
    "compress_to_folder",
    "export_gptq",
    "import_gptq",
    "load_checkpoint",
    "memory_table",
    "read_manifest",
    "save_compressed",
]
