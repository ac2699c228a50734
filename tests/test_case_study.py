"""``cpt-bench case-study``: a generative target's answers side by side, fixes / breaks / McNemar per prompt against
the compressed model, the rule choosing the questions shown, the md and HTML pages, and bad inputs in one line.

``make_generation_run`` writes a finished run folder through the matrix store (``test_leaderboard.make_run_folder``)
whose CoQA cells hold hand-made per-item scores and answers (``SCORES``); PIQA cells are ordinary accuracy cells.
"""

from __future__ import annotations

import copy
import math
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from cpt_bench.cli import build_parser, main
from cpt_bench.files import OutputPathError
from cpt_bench.matrix import store
from cpt_bench.matrix.config import Target
from cpt_bench.matrix.paired import PairingError
from cpt_bench.matrix.plan import stored_cell
from cpt_bench.report.case_study import (
    CASE_STUDY_KIND,
    DEFAULT_QUESTIONS,
    CaseStudyError,
    Column,
    build_case_study,
    effect,
    markdown_text,
    select_questions,
    write_case_study,
)
from tests.test_leaderboard import _record, config_with, make_run_folder

COQA = {"task": "cpt_coqa", "limit": 10, "gen_kwargs": {"max_gen_toks": 8}}
COQA_ID = "cpt_coqa+max_gen_toks=8"
PIQA = {"task": "cpt_piqa", "limit": 10, "metric": "acc"}
GENERATION_CONFIG = config_with(name="generation", targets=[COQA, PIQA])
DOCS = list(range(10))
# Per-item exact match on documents 0-9 by (level, prompt kind); absent: the level's unprompted scores.
SCORES = {("dense", "none"): [1, 1, 1, 1, 1, 0, 1, 1, 0, 1],
          ("rtn-w3g64", "none"): [0, 1, 0, 1, 0, 0, 1, 0, 0, 1],
          ("rtn-w3g64", "hard"): [1, 1, 1, 0, 1, 1, 1, 1, 0, 1],  # fixes 0 2 4 5 7, breaks 3
          ("rtn-w3g64", "soft"): [1, 0, 0, 0, 0, 0, 0, 0, 0, 0.5],  # fixes 0, breaks 1 3 6; 0.5: right
          ("sparsegpt-50", "none"): [1, 1, 0, 1, 0, 1, 1, 0, 1, 1]}
GOLD = {doc: f"answer {doc}" for doc in [*DOCS, 10]}
MESSY = {(2, "dense"): " ANSWER  2\n"}  # the gold answer as the metric normalises it: not another distinct answer
HOSTILE = "<b>x</b> | *y* & `z`"  # the trivial control's wrong answer to document 7


def _response(doc: int, compression: str, kind: str, score: int) -> str:
    if (doc, compression) in MESSY:
        return MESSY[doc, compression]
    if score:
        return GOLD[doc]
    if doc == 7:  # every column wrong in its own way: the most distinct answers
        return HOSTILE if kind == "trivial" else f"{compression} {kind} guess"
    return f"not {doc}"


def _coqa_record(cell: Any, config: Any) -> dict[str, Any]:
    """A generative cell: a PIQA-shaped record given the CoQA cell's identity, metric and examples."""
    record = _record(replace(cell, target=Target("cpt_piqa", limit=10, metric="acc")), config)
    kind = cell.prompt.control or cell.prompt.kind
    scores = SCORES.get((cell.compression, kind), SCORES[cell.compression, "none"])
    docs = DOCS + [10] if cell.compression == "dense" else DOCS  # a document no other cell has
    scores = scores + [1] if cell.compression == "dense" else scores
    if kind == "hard":  # stored in another order: paired by document id
        docs, scores = docs[::-1], scores[::-1]
    inputs = {doc: f"Story {doc} ```code``` <i>tag</i>\nQ: question {doc}?\n\nA:" for doc in docs}
    record.update(cell=stored_cell(cell, config),
                  metric={"name": "em", "value": sum(scores) / len(scores), "stderr": 0.1, "higher_is_better": True},
                  lm_eval={"n-shot": {COQA_ID: 0}, "configs": {COQA_ID: {"metadata": {}}}},
                  examples={"doc_ids": docs, "doc_hashes": [f"{doc:012x}" for doc in docs],
                            "scores": [float(score) for score in scores],
                            "generations": {"responses": [_response(d, cell.compression, kind, s)
                                                          for d, s in zip(docs, scores, strict=True)],
                                            "answers": [[GOLD[doc], "other"] for doc in docs],
                                            "inputs": [inputs[doc] for doc in docs], "input_chars": 600}})
    return record


