"""The leaderboard: columns by (task, metric, protocol), gap closed and memory beside each number, the Pareto
frontier, the self-contained page, and ``leaderboard --add`` on fixture run folders (accepted and refused).

``make_run_folder`` writes a run folder the way the matrix runner does (``store.prepare``, sessions, checksummed
cells, ``store.summarise``) with made-up numbers, so a submission can be verified without evaluating anything.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from cpt_bench.cli import main
from cpt_bench.files import write_json_atomic
from cpt_bench.matrix import store
from cpt_bench.matrix.config import config_from_dict
from cpt_bench.matrix.plan import make_plan, stored_cell
from cpt_bench.recovery import RECOVERY_KINDS
from cpt_bench.report import write_leaderboard
from cpt_bench.report.board_page import _LEFT, _RIGHT, _WIDTH, NO_BYTES, _entry_width, _flowed, page, recovery_svg
from cpt_bench.report.leaderboard import (
    build_board,
    load_runs,
    markdown,
    pareto_flags,
    row_fields,
)
from cpt_bench.report.protocol import Protocol, task_fewshot
from cpt_bench.report.recovery_board import MethodRow, recovery_groups, recovery_markdown
from cpt_bench.report.submit import SubmissionError, add_run
from cpt_bench.report.tables import ReportError

SMOLLM2 = "smollm2-135m-instruct"  # what the configs' model "embedded" is
CONFIG: dict[str, Any] = {
    "name": "submitted", "model": "embedded", "ppl_seqlen": 256,
    "compression": {"specs": ["dense", "rtn-w3g64", "sparsegpt-50"]},
    "prompts": {"hard": ["paper"], "soft": {"sources": ["wikipedia"], "trained_at": ["rtn-w3g64"]}},
    "targets": [{"task": "cpt_ppl_wikipedia", "limit": 4}, {"task": "cpt_piqa", "limit": 10, "metric": "acc"}],
}
ENVIRONMENT = {"versions": {"cpt_bench": "0.1.0", "torch": "2.13.0+cpu"}, "git": {"commit": "c0ffee" * 6 + "beef",
               "dirty": False}, "hardware": {"cpu_count": 4, "machine": "x86_64", "platform": "Linux-test-host"},
               "seeds": {"random_seed": 0}, "argv": ["cpt-bench", "matrix"], "shard": None, "executor": "local"}
# Made-up numbers: perplexity (lower better) and accuracy of each level without prompt, and what prompts add.
_BASE = {"cpt_ppl_wikipedia": {"dense": 20.0, "rtn-w3g64": 60.0, "sparsegpt-50": 40.0},
         "cpt_piqa": {"dense": 0.65, "rtn-w3g64": 0.55, "sparsegpt-50": 0.60}}
SOFT = "soft-wikipedia@rtn-w3g64"  # the config's soft prompt
_PROMPT_EFFECT = {"none": 0.0, "hard": 0.02, "soft": -0.25, "lora": -0.30, "trivial": -0.05}  # trivial: the control
# Made-up trained values of each learned kind (a 20-token soft prompt of hidden 64; a LoRA adapter): float32 on disk.
_TRAINABLE = {"soft": 20 * 64, "lora": 4096}


def config_with(**changes: Any) -> dict[str, Any]:
    config = copy.deepcopy(CONFIG)
    config.update(changes)
    return config


def _value(task: str, compression: str, kind: str) -> float:
    base = _BASE[task][compression]
    return base * (1.0 + _PROMPT_EFFECT[kind]) if task.startswith("cpt_ppl") else base + _PROMPT_EFFECT[kind] / 10


def _record(cell: Any, config: Any) -> dict[str, Any]:
    task, kind = cell.target.name, cell.prompt.control or cell.prompt.kind
    stored = {"dense": 269_000_000, "rtn-w3g64": 100_400_000, "sparsegpt-50": 176_100_000}[cell.compression]
    memory = {"stored_bytes": stored, "compressed_bits_per_weight": 16.0 * stored / 269_000_000,
              "ratio_to_dense_fp16": stored / 269_000_000}
    prompt = {"n_tokens": None if kind == "none" else 0 if kind == "lora" else 20}
    if kind in _TRAINABLE:
        prompt.update(train_seconds=12.5, best_val_ppl=70.0, untrained=False, trainable_parameters=_TRAINABLE[kind])
    seqlen = config.ppl_seqlen
    return {"format": store.CELL_FORMAT, "cell": stored_cell(cell, config),
            "metric": {"name": cell.target.metric, "value": _value(task, cell.compression, kind),
                       "stderr": 0.5 if task.startswith("cpt_ppl") else 0.05,
                       "higher_is_better": not task.startswith("cpt_ppl")},
            "compression": store.compression_block(cell.compression, "simulated", None, memory), "prompt": prompt,
            "memory": {"peak_memory_bytes": 3 * 2**30, "model_resident_bytes": 2 * stored}, "seconds": 1.0,
            "lm_eval": {"n-shot": {task: 0}, "configs": {task: {"metadata": {"seqlen": seqlen}}}},
            "environment": {"seeds": {"random_seed": 0}, "device": "cpu"}}


def make_run_folder(folder: Path, config_data: dict[str, Any],
                    record: Callable[[Any, Any], dict[str, Any]] = _record) -> Path:
    """A finished run folder of ``config_data`` as the matrix runner leaves it (config, sessions, cells, summary);
    ``record(cell, config)`` makes each cell's stored record."""
    folder.mkdir(parents=True)
    config = config_from_dict(config_data)
    plan = make_plan(config)
    store.prepare(folder, config, yaml.safe_dump(config_data), resume=False)
    store.end_session(folder, store.start_session(folder, ENVIRONMENT), 42.0)
    for cell in plan.cells:
        store.write_cell(folder, record(cell, config))
    write_json_atomic(folder / store.SUMMARY_FILE, store.summarise(plan, store.read_cells(folder),
                                                                   store.read_sessions(folder)))
    return folder


