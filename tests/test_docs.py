"""The user docs (README.md, docs/*.md) state what the tree and the code hold: the architecture page's file table,
the `cpt` model's model_args, the plan's speed constants; and every link stays inside the repository and resolves.
(That every command of the pages runs in CI is tests/test_readme.py.)"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = [REPO / "README.md", REPO / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))]
README_MAX_LINES = 200
FENCED = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
TABLE_PATH = re.compile(r"^\|\s*`([^`]+)`\s*\|", re.MULTILINE)


def section(text: str, heading: str) -> str:
    """The text under the markdown heading ``heading`` (a line such as ``## Files``) up to the next heading of the
    same or a higher level."""
    level = heading.split()[0]
    start = text.index(f"\n{heading}\n") + len(heading) + 2
    following = re.search(rf"^#{{1,{len(level)}}} ", text[start:], re.MULTILINE)
    return text[start:start + following.start()] if following else text[start:]


def table_paths(text: str) -> list[str]:
    """The backticked first cells of a markdown table's rows."""
    return TABLE_PATH.findall(text)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, blanks to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = FENCED.sub("", page.read_text(encoding="utf-8"))
    return {anchor(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def links(page: Path) -> list[str]:
    """Every link target of a page outside code blocks and inline code."""
    text = re.sub(r"`[^`\n]*`", "", FENCED.sub("", page.read_text(encoding="utf-8")))
    return LINK.findall(text)


def link_problem(page: Path, target: str) -> str | None:
    """Why ``target`` (a link of ``page``) is wrong, or None: it must be a web address or resolve to a file or
    folder inside the repository, and an anchor into a markdown page must name one of its headings."""
    if re.match(r"(https?|mailto):", target):
        return None
    path, _, fragment = target.partition("#")
    resolved = (page.parent / path).resolve() if path else page
    if not resolved.is_relative_to(REPO):
        return "points outside the repository"
    if not resolved.exists():
        return "names a file that does not exist"
    if fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
        return f"names an anchor {resolved.name} does not have"
    return None


# --- the pages --------------------------------------------------------------------------------------------------

def test_readme_is_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines < README_MAX_LINES, f"README.md has {lines} lines; keep it under {README_MAX_LINES} (detail: docs/)"


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(REPO)) for page in PAGES])
def test_links_stay_in_the_repository_and_resolve(page):
    problems = [f"{target}: {problem}" for target in links(page) if (problem := link_problem(page, target))]
    assert not problems, f"{page.relative_to(REPO)}: bad links:\n  " + "\n  ".join(problems)


def test_link_check_catches_outside_missing_and_anchor(tmp_path):
    page = DOCS / "matrix.md"
    assert link_problem(page, "../../shared/notes/paper-protocol.md") == "points outside the repository"
    assert link_problem(page, "no-such-page.md") == "names a file that does not exist"
    assert link_problem(page, "lm-eval.md#no-such-heading") == "names an anchor lm-eval.md does not have"
    assert link_problem(page, "lm-eval.md#perplexity-protocol") is None
    assert link_problem(page, "https://example.org/x") is None


def test_anchor_follows_github():
    assert anchor(" Resume, shards and Ray") == "resume-shards-and-ray"
    assert anchor("The `cpt` model") == "the-cpt-model"
    assert anchor("A second family: Gemma 3 270M") == "a-second-family-gemma-3-270m"


# --- the architecture page's file table is the tree --------------------------------------------------------------

def tree_files() -> set[str]:
    """Every module of the package (empty ``__init__.py`` package markers aside), benchmark, config and task
    loader, as paths relative to the repository."""
    files = {path for path in (REPO / "cpt_bench").rglob("*.py")
             if path.name != "__init__.py" or path.read_text(encoding="utf-8").strip()}
    files |= {*(REPO / "benchmarks").glob("*.py"), *(REPO / "configs").glob("*.yaml"), *(REPO / "tasks").glob("*.py")}
    return {str(path.relative_to(REPO)) for path in files}


def test_architecture_file_table_matches_the_tree():
    listed = table_paths(section((DOCS / "architecture.md").read_text(encoding="utf-8"), "## Files"))
    repeated = sorted({path for path in listed if listed.count(path) > 1})
    missing, extra = sorted(tree_files() - set(listed)), sorted(set(listed) - tree_files())
    assert not missing and not extra and not repeated, (
        "docs/architecture.md's '## Files' table and the tree differ.\nin the tree, not in the table:\n  "
        + "\n  ".join(missing or ["-"]) + "\nin the table, not in the tree:\n  " + "\n  ".join(extra or ["-"])
        + "\nlisted twice:\n  " + "\n  ".join(repeated or ["-"]))


# --- facts the pages state, against the code ---------------------------------------------------------------------