def _record_of(cell: Any, config: Any) -> dict[str, Any]:
    return _coqa_record(cell, config) if cell.target.task == "cpt_coqa" else _record(cell, config)


def make_generation_run(folder: Path, config: dict[str, Any] | None = None) -> Path:
    """A finished run folder with a CoQA target whose cells hold ``SCORES`` (and a PIQA target)."""
    return make_run_folder(folder, config or GENERATION_CONFIG, _record_of)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return make_generation_run(tmp_path_factory.mktemp("case") / "run")


@pytest.fixture(scope="module")
def written(run, tmp_path_factory) -> tuple[Path, str, str]:
    out = tmp_path_factory.mktemp("written") / "study"
    md, page = write_case_study(run, out, questions=3)
    return out, md.read_text(encoding="utf-8"), page.read_text(encoding="utf-8")


def _binomial_mcnemar(fixes: int, breaks: int) -> float:
    """Two-sided exact McNemar by hand: twice the smaller binomial(n, 1/2) tail, at most 1."""
    n = fixes + breaks
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(fixes, breaks) + 1)) / 2 ** n)


def test_columns_effects_and_mcnemar_against_hand_counts(run):
    study = build_case_study(run)
    assert study.target == COQA_ID and study.level == "rtn-w3g64" and study.metric == "em"  # fewest bits
    assert study.doc_ids == DOCS  # the reference's order; document 10 (dense only) is not shared
    labels = [column.label for column in study.columns]
    assert labels == ["dense", "rtn-w3g64", "rtn-w3g64 + hard:paper", "rtn-w3g64 + soft:wikipedia@rtn-w3g64",
                      "rtn-w3g64 + trivial"]
    assert [column.kind for column in study.columns] == ["dense", "compressed", "hard", "soft", "control"]
    for column, key in zip(study.columns, [("dense", "none"), ("rtn-w3g64", "none"), ("rtn-w3g64", "hard"),
                                           ("rtn-w3g64", "soft"), ("rtn-w3g64", "none")], strict=True):
        assert column.scores == [float(s) for s in SCORES[key]]  # the hard cell's reversed order undone
    dense, reference, hard, soft, trivial = study.effects
    assert reference is None
    assert (hard.fixes, hard.breaks, hard.both_right, hard.both_wrong) == (5, 1, 3, 1)
    assert hard.mcnemar_p == pytest.approx(14 / 64) == pytest.approx(_binomial_mcnemar(5, 1))
    assert (soft.fixes, soft.breaks, soft.both_right, soft.both_wrong) == (1, 3, 1, 5)
    assert soft.mcnemar_p == pytest.approx(10 / 16)
    assert (dense.fixes, dense.breaks, dense.mcnemar_p) == (4, 0, pytest.approx(2 / 16))
    assert (trivial.fixes, trivial.breaks, trivial.mcnemar_p) == (0, 0, 1.0)
    assert hard.difference.estimate == pytest.approx(0.4) and hard.difference.n == 10
    assert study.answers[0] == ["answer 0", "other"] and study.inputs[3].endswith("Q: question 3?\n\nA:")
    hard_answers = study.columns[2].responses
    assert hard_answers[3] == "not 3" and hard_answers[4] == "answer 4"


def test_another_level_and_a_target_by_task_name(run):
    study = build_case_study(run, target="cpt_coqa", level="sparsegpt-50")
    assert study.level == "sparsegpt-50" and study.columns[1].label == "sparsegpt-50"
    assert study.columns[1].scores == [float(s) for s in SCORES["sparsegpt-50", "none"]]
    assert study.columns[2].label == "sparsegpt-50 + hard:paper"