def _results_with(tmp_path: Path, *configs: dict[str, Any]) -> Path:
    """A results folder holding one committed-style run (summary.json and config.yaml) per config."""
    results = tmp_path / "results"
    for config in configs:
        run = make_run_folder(tmp_path / "runs" / config["name"], config)
        (results / config["name"]).mkdir(parents=True)
        for name in (store.SUMMARY_FILE, "config.yaml"):
            (results / config["name"] / name).write_bytes((run / name).read_bytes())
    return results


def _columns(results: Path) -> dict[tuple[str, Protocol], set[str]]:
    board = build_board(load_runs(results))
    return {(column.task, column.protocol): {row.run.name for row in rows} for column, rows in board.columns}


def test_runs_differing_only_in_protocol_never_share_a_column(tmp_path):
    results = _results_with(tmp_path, config_with(name="short"), config_with(name="long", ppl_seqlen=512))
    columns = _columns(results)
    assert columns == {("cpt_ppl_wikipedia", Protocol(256, 4, 0, SMOLLM2)): {"short"},
                       ("cpt_ppl_wikipedia", Protocol(512, 4, 0, SMOLLM2)): {"long"},
                       ("cpt_piqa", Protocol(None, 10, 0)): {"short", "long"}}  # the window length is no PIQA setting
    text = markdown(build_board(load_runs(results)))
    ppl = "## cpt_ppl_wikipedia: token_perplexity ↓; protocol: 4 windows of"
    assert f"{ppl} 256 tokens of smollm2-135m-instruct, 0-shot, prompt before" in text
    assert f"{ppl} 512 tokens of smollm2-135m-instruct, 0-shot" in text
    assert "## cpt_piqa: acc ↑; protocol: 10 items, 0-shot, prompt before the input" in text


