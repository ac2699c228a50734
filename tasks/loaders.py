"""Dataset loaders for the task YAMLs in this folder (``custom_dataset: !function loaders.<fn>``).

lm-eval calls a loader with the task's ``metadata`` and ``dataset_kwargs`` merged with the run's
model arguments (``pretrained=...``) as keywords. Data comes from the cpt_bench cache, which is
located the same way wherever the command runs, and is built on first use. When cpt_bench is not
installed in the running environment, the repository next to this file is put on the path.
"""

from __future__ import annotations

import logging
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
from cpt_bench.assets.generative import load_generative
from cpt_bench.assets.zeroshot import load_zeroshot
from cpt_bench.corpus import SPLITS, WHOLE_CORPUS
from cpt_bench.lmeval.coqa import doc_to_target as coqa_doc_to_target
from cpt_bench.lmeval.coqa import doc_to_text as coqa_doc_to_text
from cpt_bench.lmeval.coqa import process_results as coqa_process_results
from cpt_bench.perplexity import TaskInputError, corpus_windows, rolling_results

EVALUATION_SPLITS = (*SPLITS, WHOLE_CORPUS)
# lm-eval runs this file as task code: a child of its logger is shown by lm_eval and cpt-lm-eval alike (at their
# default level, INFO), where a cpt_bench logger would have no handler.
log = logging.getLogger("lm_eval.tasks.cpt_bench")

__all__ = [
    "hellaswag_process_docs", "winogrande_doc_to_choice", "winogrande_doc_to_target", "winogrande_doc_to_text",
    "rolling_results", "zeroshot", "perplexity_windows",
    "coqa_doc_to_target", "coqa_doc_to_text", "coqa_process_results", "generative",
]


def zeroshot(name: str, **_run_metadata) -> datasets.DatasetDict:
    """The cached zero-shot set ``name`` as ``{split: Dataset}`` in lm-eval's built-in schema."""
    split, rows = load_zeroshot(name)
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def generative(name: str, **_run_metadata) -> datasets.DatasetDict:
    """The cached generative set ``name`` as ``{split: Dataset}`` in lm-eval's built-in schema."""
    split, rows = load_generative(name)
    return datasets.DatasetDict({split: datasets.Dataset.from_list(rows)})


def perplexity_windows(corpus: str | None = None, task_corpus: str | None = None, split: str = "test",
                       seqlen: int = 1024, pretrained: str | None = None, tokenizer: str | None = None,
                       add_bos_token: bool | None = None, **_run_metadata) -> datasets.DatasetDict:
    """Non-overlapping ``seqlen``-token windows of a corpus split, one document per window, as the ``test`` split.

    ``task_corpus`` is the corpus spec (``cpt_bench.corpus``) of a ``cpt_ppl_<name>`` task (its ``dataset_kwargs``);
    ``corpus`` the one ``cpt_ppl_corpus`` scores (the run's metadata, ``--metadata '{"corpus": "text:notes/"}'``):
    one of the two, never both. ``split``: ``test`` (the default: disjoint from the documents a soft prompt trains
    on), ``train``, ``validation`` or ``all`` (every document: a corpus used for evaluation only). What is scored
    is logged once per task through lm-eval's logger.

    The windows depend on the model's tokenizer, taken from the run's ``tokenizer`` or
    ``pretrained`` model argument (``--metadata '{"seqlen": 2048}'`` selects the window length).
    """
    if corpus and task_corpus:
        raise TaskInputError(f"metadata corpus {corpus!r}: only task cpt_ppl_corpus takes a corpus; this task scores "
                             f"its own corpus {task_corpus!r} (score {corpus!r} with --tasks cpt_ppl_corpus, and "
                             "this task in a run without that metadata)")
    if not (corpus or task_corpus):
        raise TaskInputError("task cpt_ppl_corpus needs a corpus spec: pass --metadata '{\"corpus\": \"text:DIR\"}' "
                             "(or jsonl:FILE, hf:DATASET, lmeval:TASK, a built-in name; see cpt_bench.corpus)")
    if split not in EVALUATION_SPLITS:
        raise TaskInputError(f"metadata split {split!r}: expected one of {', '.join(EVALUATION_SPLITS)} (all: every "
                             "document of the corpus)")
    spec = corpus or task_corpus
    source = tokenizer or pretrained
    if not source:
        raise TaskInputError(
            f"perplexity task on {spec!r} needs the model's tokenizer to cut token windows: "
            "pass model_args pretrained=... (or tokenizer=...), or metadata {'pretrained': ...}"
        )
    scored = corpus_windows(spec, split, str(source), int(seqlen), add_bos_token)
    hint = ' (metadata {"split": "all"} scores every document)' if corpus and split != WHOLE_CORPUS else ""
    log.info("%s%s", scored.summary(), hint)
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(scored.windows)})  # the YAMLs' test_split
