"""``cpt_bench.report``: report and leaderboard text against golden files, PNGs, filenames, malformed summaries, CLI.

Regenerate the golden files after an intended change with ``CPT_BENCH_UPDATE_GOLDEN=1 pytest tests/test_report.py``
and review the diff.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from cpt_bench.files import write_text_atomic
from cpt_bench.report import load_summary, write_leaderboard, write_report
from cpt_bench.report.cli_commands import add_report_parser
from cpt_bench.report.tables import ReportError

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN = FIXTURES / "report_golden"
UPDATE_GOLDEN = os.environ.get("CPT_BENCH_UPDATE_GOLDEN") == "1"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EXPECTED_PNGS = {"plot-cpt_ppl_wikipedia.png", "plot-cpt_ppl_shakespeare.png", "plot-cpt_piqa.png",
                 "heatmap-sources-at-rtn-w3g64.png", "heatmap-sources-at-sparsegpt-2-4.png",
                 "heatmap-levels-wikipedia.png", "heatmap-levels-shakespeare.png"}


def _summary() -> dict[str, Any]:
    return json.loads((FIXTURES / "matrix_summary.json").read_text(encoding="utf-8"))


def _second_run(summary: dict[str, Any]) -> dict[str, Any]:
    """A smaller run of another model (its perplexities get their own columns: another tokenizer): two levels, two
    prompts, piqa scored by acc_norm (a new leaderboard column)."""
    run = copy.deepcopy(summary)
    run.update(name="ablation", model="smollm2-135m")
    run["compressions"] = [c for c in run["compressions"] if c["spec"] != "sparsegpt-2:4"]
    run["prompts"] = [p for p in run["prompts"] if p["id"] in ("none", "soft-wikipedia@rtn-w3g64")]
    for target in run["targets"]:
        target["metric"] = "acc_norm" if target["task"] == "cpt_piqa" else target["metric"]
    kept = {c["spec"] for c in run["compressions"]}, {p["id"] for p in run["prompts"]}
    run["cells"] = [c for c in run["cells"] if c["compression"] in kept[0] and c["prompt"] in kept[1]]
    return run


def _check_golden(path: Path) -> None:
    golden = GOLDEN / path.name
    if UPDATE_GOLDEN:
        write_text_atomic(golden, path.read_text(encoding="utf-8"))
    assert path.read_text(encoding="utf-8") == golden.read_text(encoding="utf-8"), (
        f"{path.name} differs from {golden}; if intended, rerun with CPT_BENCH_UPDATE_GOLDEN=1 and review the diff")


def _config(summary: dict[str, Any]) -> dict[str, Any]:
    """A config the summary's run could have come from: the leaderboard reads each target's protocol from it."""
    targets = [{"task": t["task"], "metric": t["metric"], "limit": 8 if t["task"].startswith("cpt_ppl") else 100}
               for t in summary.get("targets", [])]  # .get: malformed summaries are written too
    return {"name": summary["name"], "model": summary["model"], "ppl_seqlen": 512,
            "compression": {"specs": [c["spec"] for c in summary.get("compressions", [])]}, "targets": targets}


def _write_run(results: Path, folder: str, summary: Any) -> Path:
    """A results run folder: ``summary.json`` and, for a summary given as data, its ``config.yaml``."""
    (results / folder).mkdir(parents=True)
    text = summary if isinstance(summary, str) else json.dumps(summary)
    (results / folder / "summary.json").write_text(text, encoding="utf-8")
    if not isinstance(summary, str):
        (results / folder / "config.yaml").write_text(json.dumps(_config(summary)), encoding="utf-8")
    return results / folder


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> list[Path]:
    return write_report(_summary(), tmp_path_factory.mktemp("report"))


@pytest.mark.parametrize("name", ["report.md", "report.tex", "report.html"])
def test_report_matches_golden(report, name):
    _check_golden(next(path for path in report if path.name == name))


def test_report_writes_valid_pngs_with_plain_names(report):
    pngs = [path for path in report if path.suffix == ".png"]
    assert {path.name for path in pngs} == EXPECTED_PNGS
    for path in pngs:
        assert path.read_bytes().startswith(PNG_SIGNATURE) and path.stat().st_size > 1000
    names = {path.name for path in report[0].parent.iterdir()}
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in names), names
    markdown = report[0].read_text(encoding="utf-8")
    assert all(f"]({name})" in markdown for name in EXPECTED_PNGS)


def test_leaderboard_over_two_runs_matches_golden(tmp_path):
    summary = _summary()
    _write_run(tmp_path, "default", summary)
    _write_run(tmp_path, "ablation", _second_run(summary))
    (tmp_path / "no-summary").mkdir()
    paths = write_leaderboard(tmp_path)
    assert [path.name for path in paths] == ["LEADERBOARD.md", "LEADERBOARD.html"]
    _check_golden(paths[0])
    page = paths[1].read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "cpt_piqa: acc_norm" in page and "soft:wikipedia@rtn-w3g64" in page


def test_leaderboard_names_a_malformed_summary(tmp_path):
    _write_run(tmp_path, "good", _summary())
    bad = _write_run(tmp_path, "bad", "{not json") / "summary.json"
    with pytest.raises(ReportError, match=re.escape(str(bad))):
        write_leaderboard(tmp_path)


def test_leaderboard_without_runs_is_a_report_error(tmp_path):
    with pytest.raises(ReportError, match="no \\*/summary.json found"):
        write_leaderboard(tmp_path)


@pytest.mark.parametrize(("change", "problem"), [
    (lambda s: s.update(format="cpt_bench.matrix_summary/0"), "format is 'cpt_bench.matrix_summary/0'"),
    (lambda s: s.pop("targets"), "the summary lacks 'targets'"),
    (lambda s: s["cells"][0].pop("value"), "cells\\[0\\] lacks 'value'"),
    (lambda s: s["cells"][0].update(stderr="0.1"), "cells\\[0\\] has non-numeric 'stderr'"),
    (lambda s: s["cells"][0].update(prompt="soft-milton@dense"), "cells\\[0\\] names unknown prompt 'soft-milton@"),
    (lambda s: s["cells"].append(dict(s["cells"][0])), "cells\\[37\\] repeats dense / none / cpt_ppl_wikipedia"),
    (lambda s: s["prompts"][2].pop("trained_at"), "prompts\\[2\\] lacks 'trained_at'"),
    (lambda s: s["prompts"][2].update(untrained="yes"), "prompts\\[2\\] has non-boolean 'untrained'"),
    (lambda s: s["cells"][3].update(vs_none={"estimate": "big"}),
     "cells\\[3\\] has 'vs_none' without a numeric 'estimate'"),
])
def test_malformed_summary_is_a_one_line_report_error_naming_the_file(tmp_path, change, problem):
    summary = _summary()
    change(summary)
    path = _write_run(tmp_path, "run", summary) / "summary.json"
    with pytest.raises(ReportError, match=f"^{re.escape(str(path))}: {problem}") as caught:
        load_summary(path)
    assert "\n" not in str(caught.value)
    with pytest.raises(ReportError, match=problem):
        write_report(summary, tmp_path / "out")


def test_untrained_soft_prompt_is_marked_in_every_format_and_the_leaderboard(tmp_path):
    summary = _summary()
    assert all("untrained" not in p for p in summary["prompts"])  # the golden fixture predates the flag
    untrained = next(p for p in summary["prompts"] if p["id"] == "soft-shakespeare@rtn-w3g64")
    untrained["untrained"] = True
    paths = {path.name: path for path in write_report(summary, tmp_path / "report")}
    markdown = paths["report.md"].read_text(encoding="utf-8")
    assert "| soft:shakespeare@rtn-w3g64 (untrained) " in markdown  # the prompts table
    assert "soft:shakespeare@rtn-w3g64 (untrained) (in-domain)" in markdown  # its column on its own target
    assert markdown.count("(untrained)") > 1 and "soft:wikipedia@rtn-w3g64 (untrained)" not in markdown
    for name in ("report.md", "report.html", "report.tex"):
        assert "never beat its initialisation" in paths[name].read_text(encoding="utf-8"), name
    _write_run(tmp_path / "results", "run", summary)
    leaderboard = write_leaderboard(tmp_path / "results")[0].read_text(encoding="utf-8")
    assert "soft:shakespeare@rtn-w3g64 (untrained)" in leaderboard and "never beat its initialisation" in leaderboard


def test_trivial_prefix_control_gets_its_columns_and_its_warning_in_the_report(tmp_path):
    """A summary with the trivial-prefix control on the dense model (the golden fixture predates it): its label,
    and the warning with the figures when it moves the dense model by more than the standard error."""
    summary = _summary()
    dense = next(c for c in summary["cells"] if (c["compression"], c["prompt"], c["task"]) == (
        "dense", "none", "cpt_ppl_wikipedia"))
    summary["prompts"].append({"id": "trivial", "kind": "soft", "source": None, "trained_at": None,
                               "control": "trivial", "n_tokens": 1})
    summary["cells"].append({**{k: v for k, v in dense.items() if not k.startswith(("vs_", "gap_"))},
                             "id": "dense__trivial__cpt_ppl_wikipedia", "prompt": "trivial",
                             "value": dense["value"] - 3 * dense["stderr"]})
    markdown = next(p for p in write_report(summary, tmp_path / "report") if p.name == "report.md").read_text("utf-8")
    assert "| trivial " in markdown  # a column of the results table and a row of the prompts table
    assert (f"Trivial-prefix control: on cpt_ppl_wikipedia the trivial prefix alone moves the dense model's "
            f"token_perplexity from {dense['value']:.2f} to {dense['value'] - 3 * dense['stderr']:.2f}") in markdown
    assert "Trivial-prefix control" not in (GOLDEN / "report.md").read_text(encoding="utf-8")


def test_missing_summary_is_a_report_error_naming_the_file(tmp_path):
    with pytest.raises(ReportError, match=re.escape(f"{tmp_path / 'summary.json'}: no such file")):
        load_summary(tmp_path / "summary.json")


def _run_cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="cpt-bench")
    add_report_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.run(args)


def test_cli_report_and_leaderboard_print_the_written_paths(tmp_path, capsys):
    run = _write_run(tmp_path, "default", _summary())
    _run_cli(["report", str(run)])
    printed = capsys.readouterr().out.split()
    assert printed[:3] == [str(run / "report" / name) for name in ("report.md", "report.tex", "report.html")]
    assert len(printed) == 3 + len(EXPECTED_PNGS) and all(Path(path).is_file() for path in printed)
    _run_cli(["leaderboard", "--results", str(tmp_path)])
    assert capsys.readouterr().out.split() == [str(tmp_path / "LEADERBOARD.md"), str(tmp_path / "LEADERBOARD.html")]
    with pytest.raises(ReportError, match=re.escape(str(tmp_path / "summary.json"))):
        _run_cli(["report", str(tmp_path)])


def test_a_gap_closed_over_a_gap_within_noise_is_stored_as_such_and_printed_n_s():
    from cpt_bench.matrix.paired import Examples, gap_closed
    from cpt_bench.report.recovery import format_gap

    def items(scores: list[int]) -> Examples:
        return Examples(list(range(len(scores))), [""] * len(scores), [float(s) for s in scores], None)

    dense = items([1] * 20 + [0] * 80)
    noise = items([1] * 19 + [0] * 81)  # one item lost: a gap no test tells from zero
    lost = items([1] * 2 + [0] * 98)  # 18 items lost, none gained: McNemar p < 1e-5
    prompted = items([1] * 10 + [0] * 90)
    unresolved, resolved = gap_closed(noise, prompted, dense), gap_closed(lost, prompted, dense)
    assert unresolved["gap_significant"] is False and unresolved["estimate"] == pytest.approx(-9.0)
    assert format_gap(unresolved) == "n/s"
    assert resolved["gap_significant"] is True and resolved["estimate"] == pytest.approx(8 / 18)
    assert format_gap(resolved).startswith("44% [")
