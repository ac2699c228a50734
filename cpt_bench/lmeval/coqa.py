"""lm-eval's own ``coqa`` prompt, target and em/f1 functions, importable under transformers 5 (see squad_metrics)."""

from __future__ import annotations

from cpt_bench.lmeval.squad_metrics import provide_transformers_module

provide_transformers_module()

from lm_eval.tasks.coqa.utils import doc_to_target, doc_to_text, process_results  # noqa: E402

__all__ = ["doc_to_target", "doc_to_text", "process_results"]