def test_runs_in_another_dtype_never_share_a_column_and_their_label_names_it(tmp_path):
    """bfloat16 weights and log-softmax move every number: a bfloat16 run gets columns of its own."""
    results = _results_with(tmp_path, config_with(name="fp32"), config_with(name="bf16", dtype="bfloat16"))
    assert _columns(results) == {("cpt_ppl_wikipedia", Protocol(256, 4, 0, SMOLLM2)): {"fp32"},
                                 ("cpt_ppl_wikipedia", Protocol(256, 4, 0, SMOLLM2, "bfloat16")): {"bf16"},
                                 ("cpt_piqa", Protocol(None, 10, 0)): {"fp32"},
                                 ("cpt_piqa", Protocol(None, 10, 0, dtype="bfloat16")): {"bf16"}}
    text = markdown(build_board(load_runs(results)))
    assert "## cpt_piqa: acc ↑; protocol: 10 items, 0-shot, prompt before the input\n" in text
    assert "## cpt_piqa: acc ↑; protocol: 10 items, 0-shot, prompt before the input, bfloat16\n" in text


def test_perplexities_of_models_with_other_tokenizers_never_share_a_column_accuracies_do(tmp_path):
    """Token perplexity counts the model's own tokens over windows its tokenizer cut: not comparable across
    models. Multiple-choice items are the same for every model, so their accuracies share a column."""
    results = _results_with(tmp_path, config_with(name="smollm"), config_with(name="gemma", model="gemma3-270m"))
    assert _columns(results) == {("cpt_ppl_wikipedia", Protocol(256, 4, 0, SMOLLM2)): {"smollm"},
                                 ("cpt_ppl_wikipedia", Protocol(256, 4, 0, "gemma3-270m")): {"gemma"},
                                 ("cpt_piqa", Protocol(None, 10, 0)): {"smollm", "gemma"}}
    board = build_board(load_runs(results))
    piqa_rows = next(rows for column, rows in board.columns if column.task == "cpt_piqa")
    assert {row.run.model for row in piqa_rows} == {SMOLLM2, "gemma3-270m"}  # "embedded" shown by its name
    plots = re.findall(r'<svg class="pareto".*?</svg>', page(board), re.DOTALL)
    piqa_plot = next(svg for svg in plots if "cpt_piqa" in svg)
    rings = re.findall(r'<circle class="point ring"[^>]*data-model="([^"]+)"', piqa_plot)
    assert set(rings) == {SMOLLM2} and len(rings) == len(piqa_rows) // 2  # the second model's (by name) markers
    assert f">{SMOLLM2}</text>" in piqa_plot and ">gemma3-270m</text>" in piqa_plot  # the model legend
    assert all("ring" not in svg and "gemma3-270m</text>" not in svg for svg in plots if "cpt_piqa" not in svg)


def test_item_limit_and_fewshot_are_protocol_too(tmp_path):
    more_items = config_with(name="more", targets=[{"task": "cpt_piqa", "limit": 20}])
    results = _results_with(tmp_path, config_with(name="base"), more_items)
    assert {key for key in _columns(results) if key[0] == "cpt_piqa"} == {
        ("cpt_piqa", Protocol(None, 10, 0)), ("cpt_piqa", Protocol(None, 20, 0))}
    (results / "more" / "submission.json").write_text(json.dumps({"fewshot": {"cpt_piqa": 5}}), encoding="utf-8")
    assert ("cpt_piqa", Protocol(None, 20, 5)) in _columns(results)


def test_fewshot_of_our_tasks_is_read_from_their_definition():
    assert task_fewshot("cpt_piqa") == 0 and task_fewshot("cpt_ppl_corpus@text:x.txt") == 0
    assert task_fewshot("hellaswag") is None  # not ours: the task's own default, unknown here
    assert Protocol(None, None, None).label() == "all items, few-shot: task default, prompt before the input"


