"""Evaluate one model on cpt_bench tasks through lm-eval and write the results of the run.

Perplexity tasks (``cpt_ppl*``) and the rest get separate example limits (windows vs items) but
share one loaded model. A run folder holds ``results.json`` (lm-eval's results format plus a
``cpt_bench`` block: model, limits, wall time, peak memory, provenance) and ``results.md``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cpt_bench.assets.model import ModelError, check_causal_lm, check_fits_context, context_tokens, first_line
from cpt_bench.errors import UserError
from cpt_bench.files import OutputKind, ensure_replaceable, json_bytes, write_files_atomic
from cpt_bench.lmeval.quiet import quiet_lm_eval
from cpt_bench.lmeval.tasks import task_manager
from cpt_bench.perplexity import DEFAULT_SEQLEN_TOKENS
from cpt_bench.provenance import environment_record, peak_memory

PPL_PREFIX = "cpt_ppl"
EVALUATION_KIND = OutputKind("an evaluation run folder", "results.json", (("cpt_bench", None),))  # write_run's files
SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}


@dataclass
class EvalSettings:
    """What to evaluate. Limits count windows (perplexity tasks) or items (the rest); None means all."""

    model: str = "embedded"
    tasks: list[str] = field(default_factory=lambda: ["cpt_ppl", "cpt_zeroshot"])
    limit_items: int | None = None
    limit_windows: int | None = None
    seqlen_tokens: int = DEFAULT_SEQLEN_TOKENS
    batch_size: int = 8
    dtype: str = "float32"
    device: str = "cpu"

    def __post_init__(self):
        for name in ("limit_items", "limit_windows"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"{name} must be a positive count or omitted, got {value}")
        if self.seqlen_tokens <= 0 or self.batch_size <= 0:
            raise UserError(f"seqlen and batch size must be positive, got {self.seqlen_tokens} and {self.batch_size}")
        if not self.tasks:
            raise UserError("no tasks given; expected names such as cpt_ppl, cpt_zeroshot or cpt_piqa")


def _merge(into: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    """Merge two lm-eval result dicts key by key (results, configs, n-samples, ...)."""
    for key, value in part.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            into[key] = {**into[key], **value}
        else:
            into.setdefault(key, value)
    return into


def run_evaluation(settings: EvalSettings) -> dict[str, Any]:
    """Evaluate ``settings.model`` on ``settings.tasks``; returns lm-eval's results dict plus ``cpt_bench``."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from safetensors import SafetensorError

    started = time.perf_counter()
    environment = environment_record(SEEDS)  # before the run: the commit and versions that produced it
    model_path = check_causal_lm(settings.model)
    manager = task_manager(model_path, settings.seqlen_tokens, names=settings.tasks)
    unknown = [name for name in settings.tasks if name not in manager.all_tasks]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)}; expected lm-eval task or group names, "
                         f"e.g. cpt_ppl, cpt_zeroshot, cpt_piqa (see tasks/)")
    ppl_tasks = [t for t in settings.tasks if t.startswith(PPL_PREFIX)]
    other_tasks = [t for t in settings.tasks if not t.startswith(PPL_PREFIX)]
    if ppl_tasks:
        check_fits_context(settings.seqlen_tokens, "--seqlen", settings.model, context_tokens(model_path))
    try:
        lm = HFLM(pretrained=model_path, dtype=settings.dtype, batch_size=settings.batch_size, device=settings.device)
    except (OSError, SafetensorError) as exc:  # missing or truncated weight / tokenizer files
        raise ModelError(f"could not load model {settings.model!r} from {model_path}: {first_line(exc)}") from exc
    merged: dict[str, Any] = {}
    for limit, names in ((settings.limit_windows, ppl_tasks), (settings.limit_items, other_tasks)):
        if names:
            with quiet_lm_eval():
                part = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, log_samples=False,
                                       **SEEDS)
            _merge(merged, part)
    merged["cpt_bench"] = {
        "settings": asdict(settings),
        "model_path": model_path,
        "wall_seconds": round(time.perf_counter() - started, 1),
        **peak_memory(),
        "environment": environment,
    }
    return merged


def write_run(results: dict[str, Any], out_dir: Path) -> Path:
    """Write ``results.json`` and the ``results.md`` table into ``out_dir`` (atomically, both or neither); returns
    the JSON path. ``out_dir`` must be new, empty or an earlier evaluation (``files.OutputPathError``)."""
    from lm_eval.utils import make_table

    ensure_replaceable(out_dir, EVALUATION_KIND, "--out")
    out_dir.mkdir(parents=True, exist_ok=True)
    serialisable = json.loads(json.dumps(results, default=str))
    meta = results["cpt_bench"]
    header = (f"model `{meta['settings']['model']}`, wall time {meta['wall_seconds']} s, "
              f"peak memory {meta['peak_memory_bytes'] / 2**30:.2f} GiB ({meta['peak_memory_kind']}), "
              f"machine: {meta['environment']['hardware']['cpu_count']} CPU cores "
              f"{meta['environment']['hardware'].get('cuda_device', '')}\n\n")
    markdown = (header + make_table(results) + "\n").encode("utf-8")
    write_files_atomic(out_dir, {"results.json": json_bytes(serialisable), "results.md": markdown})
    return out_dir / "results.json"