def test_selection_rule_changes_first_then_distinct_answers_then_document_id(run):
    study = build_case_study(run, questions=10)
    # changed columns (of dense, hard, soft, trivial) per document: 0: 3; 2, 3, 4, 7: 2; 1, 5, 6: 1; 8, 9: 0.
    # Among the 2s document 7 has 4 distinct answers, the rest 2 (document 2's messy dense answer is the gold one).
    assert [study.doc_ids[i] for i in study.shown] == [0, 7, 2, 3, 4, 1, 5, 6, 8, 9]
    assert build_case_study(run, questions=3).shown == study.shown[:3]


def test_selection_rule_on_hand_made_columns():
    def column(scores, responses):
        return Column("c", "k", "id", [float(s) for s in scores], responses)

    reference = column([0, 0, 0, 1], ["a", "a", "b", "c"])
    others = [column([0, 1, 0, 1], ["a", "x", "y", "c"]), column([0, 1, 0, 1], ["q", "x", "z", "c"])]
    columns = [others[0], reference, others[1]]
    # doc 30: both other columns changed; docs 10, 20, 40: none, with 2, 3 and 1 distinct answers
    assert select_questions(columns, [10, 30, 20, 40], 4) == [1, 2, 0, 3]
    assert select_questions(columns, [10, 30, 20, 40], 1) == [1]


def test_a_partial_score_counts_as_right():
    """CoQA's em averages exact match over the gold answers left out in turn: 0.5 or 0.67 is a matching answer."""
    found = effect([0.5, 0.0, 1.0, 0.67, 0.0, 0.0], [1.0, 0.0, 0.5, 0.0, 0.67, 0.5])
    assert (found.fixes, found.breaks, found.both_right, found.both_wrong) == (2, 1, 2, 1)
    assert found.mcnemar_p == pytest.approx(_binomial_mcnemar(2, 1)) == 1.0
    assert found.difference.estimate == pytest.approx((0.5 - 0.5 - 0.67 + 0.67 + 0.5) / 6)


def test_markdown_and_html_are_written_and_escaped(written):
    out, md, page = written
    assert sorted(path.name for path in out.iterdir()) == ["case-study.html", "case-study.md"]
    assert md.startswith(f"# Case study: generation, {markdown_text(COQA_ID)} at rtn-w3g64\n")
    assert CASE_STUDY_KIND.recognises(out)
    row = next(line for line in md.splitlines() if line.startswith("| rtn-w3g64 + hard:paper"))
    assert [cell.strip() for cell in row.split("|")[2:-1]] == ["hard", "0.800", "+0.400 [-0.100, +0.900]", "5", "1",
                                                               "3", "1", "0.219"]
    assert "- rtn-w3g64 + hard:paper: fixes documents 0, 2, 4, 5, 7; breaks documents 3" in md
    assert "## Questions (3 of 10)" in md and "Questions shown: ranked by how many other columns" in md
    headings = re.findall(r"^### (\d\. document \d+.*)$", md, re.MULTILINE)
    assert headings[0] == ("1. document 0 (lost by compression; fixed by rtn-w3g64 + hard:paper, rtn-w3g64 + "
                           "soft:wikipedia@rtn-w3g64)")
    assert [h.split()[2] for h in headings] == ["0", "7", "2"]
    assert "````text\nStory 7 ```code``` <i>tag</i>\nQ: question 7?\n\nA:\n````" in md  # fence longer than ```
    hostile = next(line for line in md.splitlines() if line.startswith("| rtn-w3g64 + trivial") and "<b" in line)
    assert [cell.strip() for cell in re.split(r"(?<!\\)\|", hostile)[1:-1]] == [  # literal, one cell
        "rtn-w3g64 + trivial", r"\<b\>x\</b\> \| \*y\* \& \`z\`", "0", ""]
    assert "Gold: answer 7 / other" in md
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt; | *y* &amp; `z`" in page
    assert "<i>tag</i>" not in page and "&lt;i&gt;tag&lt;/i&gt;" in page
    assert page.count("<h3>") == 3 and page.count("<pre") == 3
    first = re.sub(r"<td[^>]*>\s*", "<td>", page.split("<h3>")[1])  # document 0: fixed by two prompts, by dense
    assert first.count("<td>fixed") == 3 and "<td>broken" not in first


