"""The paper's case study as a report: a generative target's questions answered side by side by the dense model, a
compressed model, and that compressed model with each prompt of the run (``cpt-bench case-study``).

A matrix run's generative cells keep per item the answer, the gold answer(s), the context's tail and the 0 / 1
score (``matrix.paired``: ``examples.generations``); this module reads them from the cells of one target at one
compression level, aligned over the items they share (``paired.align``, which checks the document hashes), and
writes ``case-study.md`` and ``case-study.html`` (both or neither, atomically) into a folder that is new, empty or
an earlier case study (``CASE_STUDY_KIND``).

Columns: the dense model without prompt, the compressed model without prompt (the reference), then the compressed
model with each prompt applied at that level in the run's order (hard prompts, learned prompts, controls).

An answer counts as **right** when its score is above 0 (``is_right``): for a 0 / 1 exact match, when it matches;
for CoQA's ``em``, which lm-eval averages over the gold answers left out one at a time (an answer equal to one of
two or three gold answers scores 0.5 or 0.67), when it equals one of the gold answers; for an overlap score such as
F1, when it overlaps at all. Per column against the reference, over the ``k`` shared items: **fixes** = items the
reference gets wrong and the column right, **breaks** = the reverse, the exact two-sided McNemar p-value of fixes
against breaks (``stats.mcnemar_exact``) and the paired difference of the mean score itself (the metric as lm-eval
reports it) with its 95% CI (``stats.paired_difference``).

Which questions are shown (``--questions N``, ``select_questions``): ranked by (1) how many other columns score
the question differently from the reference (dense and every prompt), most first; (2) how many distinct answers
the columns give (stripped, case-folded), most first; (3) document id, ascending ("differently": right in one, wrong
in the other). The first ``N`` are shown in that order: the questions the prompts (or compression) change first,
then those where the answers differ most.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpt_bench import stats
from cpt_bench.errors import UserError
from cpt_bench.files import OutputKind, ensure_replaceable, write_files_atomic
from cpt_bench.matrix import store
from cpt_bench.matrix.paired import align, cell_examples
from cpt_bench.report.tables import Table, html_page, load_summary, prompt_label, to_html, to_markdown

TITLE_PREFIX = "Case study: "
MARKDOWN_FILE, HTML_FILE = "case-study.md", "case-study.html"
CASE_STUDY_KIND = OutputKind("a case study", MARKDOWN_FILE, contains=f"# {TITLE_PREFIX}")  # the markdown's first line
DEFAULT_QUESTIONS = 8
DEFAULT_FOLDER = "case-study"
REFERENCE, DENSE = "compressed", "dense"  # the kinds of the two unprompted columns
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|~#&])")
SELECTION_RULE = ("Questions shown: ranked by how many other columns (dense and each prompt) are right where the "
                  "compressed model is wrong or wrong where it is right, most first; then by how many distinct "
                  "answers the columns give (stripped, case-folded), most first; then by document id.")


class CaseStudyError(UserError):
    """A run folder, target or level the case study cannot use (one-line message)."""


@dataclass(frozen=True)
class Column:
    """One model of the study: ``label`` (``rtn-w3g64 + hard:paper``), ``kind`` (``dense``, ``compressed``, or the
    prompt's kind: ``hard``, ``soft``, ``control``, ...), its cell id, and per shared item its score and answer."""

    label: str
    kind: str
    cell_id: str
    scores: list[float]
    responses: list[str]


@dataclass(frozen=True)
class Effect:
    """A column against the reference over the shared items (right: ``is_right``): ``fixes`` (reference wrong, column
    right), ``breaks`` (right -> wrong), items right / wrong in both, the exact McNemar p and the paired difference
    of the mean score (column - reference) with its 95% CI."""

    fixes: int
    breaks: int
    both_right: int
    both_wrong: int
    mcnemar_p: float
    difference: stats.Estimate


@dataclass(frozen=True)
class CaseStudy:
    """The study of one generative target at one compression level: per shared item (``doc_ids`` order of the
    reference cell) its context tail and gold answer(s); the columns (dense, reference, prompts); each column's
    effect against the reference (None for the reference); and the indices of the questions shown."""

    run: str
    model: str
    target: str
    metric: str
    level: str
    doc_ids: list[int]
    inputs: list[str]
    answers: list[list[str]]
    columns: list[Column]
    effects: list[Effect | None]
    shown: list[int]


def is_right(score: float) -> bool:
    """Whether an answer with this per-item score counts as right: a score above 0 (module docstring)."""
    return score > 0


def effect(reference: list[float], column: list[float]) -> Effect:
    """Fixes, breaks and the paired tests of ``column`` against ``reference`` (per-item scores, same items)."""
    right = [[float(is_right(score)) for score in scores] for scores in (reference, column)]
    breaks, fixes = stats.discordant(*right)  # (right only in the reference, right only in the column)
    pairs = list(zip(*right, strict=True))
    return Effect(fixes, breaks, pairs.count((1.0, 1.0)), pairs.count((0.0, 0.0)), stats.mcnemar_exact(breaks, fixes),
                  stats.paired_difference(reference, column))


def _normalised(answer: str) -> str:
    return " ".join(answer.split()).casefold()


def select_questions(columns: list[Column], doc_ids: list[int], n: int, reference: int = 1) -> list[int]:
    """Indices of the ``n`` questions to show, by ``SELECTION_RULE`` (``columns[reference]`` is the reference)."""
    base = columns[reference].scores

    def key(index: int) -> tuple[int, int, int]:
        changed = sum(is_right(column.scores[index]) != is_right(base[index])
                      for i, column in enumerate(columns) if i != reference)
        distinct = len({_normalised(column.responses[index]) for column in columns})
        return -changed, -distinct, doc_ids[index]

    return sorted(range(len(doc_ids)), key=key)[:n]


# --- reading a run ---------------------------------------------------------------------------------------------

def _choices(names: list[str]) -> str:
    return ", ".join(names) if names else "none"


def _generative_targets(run_dir: Path, summary: dict[str, Any]) -> list[str]:
    """The run's targets that generate text, in config order (``Target.is_generative``, else cells that kept
    generations: a built-in generative task without ``gen_kwargs``)."""
    config_targets = {target.name: target for target in store.read_run_config(run_dir).targets}
    found = []
    for target in summary["targets"]:
        name = target["task"]
        configured = config_targets.get(name)
        if configured is not None and configured.is_generative:
            found.append(name)
            continue
        cell = next((c for c in summary["cells"] if c["task"] == name), None)
        block = store.read_run_cell(run_dir, cell["id"]).get("examples") if cell else None
        if block and "generations" in block:
            found.append(name)
    return found


def _pick_target(run_dir: Path, summary: dict[str, Any], target: str | None) -> str:
    generative = _generative_targets(run_dir, summary)
    names = [t["task"] for t in summary["targets"]]
    if target is None:
        if not generative:
            raise CaseStudyError(f"run {run_dir} has no generative target (its targets: {_choices(names)}); expected "
                                 "a run with a generate_until target, e.g. {task: cpt_coqa, gen_kwargs: {...}}")
        return generative[0]
    matches = [name for name in generative if target in (name, name.partition("+")[0])]
    if len(matches) == 1:
        return matches[0]
    what = "a non-generative" if target in names else "an ambiguous" if matches else "an unknown"
    raise CaseStudyError(f"--target {target}: {what} target of run {run_dir}; expected one of its generative "
                         f"targets: {_choices(generative)}")


def _pick_level(run_dir: Path, summary: dict[str, Any], target: str, level: str | None) -> str:
    """The compression level to study: ``level``, or the one of fewest bits per weight among the compressed levels
    where some prompt was applied to ``target`` (config order on ties)."""
    prompted = {c["compression"] for c in summary["cells"] if c["task"] == target and c["prompt"] != "none"}
    levels = [c for c in summary["compressions"] if c["spec"] != "dense" and c["spec"] in prompted]
    specs = [c["spec"] for c in levels]
    if level is None:
        if not levels:
            raise CaseStudyError(f"run {run_dir} applies no prompt to {target} at a compressed level; expected a run "
                                 "with prompts at some compression level")
        return min(levels, key=lambda c: c["bits_per_weight"])["spec"]
    if level not in specs:
        what = "the dense reference, not a compressed level" if level == "dense" else "not a level with prompts"
        raise CaseStudyError(f"--level {level}: {what} of run {run_dir} on {target}; expected one of "
                             f"{_choices(specs)}")
    return level


def _generative_record(run_dir: Path, cell_id: str) -> dict[str, Any]:
    record = store.read_run_cell(run_dir, cell_id)
    block = record.get("examples")
    if not block or "generations" not in block or cell_examples(record) is None:
        raise CaseStudyError(f"cell {cell_id} of run {run_dir} keeps no per-item generations (written by an older "
                             "cpt_bench); delete its file and --resume the run to evaluate it again")
    return record


def _answers(answer: Any) -> list[str]:
    items = answer if isinstance(answer, list) else [answer]
    return list(dict.fromkeys(str(item) for item in items))


def build_case_study(run_dir: Path, target: str | None = None, level: str | None = None,
                     questions: int = DEFAULT_QUESTIONS) -> CaseStudy:
    """The case study of ``target`` (default: the run's first generative target) at ``level`` (default: the most
    compressed level with prompts) from the finished matrix run folder ``run_dir``, showing ``questions`` questions;
    ``CaseStudyError`` (or ``store.RunFolderError``, ``tables.ReportError``, ``paired.PairingError``) in one line
    when the run, target, level or cells do not allow it."""
    run_dir = Path(run_dir)
    if questions < 1:
        raise CaseStudyError(f"--questions {questions}: expected a positive number of questions to show")
    summary = load_summary(run_dir / store.SUMMARY_FILE)
    target = _pick_target(run_dir, summary, target)
    level = _pick_level(run_dir, summary, target, level)
    cells = {(c["compression"], c["prompt"]): c for c in summary["cells"] if c["task"] == target}
    wanted = [("dense", "none", DENSE), (level, "none", REFERENCE)]
    for prompt in summary["prompts"]:
        if prompt["id"] != "none" and (level, prompt["id"]) in cells:
            wanted.append((level, prompt["id"], "control" if prompt.get("control") else prompt["kind"]))
    missing = [f"{compression}/{prompt}" for compression, prompt, _ in wanted[:2] if (compression, prompt) not in cells]
    if missing:
        raise CaseStudyError(f"run {run_dir} has no cell {' or '.join(missing)} on {target}; expected the dense and "
                             f"the {level} model without prompt beside the prompted cells")
    records = [_generative_record(run_dir, cells[compression, prompt]["id"]) for compression, prompt, _ in wanted]
    reference = records[1]
    aligned = align(*(cell_examples(records[i]) for i in (1, 0, *range(2, len(records)))))
    doc_ids = aligned[0].doc_ids
    labels = {p["id"]: prompt_label(p) for p in summary["prompts"]}
    columns = []
    for (compression, prompt, kind), record in zip(wanted, records, strict=True):
        position = {doc: i for i, doc in enumerate(record["examples"]["doc_ids"])}
        rows = [position[doc] for doc in doc_ids]
        responses = record["examples"]["generations"]["responses"]
        label = compression if prompt == "none" else f"{compression} + {labels[prompt]}"
        columns.append(Column(label, kind, record["cell"]["id"], [float(record["examples"]["scores"][i]) for i in rows],
                              [str(responses[i]) for i in rows]))
    generations = reference["examples"]["generations"]
    position = {doc: i for i, doc in enumerate(reference["examples"]["doc_ids"])}
    effects = [None if i == 1 else effect(columns[1].scores, column.scores) for i, column in enumerate(columns)]
    return CaseStudy(run=summary["name"], model=summary["model"], target=target,
                     metric=reference["metric"]["name"], level=level, doc_ids=doc_ids,
                     inputs=[str(generations["inputs"][position[doc]]) for doc in doc_ids],
                     answers=[_answers(generations["answers"][position[doc]]) for doc in doc_ids],
                     columns=columns, effects=effects,
                     shown=select_questions(columns, doc_ids, questions))


# --- rendering ---------------------------------------------------------------------------------------------------

def _shown(answer: str) -> str:
    """An answer on one line (line breaks as ⏎), ``(empty)`` when blank."""
    return answer.strip().replace("\r\n", "\n").replace("\n", " ⏎ ") if answer.strip() else "(empty)"


def markdown_text(text: str) -> str:
    """``text`` as literal markdown inline text: markdown's special characters backslash-escaped."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def _score(value: float) -> str:
    return str(int(value)) if value in (0.0, 1.0) else f"{value:.3f}"


def _change(reference: float, value: float) -> str:
    before, after = is_right(reference), is_right(value)
    return "fixed" if after and not before else "broken" if before and not after else ""


def effects_table(study: CaseStudy) -> Table:
    """A row per column: its mean score over the shared items and, against the compressed model, the paired
    difference with its 95% CI, fixes, breaks, items both right / wrong and the McNemar p-value."""
    rows = []
    for column, found in zip(study.columns, study.effects, strict=True):
        mean = sum(column.scores) / len(column.scores)
        if found is None:
            rows.append([column.label, column.kind, f"{mean:.3f}", *["–"] * 6])
            continue
        ci = found.difference.ci
        interval = "" if ci is None else f" [{ci[0]:+.3f}, {ci[1]:+.3f}]"
        rows.append([column.label, column.kind, f"{mean:.3f}", f"{found.difference.estimate:+.3f}{interval}",
                     str(found.fixes), str(found.breaks), str(found.both_right), str(found.both_wrong),
                     f"{found.mcnemar_p:.3g}"])
    headers = ["model", "kind", study.metric, f"Δ vs {study.level} [95% CI]", "fixes", "breaks", "both right",
               "both wrong", "McNemar p"]
    return Table(f"{study.target}: {study.metric} per model, against {study.level} without prompt", headers, rows,
                 label_columns=2)


def _question_table(study: CaseStudy, index: int, escape) -> Table:
    """Question ``index``: per column its answer (through ``escape``), score and change against the reference."""
    reference = study.columns[1].scores[index]
    rows = [[escape(column.label), escape(_shown(column.responses[index])), _score(column.scores[index]),
             "" if i == 1 else _change(reference, column.scores[index])]
            for i, column in enumerate(study.columns)]
    return Table("", ["model", "answer", study.metric, "vs compressed"], rows, label_columns=2)


def _question_heading(study: CaseStudy, rank: int, index: int) -> str:
    reference = study.columns[1].scores[index]
    notes = []
    for verb, change in (("fixed by", "fixed"), ("broken by", "broken")):
        names = [column.label for column in study.columns[2:] if _change(reference, column.scores[index]) == change]
        if names:
            notes.append(f"{verb} {', '.join(names)}")
    dense = _change(reference, study.columns[0].scores[index])
    if dense:
        notes.insert(0, f"{'lost' if dense == 'fixed' else 'gained'} by compression")
    return f"{rank}. document {study.doc_ids[index]}" + (f" ({'; '.join(notes)})" if notes else "")


def _fixed_and_broken(study: CaseStudy) -> list[tuple[str, list[int], list[int]]]:
    """Per column but the reference: its label and the document ids it fixes and breaks."""
    reference = study.columns[1].scores
    found = []
    for i, column in enumerate(study.columns):
        if i == 1:
            continue
        changes = [_change(r, c) for r, c in zip(reference, column.scores, strict=True)]
        fixed = [doc for doc, change in zip(study.doc_ids, changes, strict=True) if change == "fixed"]
        broken = [doc for doc, change in zip(study.doc_ids, changes, strict=True) if change == "broken"]
        found.append((column.label, fixed, broken))
    return found


def _ids(ids: list[int]) -> str:
    return ", ".join(map(str, ids)) if ids else "none"


def _intro(study: CaseStudy) -> list[str]:
    return [f"Run {study.run} (model {study.model}); target {study.target} ({study.metric} per item); compression "
            f"level {study.level}; {len(study.doc_ids)} questions shared by every column.",
            "An answer counts as right when its score is above 0 (for CoQA's em, which averages exact match over the "
            "gold answers left out one at a time: when it equals one of the gold answers). "
            f"Fixes: questions the compressed model ({study.level}, no prompt) gets wrong and the column gets right; "
            "breaks: the reverse. McNemar p: the exact two-sided test of fixes against breaks (binomial, 1/2, on "
            "the discordant questions); Δ: the paired difference of the mean score with its 95% CI. The dense row "
            "compares the uncompressed model with the compressed one.",
            f"{SELECTION_RULE} Inputs are the tail of each context as the cells keep it; gold: lm-eval's target."]


def _fence(text: str) -> str:
    """A markdown code fence longer than any run of backticks in ``text``."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _title(study: CaseStudy) -> str:
    return f"{TITLE_PREFIX}{study.run}, {study.target} at {study.level}"


def to_markdown_page(study: CaseStudy) -> str:
    """The study as a markdown page (first line ``# Case study: ...``, what ``CASE_STUDY_KIND`` recognises)."""
    table = effects_table(study)
    lines = [f"# {markdown_text(_title(study))}", "", *(line for text in _intro(study)
                                                        for line in (markdown_text(text), "")),
             f"## {markdown_text(table.title)}", "", to_markdown(table), ""]
    lines += [f"- {markdown_text(label)}: fixes documents {_ids(fixed)}; breaks documents {_ids(broken)}"
              for label, fixed, broken in _fixed_and_broken(study)]
    lines += ["", f"## Questions ({len(study.shown)} of {len(study.doc_ids)})", ""]
    for rank, index in enumerate(study.shown, 1):
        text = study.inputs[index]
        fence = _fence(text)
        gold = " / ".join(markdown_text(_shown(answer)) for answer in study.answers[index])
        lines += [f"### {markdown_text(_question_heading(study, rank, index))}", "", f"{fence}text", text, fence, "",
                  f"Gold: {gold}", "", to_markdown(_question_table(study, index, markdown_text)), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def to_html_page(study: CaseStudy) -> str:
    """The study as a self-contained HTML page (every text escaped)."""
    escape = html.escape
    table = effects_table(study)
    body = [f"<h1>{escape(_title(study))}</h1>", *(f"<p>{escape(text)}</p>" for text in _intro(study)),
            f"<h2>{escape(table.title)}</h2>", to_html(table), "<ul>"]
    body += [f"<li>{escape(label)}: fixes documents {_ids(fixed)}; breaks documents {_ids(broken)}</li>"
             for label, fixed, broken in _fixed_and_broken(study)]
    body += ["</ul>", f"<h2>Questions ({len(study.shown)} of {len(study.doc_ids)})</h2>"]
    for rank, index in enumerate(study.shown, 1):
        gold = " / ".join(_shown(answer) for answer in study.answers[index])
        body += [f"<h3>{escape(_question_heading(study, rank, index))}</h3>",
                 f'<pre style="white-space:pre-wrap">{escape(study.inputs[index])}</pre>',
                 f"<p>Gold: {escape(gold)}</p>",
                 to_html(_question_table(study, index, str))]  # to_html escapes every cell
    return html_page(_title(study), body)


def write_case_study(run_dir: Path, out_dir: Path | None = None, target: str | None = None,
                     level: str | None = None, questions: int = DEFAULT_QUESTIONS) -> list[Path]:
    """Write ``case-study.md`` and ``case-study.html`` of ``build_case_study(run_dir, target, level, questions)``
    into ``out_dir`` (default ``RUN/case-study``); return their paths. The run folder and ``out_dir`` are checked
    first (``store.RunFolderError``; ``files.OutputPathError`` for a folder that is not new, empty or an earlier
    case study)."""
    run_dir = Path(run_dir)
    if not (run_dir / store.CONFIG_FILE).is_file():
        raise store.RunFolderError(f"run folder {run_dir} not found ({store.CONFIG_FILE} missing); expected a "
                                   "folder written by 'cpt-bench matrix'")
    if not (run_dir / store.SUMMARY_FILE).is_file():
        raise store.RunFolderError(f"run {run_dir} has no {store.SUMMARY_FILE}: it is not finished; expected a "
                                   "finished matrix run (resume it with 'cpt-bench matrix CONFIG --out RUN --resume')")
    out_dir = Path(out_dir) if out_dir is not None else run_dir / DEFAULT_FOLDER
    ensure_replaceable(out_dir, CASE_STUDY_KIND, "--out")
    study = build_case_study(run_dir, target, level, questions)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_files_atomic(out_dir, {MARKDOWN_FILE: to_markdown_page(study).encode("utf-8"),
                                 HTML_FILE: to_html_page(study).encode("utf-8")})
    return [out_dir / MARKDOWN_FILE, out_dir / HTML_FILE]
