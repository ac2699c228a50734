"""``cpt-bench leaderboard --add RUN_DIR``: verify a run folder made elsewhere and add it to ``results/``.

A run is accepted only when every check holds, else ``SubmissionError`` says in one line which one failed:

- schema: ``summary.json`` is a valid summary (``tables.validate_summary``) and ``config.json`` a valid config;
- checksums: every ``cells/*.json`` is a cell record whose ``checksum`` matches its content (``store.checksum``);
- completeness and protocol: the config's plan has exactly those cells, each recording the plan's identity
  (task, limit, metric, prompt), a task's cells agree on lm-eval's few-shot count (and on the perplexity window
  length where lm-eval recorded it), and ``summary.json`` is what ``store.summarise`` computes from the verified
  cells and the sessions of ``environment.json`` (so no number was edited after the run).

Then the summary, configs and environment are copied to ``results/<run name>/`` with ``submission.json`` (when,
from where, how many cells verified, few-shot per task, every session's environment), the run's report is
written there; ``cpt-bench leaderboard`` then regenerates the leaderboard.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from cpt_bench.errors import UserError
from cpt_bench.files import write_json_atomic
from cpt_bench.matrix import store
from cpt_bench.matrix.config import MatrixConfig
from cpt_bench.matrix.plan import make_plan, stored_cell
from cpt_bench.report.leaderboard import SUBMISSION_FILE
from cpt_bench.report.protocol import CONFIG_YAML, run_config
from cpt_bench.report.tables import ReportError, load_summary

SUBMISSION_FORMAT = "cpt_bench.submission/1"
COPIED = (store.SUMMARY_FILE, store.CONFIG_FILE, CONFIG_YAML, store.ENVIRONMENT_FILE)


class SubmissionError(UserError):
    """A run folder refused by ``leaderboard --add`` (one line: the folder, the failed check)."""


def _verified_cells(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every cell record of the folder by id; ``SubmissionError`` at the first unreadable or mismatching one."""
    cells = {}
    for path in sorted((run_dir / store.CELLS_DIR).glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise SubmissionError(f"{path}: unreadable cell record ({error})") from None
        if not isinstance(record, dict) or record.get("format") != store.CELL_FORMAT:
            raise SubmissionError(f"{path}: not a {store.CELL_FORMAT} cell record")
        if record.get("checksum") != store.checksum(record):
            raise SubmissionError(f"{path}: checksum mismatch, the cell was changed after it was written; "
                                  "refusing the run")
        cells[record["cell"]["id"]] = record
    return cells


def _check_cells(run_dir: Path, config: MatrixConfig, cells: dict[str, dict[str, Any]]) -> None:
    """The plan's cells, each recording the plan's identity of the cell."""
    plan = make_plan(config)
    planned = {cell.id: cell for cell in plan.cells}
    if missing := [cell_id for cell_id in planned if cell_id not in cells]:
        raise SubmissionError(f"{run_dir}: {len(missing)} cells of its config have no record (e.g. {missing[0]}); "
                              "only finished runs can be added")
    if extra := sorted(set(cells) - set(planned)):
        raise SubmissionError(f"{run_dir}: cell {extra[0]} is not in the plan of its config")
    for cell_id, cell in planned.items():
        expected = json.loads(json.dumps(stored_cell(cell, config)))
        if difference := store.first_difference(cells[cell_id]["cell"], expected):
            raise SubmissionError(f"{run_dir}: cell {cell_id} was evaluated under another protocol than its config "
                                  f"states (differs at {difference})")


def fewshot_counts(run_dir: Path, config: MatrixConfig, cells: dict[str, dict[str, Any]]) -> dict[str, int]:
    """lm-eval's few-shot count per target, which every cell of the target must share (and its window length,
    where lm-eval recorded one, must be the config's ``ppl_seqlen``)."""
    counts: dict[str, set[int]] = {}
    for record in cells.values():
        task, output = record["cell"]["task"], record.get("lm_eval") or {}
        lm_task = task.split("@")[0]  # cpt_ppl_corpus@<corpus> runs as lm-eval's cpt_ppl_corpus
        if lm_task in (output.get("n-shot") or {}):
            counts.setdefault(task, set()).add(int(output["n-shot"][lm_task]))
        seqlen = ((output.get("configs") or {}).get(lm_task, {}).get("metadata") or {}).get("seqlen")
        if seqlen is not None and task.startswith("cpt_ppl_") and seqlen != config.ppl_seqlen:
            raise SubmissionError(f"{run_dir}: cell {record['cell']['id']} scored windows of {seqlen} tokens, its "
                                  f"config states ppl_seqlen {config.ppl_seqlen}")
    if mixed := sorted(task for task, values in counts.items() if len(values) > 1):
        raise SubmissionError(f"{run_dir}: the cells of {mixed[0]} were run with different few-shot counts "
                              f"{sorted(counts[mixed[0]])}")
    return {task: values.pop() for task, values in counts.items()}


def verify_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, int], int]:
    """Check a run folder (see the module docstring): its summary, few-shot per task and verified cell count."""
    if not run_dir.is_dir():
        raise SubmissionError(f"{run_dir}: no such run folder (expected a folder written by cpt-bench matrix)")
    try:
        summary = load_summary(run_dir / store.SUMMARY_FILE)
        if not (run_dir / store.CONFIG_FILE).is_file():
            raise ReportError(f"{run_dir / store.CONFIG_FILE}: no such file (the matrix runner writes it)")
        config = run_config(run_dir)
    except ReportError as error:
        raise SubmissionError(str(error)) from None
    cells = _verified_cells(run_dir)
    _check_cells(run_dir, config, cells)
    fewshot = fewshot_counts(run_dir, config, cells)
    expected = json.loads(json.dumps(store.summarise(make_plan(config), cells, store.read_sessions(run_dir))))
    if difference := store.first_difference(summary, expected):
        raise SubmissionError(f"{run_dir / store.SUMMARY_FILE}: differs from what its verified cells give (at "
                              f"{difference}); refusing the run")
    return summary, fewshot, len(cells)


def add_run(run_dir: Path, results_dir: Path) -> Path:
    """Verify ``run_dir`` and copy it into ``results_dir/<run name>`` with its report and ``submission.json``
    (the caller regenerates the leaderboard). Returns the new folder; ``SubmissionError`` when refused or the name
    is taken."""
    from cpt_bench.report import write_report

    summary, fewshot, n_cells = verify_run(run_dir)
    destination = results_dir / str(summary["name"])
    if destination.exists():
        raise SubmissionError(f"{destination} already exists: the leaderboard holds a run named {summary['name']!r}; "
                              "rename the submitted run (its config's name) or remove that folder first")
    results_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=results_dir))  # moved in whole, or not at all
    try:
        for name in COPIED:
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, staging / name)
        write_json_atomic(staging / SUBMISSION_FILE, {
            "format": SUBMISSION_FORMAT, "added": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "source": str(run_dir.resolve()), "cells_verified": n_cells, "fewshot": fewshot,
            "summary_sha256": hashlib.sha256((run_dir / store.SUMMARY_FILE).read_bytes()).hexdigest(),
            "sessions": store.read_sessions(run_dir)})
        write_report(summary, staging / "report")
        staging.rename(destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination
