"""lm-eval's TaskManager over our ``tasks/`` folder: one per process and (model, window length)."""

from __future__ import annotations

import functools

from cpt_bench.errors import UserError
from cpt_bench.provenance import REPO_ROOT

TASKS_DIR = REPO_ROOT / "tasks"


@functools.lru_cache(maxsize=8)
def task_manager(model_path: str | None, seqlen_tokens: int, corpus: str | None = None):
    """A TaskManager that knows our task folder; the model path (whose tokenizer cuts perplexity windows; None:
    the run's model_args must name it), the window length and the corpus spec of ``cpt_ppl_corpus`` (None: the
    run's ``--metadata`` must name it when that task runs) reach our loaders as metadata.

    Cached because indexing lm-eval's task folders takes ~8 s.
    """
    from lm_eval.tasks import TaskManager

    if not TASKS_DIR.is_dir():
        raise UserError(f"task folder {TASKS_DIR} not found; install cpt_bench from a checkout (pip install -e .)")
    metadata = {"seqlen": seqlen_tokens} | ({"pretrained": model_path} if model_path else {})
    metadata |= {"corpus": corpus} if corpus else {}
    return TaskManager(include_path=str(TASKS_DIR), metadata=metadata)
