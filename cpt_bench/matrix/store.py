"""A run folder: its config, environment, per-cell results (atomic, checksummed), summary and merge.

Layout::

    RUN/config.json            the validated config with every default (what --resume compares)
    RUN/config.yaml            the YAML as given
    RUN/plan.txt               the plan (--dry-run text)
    RUN/environment.json       {"sessions": [...]}: versions, git commit, hardware, seeds, executor and wall
                               time of every session that worked on the run (start, resumes, merged shards)
    RUN/run.lock               held while a runner writes (``lock.RunLock``)
    RUN/prompts/<prompt id>/   soft prompts trained for the run (checkpointed, resumable)
    RUN/cells/<cell id>.json   one result per cell, written atomically when the cell finishes, with its
                               per-window / per-item values (``examples``, see ``paired``)
    RUN/summary.json           all cells flattened for reports (``cpt_bench.report``), once every cell is done
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from cpt_bench.errors import UserError
from cpt_bench.files import OutputKind, write_json_atomic, write_text_atomic
from cpt_bench.matrix.config import ConfigError, MatrixConfig, config_from_dict
from cpt_bench.matrix.lock import LOCK_FILE
from cpt_bench.matrix.paired import (
    COMPARISON_KEYS,
    GAP_CLOSED_KEY,
    GAP_CLOSED_VS_TRIVIAL_KEY,
    IDP_KEY,
    cell_comparisons,
    idp_comparisons,
)
from cpt_bench.matrix.plan import EORA, TRIVIAL_PREFIX, Plan, family, generated_tokens, safe_name
from cpt_bench.recovery import LEARNED_KINDS, RECOVERY_KINDS

log = logging.getLogger(__name__)

CELL_FORMAT = "cpt_bench.matrix_cell/1"
SUMMARY_FORMAT = "cpt_bench.matrix_summary/1"
# The summary's schema (what ``summarise`` writes and ``report.tables.validate_summary`` checks): keys each
# section's entries require, the extra keys of each prompt kind, and the fields that must be numbers.
SUMMARY_REQUIRED_KEYS = {
    "summary": ("format", "name", "model", "wall_seconds", "machine", "environment", "compressions", "targets",
                "prompts", "cells"),
    "compressions": ("spec", "weight_bytes", "ratio_to_dense", "bits_per_weight"),
    "targets": ("task", "metric", "higher_is_better"),
    "prompts": ("id", "kind"),
    "cells": ("compression", "prompt", "task", "value"),
}
SUMMARY_KEYS_BY_PROMPT_KIND = {name: kind.summary_keys for name, kind in RECOVERY_KINDS.items()}
SUMMARY_NUMBERS = {"summary": ("wall_seconds",), "compressions": ("weight_bytes", "ratio_to_dense", "bits_per_weight"),
                   "cells": ("value",)}
SUMMARY_OPTIONAL_NUMBERS = {"cells": ("stderr", "delta"),
                            "prompts": ("seed", "trainable_parameters", "train_seconds", "train_peak_memory_bytes",
                                        "tokens_seen", "stored_parameters", "stored_bytes", "on_eora",
                                        "bits_per_weight_with_adapter", "fit_seconds", "fit_peak_memory_bytes")}
SUMMARY_OPTIONAL_FLAGS = {"prompts": ("untrained",)}  # absent in summaries written before the flag existed
# A cell's paired comparisons (``paired.cell_comparisons``), each an object with a numeric ``estimate``; absent in
# summaries written before they existed and where the run lacks the other cell.
SUMMARY_OPTIONAL_COMPARISONS = {"cells": (*COMPARISON_KEYS, GAP_CLOSED_KEY, GAP_CLOSED_VS_TRIVIAL_KEY)}
CONFIG_FILE = "config.json"
CELLS_DIR = "cells"
SUMMARY_FILE = "summary.json"
ENVIRONMENT_FILE = "environment.json"
RUN_FOLDER_KIND = OutputKind("a matrix run folder", CONFIG_FILE, ignored=(LOCK_FILE,))  # --resume checks the config
# Cell fields that differ between identical runs (timings, memory, dates): left out of comparisons.
VOLATILE_FIELDS = ("seconds", "memory", "lm_eval", "environment", "checksum")
VOLATILE_PROMPT_FIELDS = ("train_seconds", "teacher_seconds", "train_peak_memory_bytes", "fit_seconds",
                          "fit_peak_memory_bytes")  # of a cell's prompt block
# Settings whose default changed what a run does, with the value a ``config.json`` written before them ran with:
# a stored config lacking one is read with that value (``read_run_config``), so its plan is the plan it ran.
LEGACY_SETTINGS = {("prompts", "trivial_prefix"): False}


class RunFolderError(UserError):
    """A run folder that cannot be used as asked (one-line message)."""


def checksum(record: dict[str, Any]) -> str:
    """sha256 of the record's canonical JSON without its ``checksum`` field."""
    body = {key: value for key, value in record.items() if key != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """Key path of the first place where two JSON-like values differ, or None when equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            found = first_difference(x, y, f"{path}[{index}]")
            if found:
                return found
        return None
    return None if a == b else (path or "top level")


def _json_roundtrip(data: Any) -> Any:
    return json.loads(json.dumps(data, default=str))


def prepare(run_dir: Path, config: MatrixConfig, config_text: str, resume: bool) -> None:
    """Start a run in ``run_dir`` (existing, locked by the caller) or check that it continues a run of this config.

    ``resume`` on a folder without a run starts one (so a requeued array job may always pass --resume).
    Raises ``RunFolderError`` when a run folder would be reused without ``resume``, when the stored config
    differs (the message names the first key), or when the folder holds other files.
    """
    stored_path = run_dir / CONFIG_FILE
    wanted = _json_roundtrip(config.to_dict())
    if stored_path.is_file():
        if not resume:
            raise RunFolderError(f"run folder {run_dir} already holds a run; pass --resume to continue it or "
                                 "choose another --out")
        raw = json.loads(stored_path.read_text(encoding="utf-8"))
        difference = first_difference(_current_form(raw, run_dir), wanted)
        if difference:
            raise RunFolderError(f"--resume: run folder {run_dir} was made from another config (differs at "
                                 f"{difference}); resume it with its own config ({run_dir / 'config.yaml'}) "
                                 "or choose another --out")
        for orphan in run_dir.rglob(".*.tmp"):  # temp files of writes cut short by a kill; never results
            orphan.unlink()
        if raw != wanted:  # settings added since the run started: recorded, as this session runs them
            write_json_atomic(stored_path, wanted)
        return
    if any(path.name != LOCK_FILE for path in run_dir.iterdir()):
        raise RunFolderError(f"output folder {run_dir} exists, is not empty and holds no run; choose another --out")
    write_text_atomic(run_dir / "config.yaml", config_text)
    write_json_atomic(run_dir / CONFIG_FILE, wanted)


def read_run_config(run_dir: Path) -> MatrixConfig:
    """The config a run folder ran with, from its ``config.json``: a setting in ``LEGACY_SETTINGS`` that the file
    lacks (written before it existed) takes its legacy value, other missing keys their defaults;
    ``RunFolderError`` when the file is missing or invalid."""
    path = run_dir / CONFIG_FILE
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        for keys, value in LEGACY_SETTINGS.items():
            section = stored
            for key in keys[:-1]:
                section = section.setdefault(key, {})
            section.setdefault(keys[-1], value)
        return config_from_dict(stored)
    except (OSError, ValueError, AttributeError, ConfigError) as error:
        raise RunFolderError(f"{path}: not a usable run config ({error}); expected the config.json that "
                             "'cpt-bench matrix' writes") from None


def trivial_prefix_warnings(summary: dict[str, Any]) -> list[str]:
    """Per perplexity target of a summary, a sentence when the trivial-prefix control alone moves the dense model's
    perplexity by more than that cell's standard error (the figures included); empty without the control."""
    cells = {(c["compression"], c["prompt"], c["task"]): c for c in summary["cells"]}
    found = []
    for target in summary["targets"]:
        task = target["task"]
        dense, trivial = cells.get(("dense", "none", task)), cells.get(("dense", TRIVIAL_PREFIX.id, task))
        if not target.get("domain") or None in (dense, trivial) or dense.get("stderr") is None:
            continue
        moved = trivial["value"] - dense["value"]
        if abs(moved) > dense["stderr"]:
            found.append(f"on {task} the trivial prefix alone moves the dense model's {dense['metric']} from "
                         f"{dense['value']:.2f} to {trivial['value']:.2f} ({moved / dense['value']:+.1%}), more than "
                         f"its standard error {dense['stderr']:.2f}: read prompts' gains there against the control "
                         "(vs trivial, gap closed vs trivial), not against no prompt")
    return found


def _current_form(stored: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """A stored ``config.json`` as this version writes it: keys added since the run started get their defaults
    (which keep the older behaviour, except ``prompts.trivial_prefix``: a resumed run gains the control's cells),
    so adding a setting does not orphan existing run folders."""
    try:
        return _json_roundtrip(config_from_dict(stored).to_dict())
    except ConfigError as error:
        raise RunFolderError(f"--resume: the config stored in {run_dir / CONFIG_FILE} is not valid for this version "
                             f"of cpt_bench ({error}); choose another --out") from None


def start_session(run_dir: Path, environment: dict[str, Any]) -> int:
    """Append this session's environment to ``environment.json`` (one entry per start / resume); its index."""
    sessions = read_sessions(run_dir)
    sessions.append({**environment, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_seconds": None})
    write_json_atomic(run_dir / ENVIRONMENT_FILE, {"sessions": _json_roundtrip(sessions)})
    return len(sessions) - 1


def end_session(run_dir: Path, index: int, wall_seconds: float) -> None:
    """Record how long session ``index`` ran (sessions killed before this keep ``wall_seconds: null``)."""
    sessions = read_sessions(run_dir)
    sessions[index]["wall_seconds"] = round(wall_seconds, 1)
    write_json_atomic(run_dir / ENVIRONMENT_FILE, {"sessions": sessions})


def read_sessions(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / ENVIRONMENT_FILE
    return json.loads(path.read_text(encoding="utf-8"))["sessions"] if path.is_file() else []


def cell_path(run_dir: Path, cell_id: str) -> Path:
    return run_dir / CELLS_DIR / f"{cell_id}.json"


def write_cell(run_dir: Path, record: dict[str, Any]) -> Path:
    """Write one finished cell atomically, with its checksum."""
    record = _json_roundtrip(record)
    record["checksum"] = checksum(record)
    path = cell_path(run_dir, record["cell"]["id"])
    write_json_atomic(path, record)
    return path


def read_cell(path: Path) -> dict[str, Any] | None:
    """A stored cell, or None (with a warning) when it is unreadable or fails its checksum: it is redone."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("format") == CELL_FORMAT and record.get("checksum") == checksum(record):
            return record
    except (OSError, json.JSONDecodeError, AttributeError):
        pass
    log.warning("cell result %s is unreadable or fails its checksum; it will be evaluated again", path)
    return None


def read_run_cell(run_dir: Path, cell_id: str) -> dict[str, Any]:
    """The finished cell ``cell_id`` of run folder ``run_dir`` (``#`` in prompt ids may be spelt as in the ids or
    as in the cell files); ``RunFolderError`` naming the run or the cell when either is unknown."""
    if not (run_dir / CONFIG_FILE).is_file():
        raise RunFolderError(f"run folder {run_dir} not found ({CONFIG_FILE} missing); expected a folder written by "
                             "'cpt-bench matrix'")
    path = cell_path(run_dir, safe_name(cell_id))
    record = read_cell(path) if path.is_file() else None
    if record is None:
        known = sorted(path.stem for path in (run_dir / CELLS_DIR).glob("*.json"))
        examples = ", ".join(known[:3]) + (", ..." if len(known) > 3 else "")
        raise RunFolderError(f"cell {cell_id!r} is not a finished cell of run {run_dir}; expected one of its "
                             f"{len(known)} cell ids ({examples or 'none yet'}), as in {run_dir / CELLS_DIR}")
    return record


def read_cells(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every valid finished cell of a run folder, by cell id."""
    cells = {}
    for path in sorted((run_dir / CELLS_DIR).glob("*.json")):
        record = read_cell(path)
        if record is not None:
            cells[record["cell"]["id"]] = record
    return cells


def comparable(record: dict[str, Any]) -> dict[str, Any]:
    """What must be equal between two runs of the same config on the same machine (no timings / memory)."""
    kept = {key: value for key, value in record.items() if key not in VOLATILE_FIELDS}
    kept["prompt"] = {key: value for key, value in kept["prompt"].items() if key not in VOLATILE_PROMPT_FIELDS}
    return kept


def merge(out_dir: Path, inputs: list[Path]) -> dict[str, dict[str, Any]]:
    """Merge shard run folders (same config) into ``out_dir``; returns all cells by id.

    Raises ``RunFolderError`` if the inputs' configs differ, or if two inputs hold different results for a cell.
    """
    if not inputs:
        raise RunFolderError("merge: no run folders given")
    configs = []
    for folder in inputs:
        if not (folder / CONFIG_FILE).is_file():
            raise RunFolderError(f"merge: {folder} is not a run folder ({CONFIG_FILE} missing)")
        configs.append(json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8")))
    for folder, config in zip(inputs[1:], configs[1:], strict=True):
        difference = first_difference(configs[0], config)
        if difference:
            raise RunFolderError(f"merge: {folder} was made from another config than {inputs[0]} (differs at "
                                 f"{difference})")
    if (out_dir / CONFIG_FILE).is_file() and first_difference(
            json.loads((out_dir / CONFIG_FILE).read_text(encoding="utf-8")), configs[0]):
        raise RunFolderError(f"merge: output {out_dir} holds a run of another config")
    for name in ("config.yaml", CONFIG_FILE):
        if not (out_dir / name).is_file():
            write_text_atomic(out_dir / name, (inputs[0] / name).read_text(encoding="utf-8"))
    sessions = read_sessions(out_dir) + [session for folder in inputs for session in read_sessions(folder)]
    write_json_atomic(out_dir / ENVIRONMENT_FILE, {"sessions": sessions})
    merged = read_cells(out_dir)
    for folder in inputs:
        for cell_id, record in read_cells(folder).items():
            if cell_id in merged and first_difference(comparable(merged[cell_id]), comparable(record)):
                raise RunFolderError(f"merge: cell {cell_id} differs between run folders ({folder})")
            if cell_id not in merged:
                write_json_atomic(cell_path(out_dir, cell_id), record)  # verified, checksum kept
                merged[cell_id] = record
    return merged


def summarise(plan: Plan, cells: dict[str, dict[str, Any]], sessions: list[dict[str, Any]]) -> dict[str, Any]:
    """The run summary (``SUMMARY_FORMAT``): compressions with memory, targets, prompts, flattened cells with their
    paired comparisons (``paired.cell_comparisons``; IDP cells' ``idp`` block, ``paired.idp_comparisons``; the
    per-example values stay in the cells).

    ``wall_seconds`` sums the recorded sessions; ``environment`` is the first session's.
    """
    config = plan.config
    environment = sessions[0] if sessions else {}
    wall_seconds = sum(session.get("wall_seconds") or 0.0 for session in sessions)
    records = [cells[cell.id] for cell in plan.cells]
    dense = {r["cell"]["task"]: r["metric"]["value"] for r in records
             if r["cell"]["compression"] == "dense" and r["cell"]["prompt"] == "none"}
    compressions = {}
    for record in records:
        block = record["compression"]
        memory = block["memory"]
        compressions[block["spec"]] = {"spec": block["spec"], "family": block["family"],
                                       "weight_bytes": memory["stored_bytes"],
                                       "bits_per_weight": memory["compressed_bits_per_weight"],
                                       "ratio_to_dense": memory["ratio_to_dense_fp16"],
                                       "dense_fp16_bytes": memory.get("dense_fp16_bytes")}
    prompts = {"none": {"id": "none", "kind": "none"}}
    for record in records:
        prompts.setdefault(record["cell"]["prompt"], _prompt_summary(record))
    comparisons = cell_comparisons(plan, cells)
    for cell_id, block in idp_comparisons(plan, cells).items():
        comparisons.setdefault(cell_id, {})[IDP_KEY] = block
    flat = [{**_flat_cell(record, dense.get(record["cell"]["task"])), **comparisons.get(record["cell"]["id"], {})}
            for record in records]
    hardware = environment.get("hardware", {})
    machine = (f"{hardware.get('cpu_count')} CPU cores {hardware.get('machine', '')}, "
               f"{hardware.get('cuda_device') or 'no GPU'}")
    return {
        "format": SUMMARY_FORMAT, "name": config.name, "model": config.model,
        "wall_seconds": round(wall_seconds, 1), "machine": machine, "sessions": len(sessions),
        "environment": environment,
        "compressions": [compressions[spec] for spec in config.compression.specs if spec in compressions],
        "targets": [{"task": t.name, "metric": t.metric, "domain": t.domain,
                     "higher_is_better": _higher_is_better(records, t.name),
                     **({"max_gen_toks": generated_tokens(t)} if t.is_generative else {})} for t in config.targets],
        "prompts": list(prompts.values()),
        "cells": flat,
    }


def _higher_is_better(records: list[dict[str, Any]], task: str) -> bool | None:
    return next((r["metric"]["higher_is_better"] for r in records if r["cell"]["task"] == task), None)


def _prompt_summary(record: dict[str, Any]) -> dict[str, Any]:
    cell, prompt = record["cell"], record["prompt"]
    choice = cell["prompt_choice"]
    memory = record["memory"]
    summary = {"id": cell["prompt"], "kind": choice["kind"], "n_tokens": prompt.get("n_tokens"),
               "embedding_bytes": memory.get("prompt_embedding_bytes"), "adapter_bytes": memory.get("adapter_bytes"),
               "kv_values_per_token": memory.get("kv_values_per_token")}
    if prompt.get("stored_bytes") is not None:  # what the artifact stores, where its kind records it (EoRA)
        summary["stored_bytes"] = prompt["stored_bytes"]
    if choice.get("hard") is not None:  # a hard prompt's name or text
        summary["name"] = choice["hard"]
    if choice.get("members") is not None:  # an IDP set and its rule
        summary.update(members=list(choice["members"]), rule=choice["rule"])
    if choice["kind"] in LEARNED_KINDS:
        summary.update(source=choice["source"], trained_at=choice["trained_at"],
                       train_seconds=prompt.get("train_seconds"), best_val_ppl=prompt.get("best_val_ppl"),
                       untrained=prompt.get("untrained"), trainable_parameters=prompt.get("trainable_parameters"),
                       tokens_seen=prompt.get("tokens_seen"),
                       train_peak_memory_bytes=prompt.get("train_peak_memory_bytes"))
        if choice.get("objective", "lm") != "lm":
            summary["objective"] = choice["objective"]
        if choice.get("seed") is not None:
            summary["seed"] = choice["seed"]
        if choice.get("control"):
            summary["control"] = choice["control"]
        if choice.get("rank") is not None:  # trained on, and applied with, an EoRA adapter of this rank
            memory = prompt["adapter_memory"]
            own = RECOVERY_KINDS[choice["kind"]].added_bytes(  # the prompt's own values (float32)
                {key: value for key, value in summary.items() if key != "stored_bytes"})
            summary.update(on_eora=choice["rank"], stored_bytes=memory["adapter_bytes"] + (own or 0),  # both stored
                           stored_parameters=memory["adapter_parameters"] + (summary["trainable_parameters"] or 0),
                           bits_per_weight_with_adapter=memory["compressed_bits_per_weight_with_adapter"])
    if choice["kind"] == EORA and "adapter_memory" in prompt:  # a matrix's adapter (``run._prompt_block``): fitted,
        # not trained; its rank, what it adds to the checkpoint and what fitting cost
        memory = prompt["adapter_memory"]
        summary.update(trained_at=choice["trained_at"], rank=choice["rank"], trainable_parameters=0,
                       stored_parameters=memory["adapter_parameters"], stored_bytes=memory["adapter_bytes"],
                       bits_per_weight_with_adapter=memory["compressed_bits_per_weight_with_adapter"],
                       fit_seconds=prompt.get("fit_seconds"), fit_peak_memory_bytes=prompt.get("fit_peak_memory_bytes"))
    return summary


def _flat_cell(record: dict[str, Any], dense_value: float | None) -> dict[str, Any]:
    cell, metric = record["cell"], record["metric"]
    value = metric["value"]
    return {
        "id": cell["id"], "compression": cell["compression"], "prompt": cell["prompt"], "task": cell["task"],
        "metric": metric["name"], "value": value, "stderr": metric["stderr"], "dense_value": dense_value,
        "delta": None if dense_value is None else value - dense_value,
        "dataset_relation": cell["dataset_relation"], "compression_relation": cell["compression_relation"],
        "peak_memory_bytes": record["memory"]["peak_memory_bytes"],
        "resident_bytes": record["memory"].get("model_resident_bytes"), "seconds": record["seconds"],
        "kernel_mode": record["compression"]["kernel_mode"],
    }


def compression_block(spec: str, kernel_mode: str, folder: str | None, memory: dict[str, Any]) -> dict[str, Any]:
    """What a cell records about its compression level: spec, family, kernels, checkpoint and memory account."""
    return {"spec": spec, "family": family(spec), "kernel_mode": kernel_mode, "checkpoint": folder,
            "memory": memory}
