"""lm-eval's TaskManager over our ``tasks/`` folder: one per process and (model, window length)."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

from cpt_bench.errors import UserError
from cpt_bench.provenance import REPO_ROOT

TASKS_DIR = REPO_ROOT / "tasks"


def task_manager(model_path: str | None, seqlen_tokens: int, corpus: str | None = None, names: Iterable[str] = ()):
    """A TaskManager that knows our task folder; the model path (whose tokenizer cuts perplexity windows; None:
    the run's model_args must name it), the window length and the corpus spec of ``cpt_ppl_corpus`` (None: the
    run's ``--metadata`` must name it when that task runs) reach our loaders as metadata.

    When every task or group of ``names`` is one of ours, the manager indexes our folder alone; otherwise (or with
    no names) lm-eval's own tasks too, whose ~14,000 YAML files take 8-15 s to read on 2 CPU cores.
    """
    names = tuple(names)
    if names:
        ours = _manager(model_path, seqlen_tokens, corpus, builtin=False)
        if all(name in ours.all_tasks for name in names):
            return ours
    return _manager(model_path, seqlen_tokens, corpus, builtin=True)


@functools.lru_cache(maxsize=8)
def _manager(model_path: str | None, seqlen_tokens: int, corpus: str | None, builtin: bool):
    """One TaskManager per process and (model, window length, corpus, with lm-eval's own tasks or not)."""
    from lm_eval.tasks import TaskManager

    if not TASKS_DIR.is_dir():
        raise UserError(f"task folder {TASKS_DIR} not found; install cpt_bench from a checkout (pip install -e .)")
    metadata = {"seqlen": seqlen_tokens} | ({"pretrained": model_path} if model_path else {})
    metadata |= {"corpus": corpus} if corpus else {}
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=builtin, metadata=metadata)


GENERATIVE = "generate_until"


@dataclass(frozen=True)
class TaskMetrics:
    """What an lm-eval task reports, read from its YAML alone (no dataset, no model): its ``output_type`` and the
    keys of its results, ``metric,filter`` (``acc,none``; ``exact_match,strict-match`` for a filtered task)."""

    output_type: str
    keys: tuple[str, ...]

    @property
    def is_generative(self) -> bool:
        return self.output_type == GENERATIVE

    def accepts(self, metric: str) -> bool:
        """Whether ``metric`` (a key, or a bare metric name for the ``none`` filter) is one the task reports."""
        return (metric if "," in metric else f"{metric},none") in self.keys

    def names(self) -> list[str]:
        """The keys as a target's ``metric:`` spells them (``acc``, not ``acc,none``)."""
        return [key.removesuffix(",none") for key in self.keys]


def task_metrics(manager, task: str) -> TaskMetrics | None:
    """The metrics task ``task`` of ``manager`` (a TaskManager) reports: each of its ``metric_list`` (else lm-eval's
    defaults for its output type) under each of its ``filter_list`` names (else ``none``), as lm-eval keys its
    results. None for a task defined in Python without a YAML config (its metrics are known only once built).

    Read from the YAML with lm-eval's own loader (functions unresolved) rather than by building the task, which
    would load its dataset (a download for a built-in task)."""
    from lm_eval.tasks._yaml_loader import load_yaml  # the loader TaskManager itself uses (includes merged)

    entry = manager.task_index[task]
    config = load_yaml(entry.yaml_path, resolve_func=False) if entry.yaml_path else entry.cfg
    return _metrics_of(config)


@functools.lru_cache(maxsize=64)
def local_task_metrics(task: str) -> TaskMetrics | None:
    """``task_metrics`` of a task of our ``tasks/`` folder (``tasks/<task>.yaml``) without a TaskManager (which
    takes seconds to index lm-eval's folders); None for any other task."""
    from lm_eval.tasks._yaml_loader import load_yaml

    path = TASKS_DIR / f"{task}.yaml"
    if not path.is_file():
        return None
    config = load_yaml(str(path), resolve_func=False)
    return _metrics_of(config) if isinstance(config, dict) and config.get("task") == task else None


def _metrics_of(config: dict | None) -> TaskMetrics | None:
    from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY

    if not config or "class" in config:
        return None
    output_type = config.get("output_type", GENERATIVE)
    metrics = [item["metric"] for item in config.get("metric_list", []) if isinstance(item.get("metric"), str)]
    metrics = metrics or DEFAULT_METRIC_REGISTRY.get(output_type, [])
    filters = [item["name"] for item in config.get("filter_list", [])] or ["none"]
    return TaskMetrics(output_type, tuple(f"{metric},{name}" for name in filters for metric in metrics))
