"""The ``lmeval:TASK`` corpus kind: the documents of an lm-eval task as a corpus (``cpt_bench.corpus``), each rendered
by the task's own prompt template and target. Importing ``cpt_bench.lmeval`` registers it."""

from __future__ import annotations

from cpt_bench.assets.corpora import Document
from cpt_bench.corpus import CorpusError, CorpusKind, CorpusSpec, complete_splits, content_digest
from cpt_bench.lmeval.tasks import task_manager


def read_task_corpus(spec: CorpusSpec) -> tuple[dict[str, list[Document]], str]:
    """The task's own splits (each document rendered by ``render_task_doc``; missing ones carved from train) and a
    fingerprint of the rendered text; a group or an unknown task is refused in one line."""
    manager = task_manager(None, 1024, names=[spec.location])
    if spec.location not in manager.all_tasks or spec.location in manager.all_groups:
        raise CorpusError(f"corpus {spec}: {spec.location!r} is not an lm-eval task (groups are not corpora)")
    task = manager.load([spec.location])["tasks"][spec.location]
    available = {}
    for split, has, docs in (("train", task.has_training_docs, task.training_docs),
                             ("validation", task.has_validation_docs, task.validation_docs),
                             ("test", task.has_test_docs, task.test_docs)):
        if has():
            available[split] = [Document(f"{split}/{index:07d}", "", render_task_doc(task, doc))
                                for index, doc in enumerate(docs())]
    if not available:
        raise CorpusError(f"corpus {spec}: task {spec.location} has no documents")
    splits = complete_splits(available, spec)
    return splits, content_digest([f"{name}\0{d.text}" for name, docs in splits.items() for d in docs])


def render_task_doc(task, doc: dict) -> str:
    """One lm-eval document as running text: the task's prompt, its target delimiter and the target (for multiple
    choice, the correct choice's text)."""
    context = task.doc_to_text(doc)
    target = task.doc_to_target(doc)
    if task.OUTPUT_TYPE == "multiple_choice":
        choices = task.doc_to_choice(doc)
        target = choices[target] if isinstance(target, int) else target
    if isinstance(target, list):
        target = target[0]
    if isinstance(context, int):  # winogrande-style tasks vary the context and keep one continuation
        context = task.doc_to_choice(doc)[context]
    return f"{context}{task.config.target_delimiter}{target}".strip()


LMEVAL_CORPUS = CorpusKind("lmeval", read_task_corpus)
