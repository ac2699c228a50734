"""Dataset loaders for the task YAMLs in this folder (``custom_dataset: !function loaders.<fn>``).

lm-eval calls a loader with the task's ``metadata`` and ``dataset_kwargs`` merged with the run's
model arguments (``pretrained=...``) as keywords. Data comes from the cpt_bench cache, which is
located the same way wherever the command runs, and is built on first use. When cpt_bench is not
installed in the running environment, the repository next to this file is put on the path.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import cpt_bench  # noqa: F401
except ImportError:  # plain `lm_eval --include_path tasks` from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets

# lm-eval's own preprocessing for the built-in tasks, re-exported so our YAMLs prompt identically.
from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs
from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_choice as winogrande_doc_to_choice
from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_target as winogrande_doc_to_target
from lm_eval.tasks.winogrande.preprocess_winogrande import doc_to_text as winogrande_doc_to_text

import cpt_bench.lmeval  # noqa: F401  (registers the lmeval: corpus kind, for cpt_ppl_corpus under plain lm_eval)
from cpt_bench.assets.zeroshot import load_zeroshot
from cpt_bench.perplexity import TaskInputError, corpus_windows, rolling_results

__all__ = [
    "hellaswag_process_docs", "winogrande_doc_to_choice", "winogrande_doc_to_target", "winogrande_doc_to_text",
    "rolling_results", "zeroshot", "perplexity_windows",
]


def zeroshot(name: str, **_run_metadata) -> datasets.DatasetDict:
    """The cached zero-shot set ``name`` as ``{split: Dataset}`` in lm-eval's built-in schema."""
    split, rows = load_zeroshot(name)
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def perplexity_windows(corpus: str | None = None, split: str = "test", seqlen: int = 1024,
                       pretrained: str | None = None, tokenizer: str | None = None, add_bos_token: bool | None = None,
                       **_run_metadata) -> datasets.DatasetDict:
    """Non-overlapping ``seqlen``-token windows of a corpus split, one document per window.

    ``corpus`` is a corpus spec (``cpt_bench.corpus``): the task's ``dataset_kwargs`` for ``cpt_ppl_<name>``,
    the run's metadata for ``cpt_ppl_corpus`` (``--metadata '{"corpus": "text:notes/"}'``).

    The windows depend on the model's tokenizer, taken from the run's ``tokenizer`` or
    ``pretrained`` model argument (``--metadata '{"seqlen": 2048}'`` selects the window length).
    """
    if not corpus:
        raise TaskInputError("task cpt_ppl_corpus needs a corpus spec: pass --metadata '{\"corpus\": \"text:DIR\"}' "
                             "(or jsonl:FILE, hf:DATASET, lmeval:TASK, a built-in name; see cpt_bench.corpus)")
    source = tokenizer or pretrained
    if not source:
        raise TaskInputError(
            f"perplexity task on {corpus!r} needs the model's tokenizer to cut token windows: "
            "pass model_args pretrained=... (or tokenizer=...), or metadata {'pretrained': ...}"
        )
    windows = corpus_windows(corpus, split, str(source), int(seqlen), add_bos_token)
    return datasets.DatasetDict({split: datasets.Dataset.from_list(windows)})