def test_rows_are_ranked_with_gap_closed_and_memory_beside_each_number(tmp_path):
    results = _results_with(tmp_path, config_with())
    board = build_board(load_runs(results))
    column, rows = next((c, r) for c, r in board.columns if c.task == "cpt_ppl_wikipedia")
    values = [row.cell["value"] for row in rows]
    assert values == sorted(values)  # perplexity: lowest first
    soft = next(r for r in rows if (r.compression["spec"], r.prompt["id"]) == ("rtn-w3g64", SOFT))
    assert soft.gap_closed == pytest.approx((60.0 - 45.0) / (60.0 - 20.0))
    text = markdown(board)
    header = "| rank | run | model | compression | prompt | value ± stderr | Δ vs dense | gap closed | " \
             "gap closed vs trivial | stored MB | ratio to dense | resident MiB | peak MiB | Pareto |"
    assert re.sub(r" +", " ", header) in re.sub(r" +", " ", text)
    line = next(line for line in text.splitlines() if "soft:wikipedia@rtn-w3g64" in line and "rtn-w3g64  " in line)
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    # against the trivial-prefix control (19.0 dense, 57.0 at rtn-w3g64): (57 - 45) / (57 - 19)
    assert soft.gap_closed_vs_trivial == pytest.approx(12.0 / 38.0)
    assert cells[5:] == ["45.00 ± 0.50", "+25.00", "38%", "32%", "100.4", "0.373", "191", "3072", "★"]
    trivial = next(line for line in text.splitlines() if "| trivial " in line and "rtn-w3g64  " in line)
    assert [cell.strip() for cell in trivial.strip("|").split("|")][6:9] == ["+37.00", "8%", "–"]  # (60-57)/(60-20)
    accuracy = next(rows for c, rows in board.columns if c.task == "cpt_piqa")
    assert [r.cell["value"] for r in accuracy] == sorted((r.cell["value"] for r in accuracy), reverse=True)
    # PIQA: 0.65 dense, 0.55 at rtn-w3g64, stderr 0.05 each: a 0.10 gap is under 2 x 0.071, so its share is noise
    soft = next(r for r in accuracy if (r.compression["spec"], r.prompt["id"]) == ("rtn-w3g64", SOFT))
    assert soft.gap_closed == pytest.approx(-0.025 / 0.10) and not soft.gap_resolved
    assert row_fields(next(c for c, _ in board.columns if c.task == "cpt_piqa"), soft)["gap closed"] == "n/s"


def test_pareto_flags_keep_points_no_other_beats_on_both():
    points = [(100.0, 5.0), (100.0, 6.0), (170.0, 4.0), (269.0, 4.0), (269.0, 1.0), (90.0, 9.0)]
    assert pareto_flags(points) == [True, False, True, False, True, True]


def test_a_run_from_before_the_trivial_prefix_control_is_verified_and_shown_without_it(tmp_path):
    """A run folder whose config.json predates ``prompts.trivial_prefix`` ran without the control: its plan is the
    one it ran (so ``--add`` verifies it), and its rows have no gap closed vs trivial."""
    run = make_run_folder(tmp_path / "run", config_with(prompts={**CONFIG["prompts"], "trivial_prefix": False}))
    stored = json.loads((run / "config.json").read_text(encoding="utf-8"))
    del stored["prompts"]["trivial_prefix"]  # as written before the setting existed
    (run / "config.json").write_text(json.dumps(stored), encoding="utf-8")
    folder = add_run(run, tmp_path / "results")
    board = build_board(load_runs(folder.parent))
    rows = [row for _, column_rows in board.columns for row in column_rows]
    assert rows and all(row.prompt["id"] != "trivial" and row.gap_closed_vs_trivial is None for row in rows)
    assert any(row.gap_closed is not None for row in rows)
    text = markdown(board)
    line = next(line for line in text.splitlines() if "soft:wikipedia@rtn-w3g64" in line and "rtn-w3g64  " in line)
    assert [cell.strip() for cell in line.strip("|").split("|")][7:9] == ["38%", "–"]


def test_a_run_folder_without_its_config_is_a_report_error(tmp_path):
    results = _results_with(tmp_path, config_with())
    (results / "submitted" / "config.yaml").unlink()
    with pytest.raises(ReportError, match=re.escape(f"{results / 'submitted'}: neither config.json nor config.yaml")):
        write_leaderboard(results)


def test_page_is_self_contained_with_filters_plots_and_report_links(tmp_path):
    results = _results_with(tmp_path, config_with(name="short"), config_with(name="long", ppl_seqlen=512))
    (results / "short" / "report").mkdir()
    (results / "short" / "report" / "report.html").write_text("<html></html>", encoding="utf-8")
    text = page(build_board(load_runs(results)))
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), "the page must not fetch anything"
    assert text.count('<svg class="pareto"') == 3 and text.count('<section class="board"') == 3
    assert '<a href="short/report/report.html">short</a>' in text and '<a href="long/report' not in text
    for key in ("model", "family", "kind", "run"):
        assert f'data-key="{key}"' in text
    assert 'class="frontier" points="' in text and 'points=""' not in text