def test_lm_eval_page_lists_every_model_arg_of_the_cpt_model():
    from cpt_bench.lmeval.adapter import MODEL_CONSTRUCTOR_ARGS, RECOVERY_ARGS, CptLM

    own = [name for name, parameter in inspect.signature(CptLM.__init__).parameters.items()
           if name != "self" and parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    own += list(RECOVERY_ARGS)  # each registered recovery method's model_arg
    page = (DOCS / "lm-eval.md").read_text(encoding="utf-8")
    rows = table_paths(section(page, "## The `cpt` model"))
    assert sorted(rows) == sorted(own), f"docs/lm-eval.md's model_args table {rows} differs from CptLM's {own}"
    unnamed = [name for name in MODEL_CONSTRUCTOR_ARGS if f"`{name}`" not in page]
    assert not unnamed, f"docs/lm-eval.md does not name the accepted from_pretrained arguments {unnamed}"


def test_matrix_page_states_the_plan_constants():
    from cpt_bench.matrix import plan

    rows = re.findall(r"^\| `([A-Z_]+)` \| ([0-9.]+) \|", (DOCS / "matrix.md").read_text(encoding="utf-8"), re.M)
    stated = {name: float(value) for name, value in rows}
    constants = {name: float(value) for name, value in vars(plan).items()
                 if re.fullmatch(r"[A-Z_]+", name) and name.endswith(("_SECONDS", "_PER_SECOND", "_FACTOR"))}
    assert set(stated) == set(constants), (sorted(stated), sorted(constants))
    for name, value in constants.items():
        assert stated[name] == pytest.approx(value, abs=5e-4), f"docs/matrix.md states {name} = {stated[name]}, " \
                                                              f"plan.py has {value}"


@pytest.mark.parametrize(("heading", "report_path"), [("## One result", "results/default/report/report.md"),
                                                      ("## Generated answers", "results/generation/report/report.md")])
def test_readme_result_table_is_the_committed_run(heading, report_path):
    """Every cell of a README result table is the committed run's cell (the first table of its report)."""
    readme = section((REPO / "README.md").read_text(encoding="utf-8"), heading)
    report = (REPO / report_path).read_text(encoding="utf-8")
    report_rows = {row.split("|")[1].strip(): row for row in report.split("\n### ")[1].splitlines()
                   if row.startswith("| ")}
    readme_rows = [row.split("|")[1:-1] for row in readme.splitlines() if row.startswith("| ")][1:]  # past the header
    assert readme_rows
    for compression, *cells in readme_rows:
        row = report_rows[compression.strip()]
        assert all(f" {cell.strip()} " in row for cell in cells), (compression, cells, row)


STUDY_LEVELS = ("gptq-w3g64", "sparsegpt-50+gptq-w4g64")  # README's recovery-study table: two columns per level


def test_readme_recovery_study_table_is_the_committed_run():
    """README's recovery-study table: each row is a method of the report's "recovery methods" tables (its label
    without the level), with its added bytes and, per level, its gap closed and PIQA change as the report gives them."""
    readme = section((REPO / "README.md").read_text(encoding="utf-8"), "## Recovery methods side by side")
    report = (REPO / "results/recovery-study/report/report.md").read_text(encoding="utf-8")
    tables = {level: section(report, f"### {level}: recovery methods and their budget; trained on wikipedia (in-domain "
                             "where a target reads it); gap closed or change against no prompt, 95% CI")
              for level in STUDY_LEVELS}
    readme_rows = [row.split("|")[1:-1] for row in readme.splitlines() if row.startswith("| ")][1:]  # past the header
    assert len(readme_rows) >= 8
    for label, added, *effects in readme_rows:
        for level, level_effects in zip(STUDY_LEVELS, (effects[:2], effects[2:]), strict=True):
            row = next((row for row in tables[level].splitlines() if row.startswith("| ")
                        and row.split("|")[1].strip().replace(f"@{level}", "") == label.strip()), None)
            assert row is not None, (label, level)
            assert all(f" {cell.strip()} " in row for cell in (added, *level_effects)), (label, level, row)


def test_architecture_layers_table_is_the_enforced_layer_order():
    """The page's layer table names the layers of ``tests/test_layers.py``'s ``LAYERS``, in that order."""
    from tests.test_layers import LAYERS

    rows = [line.split("|")[2] for line in section((DOCS / "architecture.md").read_text(encoding="utf-8"),
                                                  "## Layers").splitlines() if re.match(r"\| \d+\. ", line)]
    named = [name.rstrip("/") for row in rows for name in re.findall(r"`([^`]+)`", row)]
    layers = [name for name in named if name not in ("__init__", "cli_commands")]
    assert layers == list(LAYERS), f"docs/architecture.md's layer table {layers} differs from LAYERS {list(LAYERS)}"