def test_a_rerun_replaces_its_own_output_and_a_foreign_folder_is_refused(run, written, tmp_path):
    out, md, _ = written
    assert write_case_study(run, out, questions=3)[0].read_text(encoding="utf-8") == md
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(OutputPathError, match="holds files that are not a case study"):
        write_case_study(run, foreign)
    assert [path.name for path in foreign.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("kwargs, message", [
    ({"target": "cpt_piqa"}, rf"--target cpt_piqa: a non-generative target of run .*; expected one of its generative "
                             rf"targets: {re.escape(COQA_ID)}$"),
    ({"target": "cpt_nq_open"}, r"--target cpt_nq_open: an unknown target .*generative targets: cpt_coqa"),
    ({"level": "dense"}, r"--level dense: the dense reference, not a compressed level .*expected one of rtn-w3g64, "
                         r"sparsegpt-50$"),
    ({"level": "rtn-w4g64"}, r"--level rtn-w4g64: not a level with prompts .*expected one of rtn-w3g64, sparsegpt-50"),
    ({"questions": 0}, r"--questions 0: expected a positive number"),
])
def test_bad_target_level_or_count_is_one_line(run, kwargs, message):
    with pytest.raises(CaseStudyError, match=message) as error:
        build_case_study(run, **kwargs)
    assert "\n" not in str(error.value)


def _copy_run(run: Path, folder: Path) -> Path:
    import shutil

    shutil.copytree(run, folder)
    return folder


def test_cells_without_generations_and_unpaired_cells_are_one_line(run, tmp_path):
    old = _copy_run(run, tmp_path / "old")
    cell_id = "rtn-w3g64__hard-paper__cpt_coqa+max_gen_toks-8"
    record = store.read_run_cell(old, cell_id)
    del record["examples"]  # a cell written before per-item values were kept
    store.write_cell(old, record)
    with pytest.raises(CaseStudyError, match=rf"cell {re.escape(cell_id)} of run .* keeps no per-item generations"):
        write_case_study(old, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    record = store.read_run_cell(run, cell_id)
    record["examples"]["doc_hashes"][0] = "f" * 12  # another text under the same document id
    store.write_cell(old, record)
    with pytest.raises(PairingError, match="differs between the cells"):
        build_case_study(old)


def test_not_a_run_an_unfinished_run_and_a_run_without_generative_target(run, tmp_path):
    with pytest.raises(store.RunFolderError, match=r"run folder .*nowhere not found \(config.json missing\)"):
        write_case_study(tmp_path / "nowhere")
    unfinished = _copy_run(run, tmp_path / "unfinished")
    (unfinished / store.SUMMARY_FILE).unlink()
    with pytest.raises(store.RunFolderError, match="has no summary.json: it is not finished"):
        write_case_study(unfinished)
    config = copy.deepcopy(GENERATION_CONFIG)
    config["targets"] = [PIQA]
    piqa_only = make_generation_run(tmp_path / "piqa", config)
    with pytest.raises(CaseStudyError, match=r"has no generative target \(its targets: cpt_piqa\)"):
        write_case_study(piqa_only)


def test_cli_writes_the_default_folder_and_refuses_bad_input_in_one_line(run, tmp_path, capsys):
    mine = _copy_run(run, tmp_path / "run")
    assert main(["case-study", str(mine), "--questions", "2"]) == 0
    assert capsys.readouterr().out.split() == [str(mine / "case-study" / name)
                                               for name in ("case-study.md", "case-study.html")]
    assert "## Questions (2 of 10)" in (mine / "case-study" / "case-study.md").read_text(encoding="utf-8")
    assert build_parser().parse_args(["case-study", str(mine)]).questions == DEFAULT_QUESTIONS
    assert main(["case-study", str(mine), "--level", "nosuch"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("cpt-bench: error: --level nosuch") and "\n" not in error


if __name__ == "__main__":  # docs' small form: a fake finished generation run at the given folder
    print(make_generation_run(Path(sys.argv[1])))