def _refusal(run: Path, results: Path, problem: str) -> None:
    with pytest.raises(SubmissionError, match=problem) as caught:
        add_run(run, results)
    assert "\n" not in str(caught.value)
    assert not (results / "submitted").exists()


def test_add_copies_a_verified_run_and_the_page_says_where_it_came_from(tmp_path, capsys):
    run = make_run_folder(tmp_path / "elsewhere" / "run", config_with())
    results = _results_with(tmp_path, config_with(name="committed", ppl_seqlen=512))
    assert main(["leaderboard", "--results", str(results), "--add", str(run)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [str(results / "submitted"), str(results / "LEADERBOARD.md"), str(results / "LEADERBOARD.html")]
    folder = results / "submitted"
    assert {p.name for p in folder.iterdir()} == {"summary.json", "config.json", "config.yaml", "environment.json",
                                                  "submission.json", "report"}
    submission = json.loads((folder / "submission.json").read_text(encoding="utf-8"))
    assert submission["cells_verified"] == len(list((run / "cells").glob("*.json"))) > 0
    assert submission["fewshot"] == {"cpt_ppl_wikipedia": 0, "cpt_piqa": 0} and submission["source"] == str(run)
    html = (results / "LEADERBOARD.html").read_text(encoding="utf-8")
    assert '<a href="submitted/report/report.html">submitted</a>' in html
    runs = html[html.index('<tr id="run-submitted">'):]
    runs = runs[:runs.index("</tr>")]
    assert "Linux-test-host" in runs and "c0ffeec0ffee" in runs and "torch 2.13.0+cpu" in runs
    assert f"from {run}" in runs and "cell checksums verified" in runs
    assert "committed with the repository" in html
    assert main(["leaderboard", "--results", str(results), "--add", str(run)]) == 2  # the name is taken
    assert "already exists" in capsys.readouterr().err


def _rewrite_cell(run: Path, change, keep_checksum: bool) -> None:
    """Change the first perplexity cell record of ``run``, recomputing its checksum unless ``keep_checksum``."""
    path = sorted((run / "cells").glob("*cpt_ppl_wikipedia.json"))[0]
    record = json.loads(path.read_text(encoding="utf-8"))
    change(record)
    if not keep_checksum:
        record["checksum"] = store.checksum(record)
    path.write_text(json.dumps(record), encoding="utf-8")


def test_add_refuses_a_cell_changed_after_it_was_written(tmp_path, capsys):
    run = make_run_folder(tmp_path / "run", config_with())
    _rewrite_cell(run, lambda record: record["metric"].update(value=1.0), keep_checksum=True)
    _refusal(run, tmp_path / "results", "checksum mismatch")
    assert main(["leaderboard", "--results", str(tmp_path / "results"), "--add", str(run)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "checksum mismatch" in error


@pytest.mark.parametrize(("damage", "problem"), [
    (lambda run: _rewrite_cell(run, lambda r: r["cell"].update(limit=3), keep_checksum=False),
     "evaluated under another protocol than its config states \\(differs at limit\\)"),
    (lambda run: _rewrite_cell(run, lambda r: r["cell"].update(apply_chat_template=True), keep_checksum=False),
     "evaluated under another protocol than its config states \\(differs at apply_chat_template\\)"),
    (lambda run: _rewrite_cell(run, lambda r: r["lm_eval"]["n-shot"].update({r["cell"]["task"]: 5}), False),
     "were run with different few-shot counts \\[0, 5\\]"),
    (lambda run: _rewrite_cell(run, lambda r: r["lm_eval"]["configs"][r["cell"]["task"]]["metadata"].update(
        seqlen=2048), False), "scored windows of 2048 tokens, its config states ppl_seqlen 256"),
    (lambda run: sorted((run / "cells").glob("*.json"))[0].unlink(), "cells of its config have no record"),
    (lambda run: (run / "summary.json").write_text(
        (run / "summary.json").read_text(encoding="utf-8").replace('"value": 20.0', '"value": 19.0', 1),
        encoding="utf-8"), "differs from what its verified cells give \\(at cells\\[0\\].value\\)"),
    (lambda run: (run / "summary.json").write_text("{}", encoding="utf-8"), "format is None"),
    (lambda run: (run / "config.json").unlink(), "config.json: no such file"),
])
def test_add_refuses_a_run_that_fails_verification_in_one_line(tmp_path, damage, problem):
    run = make_run_folder(tmp_path / "run", config_with())
    damage(run)
    _refusal(run, tmp_path / "results", problem)


def test_add_of_a_missing_folder_names_it(tmp_path):
    _refusal(tmp_path / "nowhere", tmp_path / "results", "nowhere: no such run folder")


def test_the_plot_legend_flows_every_prompt_kind_into_lines_that_fit_the_plot():
    entries = [(kind.label, kind.colour, "") for kind in RECOVERY_KINDS.values()]
    entries += [("a-rather-long-model-name-for-the-legend", "#666666", " ring")]
    lines = _flowed(entries)
    assert [entry for line in lines for entry in line] == entries  # nothing lost, order kept
    assert len(lines) >= 2  # more kinds than one line holds
    assert all(sum(_entry_width(entry) for entry in line) <= _WIDTH - _LEFT - _RIGHT for line in lines)


def test_added_bytes_count_stored_tensors_only_per_kind():
    """No prompt and a hard prompt store no weights (a hard prompt's embeddings and cache are serving costs); a soft
    prompt and a LoRA adapter their values as float32; an entry that records ``stored_bytes`` (EoRA, fp16) those;
    an entry that does not tell (a run from before the record, an untrained control) is unknown."""
    kinds = RECOVERY_KINDS
    assert kinds["none"].added_bytes({"id": "none", "kind": "none"}) == 0
    assert kinds["hard"].added_bytes({"kind": "hard", "n_tokens": 20, "embedding_bytes": 51_200}) == 0
    assert kinds["soft"].added_bytes({"kind": "soft", "n_tokens": 20, "trainable_parameters": 11_520}) == 46_080
    assert kinds["soft"].added_bytes({"kind": "soft", "n_tokens": 20}) is None
    assert kinds["soft"].added_bytes({"kind": "soft", "control": "random", "trainable_parameters": 0}) is None
    assert kinds["lora"].added_bytes({"kind": "lora", "trainable_parameters": 57_600}) == 230_400
    assert kinds["eora"].added_bytes({"kind": "eora", "stored_bytes": 98_304, "adapter_bytes": 196_608}) == 98_304
    assert kinds["eora"].added_bytes({"kind": "eora", "adapter_bytes": 196_608}) is None


@pytest.fixture(scope="module")
def lora_board(tmp_path_factory):
    prompts = {**CONFIG["prompts"], "lora": {"rank": 1, "target_modules": ["q_proj", "v_proj"]}}
    results = _results_with(tmp_path_factory.mktemp("lora"), config_with(prompts=prompts))
    return build_board(load_runs(results))


def test_recovery_view_ranks_methods_per_level_by_quality_at_added_bytes(lora_board):
    groups = recovery_groups(lora_board)
    columns = [column for column, _ in lora_board.columns]
    # every target at both compressed levels (dense has no compression loss to recover), in the run's level order
    assert [(g.column.task, g.spec) for g in groups] == [(c.task, spec) for c in columns
                                                         for spec in ("rtn-w3g64", "sparsegpt-50")]
    group = next(g for g in groups if (g.column.task, g.spec) == ("cpt_ppl_wikipedia", "rtn-w3g64"))
    kinds = [method.row.prompt["kind"] for method in group.rows]
    values = [method.row.cell["value"] for method in group.rows]
    assert values == sorted(values) and sorted(kinds) == ["hard", "lora", "none", "soft"]  # no trivial control
    added = {method.row.prompt["kind"]: method.added_bytes for method in group.rows}
    assert added == {"none": 0, "hard": 0, "soft": 4 * _TRAINABLE["soft"], "lora": 4 * _TRAINABLE["lora"]}
    # frontier of (added bytes, perplexity): LoRA (best), the soft prompt (fewer bytes), no prompt (0 B, better than
    # the hard prompt at 0 B); the hard prompt is beaten by no prompt on both
    assert {m.row.prompt["kind"]: m.frontier for m in group.rows} == {"lora": True, "soft": True, "none": True,
                                                                      "hard": False}
    flags = pareto_flags([(float(m.added_bytes), m.row.cell["value"]) for m in group.rows])
    assert [m.frontier for m in group.rows] == flags
    soft = next(m for m in group.rows if m.row.prompt["kind"] == "soft")
    assert soft.gap_per_added_mb == pytest.approx(soft.row.gap_closed / (4 * _TRAINABLE["soft"] / 1e6))
    assert next(m for m in group.rows if m.row.prompt["kind"] == "none").gap_per_added_mb is None  # 0 bytes
    piqa = next(g for g in groups if (g.column.task, g.spec) == ("cpt_piqa", "rtn-w3g64"))
    accuracies = [method.row.cell["value"] for method in piqa.rows]
    assert accuracies == sorted(accuracies, reverse=True)  # higher is better: best first


def test_recovery_view_in_the_markdown_and_the_page(lora_board):
    groups = recovery_groups(lora_board)
    text = markdown(lora_board, recovery_markdown(groups))
    assert text.index("## Recovery per added byte") < text.index("## Runs: where each row came from")
    assert text.count("\n### ") == len(groups)
    line = next(line for line in text.split("## Recovery per added byte")[1].splitlines()
                if "lora:wikipedia@rtn-w3g64" in line and "45.00" not in line)
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    per_mb = 100 * (60.0 - 42.0) / (60.0 - 20.0) / (4 * _TRAINABLE["lora"] / 1e6)  # gap closed 45% over 16,384 B
    assert cells[2] == "LoRA adapter" and cells[7:] == ["16.4 kB", "0", f"{per_mb:.1f}%/MB", "★"]
    html = page(lora_board)
    assert html.count('<svg class="recovery"') == html.count('<section class="recovery"') == len(groups)
    plot = html.split('<section class="recovery"')[1]
    assert ">0 B</text>" in plot and ">10 kB</text>" in plot  # 0 B apart, then decades
    assert '<a href="#recovery">' in html.split("<section")[0] and '<h2 id="recovery">' in html  # linked from the top
    assert 'class="frontier" points="' in plot and 'points=""' not in plot
    assert plot.count('circle class="point') == len(groups[0].rows)
    assert recovery_markdown([]) == ""
    unknown = dataclasses.replace(groups[0], rows=[MethodRow(m.row, None) for m in groups[0].rows])
    assert recovery_svg(unknown) == f'<p class="protocol">{NO_BYTES}</p>'  # a run from before the byte record


def test_a_summary_keeps_the_stored_bytes_a_kind_records():
    """EoRA's adapter records its fp16 stored bytes; the summary keeps them, and they are its added bytes (not the
    resident adapter bytes, float32 when loaded so)."""
    record = {"cell": {"prompt": "eora-r16", "prompt_choice": {"kind": "eora"}},
              "prompt": {"kind": "eora", "n_tokens": 0, "stored_bytes": 98_304}, "memory": {"adapter_bytes": 196_608}}
    entry = store._prompt_summary(record)
    assert entry["stored_bytes"] == 98_304 and RECOVERY_KINDS["eora"].added_bytes(entry) == 98_304
    del record["prompt"]["stored_bytes"]
    assert "stored_bytes" not in store._prompt_summary(record)  # summaries of other kinds are unchanged


def test_a_soft_prompt_trained_on_eora_is_named_as_both_methods():
    from cpt_bench.report.recovery_board import method_label

    assert method_label({"kind": "soft"}) == "soft prompt"
    assert method_label({"kind": "soft", "on_eora": 16}) == "EoRA + soft prompt"
    assert method_label({"kind": "eora", "rank": 16}) == "EoRA adapter"
