"""Reports of matrix runs and the leaderboard of all runs; this package reads run folders and writes documents only.

Entry points (here): ``write_report`` turns one ``summary.json`` into markdown, LaTeX, HTML and PNGs;
``write_run_report`` does so for a run folder (``cpt-bench report``, and ``cpt-bench matrix`` / ``merge`` once a
run is complete); ``write_leaderboard`` writes ``LEADERBOARD.md`` and ``.html`` from every run under ``results/``,
one ranked table per (task, metric, protocol).

Modules: ``tables`` (the summary's schema, the results tables and their markdown / LaTeX / HTML rendering),
``recovery`` (paired comparisons: gap closed, against controls, methods and seeds), ``serving`` (what a prompt costs
to serve against what compression saves), ``plots`` (the figures), ``protocol`` (how each target was scored: what
two numbers must share to be compared), ``leaderboard`` (the board: runs, columns, ranked rows, its markdown),
``recovery_board`` (recovery methods per level ranked by quality at their added bytes, the frontier),
``board_page`` (the board as a self-contained HTML page), ``submit`` (verify and add a run made elsewhere),
``case_study`` (a generative target's answers side by side, ``cpt-bench case-study``) and ``cli_commands``
(``cpt-bench report``, ``case-study`` and ``leaderboard [--add RUN_DIR]``).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cpt_bench.files import OutputKind, ensure_replaceable, write_text_atomic
from cpt_bench.matrix.store import SUMMARY_FILE, trivial_prefix_warnings
from cpt_bench.report.board_page import page
from cpt_bench.report.leaderboard import PAGE_KINDS, build_board, check_results_folder, load_runs, markdown
from cpt_bench.report.recovery import idp_tables, method_tables, recovery_tables, seed_tables
from cpt_bench.report.recovery_board import recovery_groups, recovery_markdown
from cpt_bench.report.serving import generation_tables, serving_tables
from cpt_bench.report.tables import (
    SIGNIFICANT_NOTE,
    UNTRAINED_NOTE,
    Summary,
    Table,
    has_paired_statistics,
    html_page,
    is_untrained,
    latex_text,
    level_grids,
    load_summary,
    prompts_table,
    results_tables,
    source_target_grids,
    to_html,
    to_latex,
    to_markdown,
)

if TYPE_CHECKING:
    from cpt_bench.report.plots import Plot

__all__ = ["load_summary", "write_leaderboard", "write_report", "write_run_report"]

_TITLE_PREFIX = "CPT benchmark report: "
REPORT_KIND = OutputKind("a report", "report.md", contains=f"# {_TITLE_PREFIX}")  # the markdown's first line
_LEGEND = ("Entries are value ± standard error; Δ is the value minus the dense model without prompt on the same task; "
           "peak MiB is the measured peak memory of the unprompted cell (peak RSS on CPU, CUDA max allocated on GPU); "
           "– marks combinations the run does not contain; (in-domain) marks soft prompts trained on the target's "
           "own domain.")
_PLOT_NOTE = ("Lines: metric against stored weight size, one line per prompt over every level it was applied at "
              "(a soft prompt's points away from its own level are transfers across levels); error bars are one "
              "standard error. Heatmaps: red is worse, green better, scaled per column for source × target grids "
              "and over the grid for level grids.")


def _legend(summary: Summary) -> str:
    """The legend, with the untrained-prompt note when a prompt of the run carries the flag, the significance
    note when its cells carry paired comparisons, and the warnings of ``store.trivial_prefix_warnings``."""
    notes = [_LEGEND]
    notes += [f"Trivial-prefix control: {warning}." for warning in trivial_prefix_warnings(summary.raw)]
    if any(is_untrained(prompt) for prompt in summary.prompts):
        notes.append(UNTRAINED_NOTE)
    if has_paired_statistics(summary):
        notes.append(SIGNIFICANT_NOTE)
    return " ".join(notes)


@dataclass(frozen=True)
class _Section:
    heading: str
    intro: str
    tables: list[Table]


_PAIRED_INTRO = ("For each compression level and target: every prompt applied there against no prompt at that level "
                 "(perplexity: % change of token perplexity; accuracy: difference), the share of the gap to dense it "
                 "closes, (C - P) / (C - D), with a paired-bootstrap CI over the windows or items, learned prompts "
                 "against their untrained init control, transferred prompts against the prompt learned at this "
                 "level on the target's own corpus, and every prompt against the trivial-prefix control (the EOS "
                 "token as a one-token prompt) with the gap closed over it, (T_C - P) / (T_C - T_D): what the prompt "
                 "adds to any one-token prefix; 95% CIs in brackets, * where the CI excludes zero; gap closed is n/s "
                 "where the gap itself (C - D, paired) is not told from zero: a share of noise.")
_METHODS_INTRO = ("For each level prompts or adapters were trained or fitted at: every method applied there, what it "
                  "costs (parameters trained; values stored on top of the compressed model and their bytes; seconds "
                  "and peak memory of its training, or of an EoRA adapter's closed-form fit) and what it buys: the "
                  "share of the perplexity gap to dense it closes and the change against no prompt elsewhere, with "
                  "95% CIs (paired over the shared windows or items); several seeds add their mean ± sd.")
_SERVING_INTRO = ("Per compression level and prompt: the weight bytes compression saved against the dense fp16 "
                  "checkpoint (stored) and the dense model as loaded (resident, simulated or real kernels as run), "
                  "beside what the prompt costs to serve: its own bytes (embeddings, LoRA tensors) and its fp16 "
                  "key/value cache, held once per sequence served with it; break-even is the number of concurrent "
                  "sequences whose prompt caches take up the stored bytes saved. A LoRA adapter adds no cache.")
_IDP_INTRO = ("Each IDP prompt (a set of prompts, one chosen per document from its context alone by the rule) at "
              "every level and target it ran: the documents each member was chosen for, then the IDP cell minus each "
              "member's own cell and minus the best single member in hindsight, paired over the same items. That "
              "member is chosen on the very items compared (the matrix's targets have no validation split), so the "
              "last column flatters the single prompt: IDP that matches it is doing well.")
_GENERATION_INTRO = ("Per generated sequence, in an fp16 cache: the prompt's keys and values held through every decode "
                     "step, at the largest batch shown above, and read over the target's new tokens (each step "
                     "attends to all of them). An adapter adds no cache and is left out.")
_SEEDS_INTRO = ("For each soft prompt trained with several seeds (data order and initial noise): each seed's value and "
                "paired comparisons, then the mean and sample standard deviation across seeds.")


def _sections(summary: Summary) -> list[_Section]:
    optional = [_Section("Paired comparisons per compression level", _PAIRED_INTRO, recovery_tables(summary)),
                _Section("Training seeds", _SEEDS_INTRO, seed_tables(summary)),
                _Section("Recovery methods per compression level", _METHODS_INTRO, method_tables(summary)),
                _Section("IDP prompts", _IDP_INTRO, idp_tables(summary)),
                _Section("Memory saved by compression vs memory the prompt costs", _SERVING_INTRO,
                         serving_tables(summary)),
                _Section("Prompt cache during generation", _GENERATION_INTRO, generation_tables(summary))]
    return [
        _Section("Results per target", "One table per target task: a row per compression level, a column per prompt "
                 "evaluated on that task.", results_tables(summary)),
        _Section("Source × target transfer per compression level", "For each level soft prompts were trained at: "
                 "those prompts (by training corpus) applied at that same level to every target, with no prompt "
                 "for reference.", [grid.table() for grid in source_target_grids(summary)]),
        _Section("Compression-level transfer per soft prompt source", "For each training corpus: its prompts (rows: "
                 "the level each was trained at) applied at every level (columns) on the target of the corpus' own "
                 "domain, else the first target; the none row is each level without prompt.",
                 [grid.table() for grid in level_grids(summary)]),
        *(section for section in optional if section.tables),
        _Section("Prompts", "Tokens: prompt length; train seconds and best validation perplexity of soft prompts.",
                 [prompts_table(summary)]),
    ]


def _facts(summary: Summary) -> list[str]:
    raw = summary.raw
    possible = len(summary.compressions) * len(summary.prompts) * len(summary.targets)
    return [f"model: {raw['model']}", f"machine: {raw['machine']}", f"wall time: {raw['wall_seconds']:.1f} s",
            f"cells: {summary.n_cells} of {possible} (compression, prompt, target) combinations"]


def _title(summary: Summary) -> str:
    return f"{_TITLE_PREFIX}{summary.raw['name']}"


def _environment(summary: Summary) -> str:
    return json.dumps(summary.raw["environment"], indent=2, sort_keys=True, ensure_ascii=False)


def _markdown(summary: Summary, sections: list[_Section], plots: list[Plot]) -> str:
    lines = [f"# {_title(summary)}", "", *(f"- {fact}" for fact in _facts(summary)), "", _legend(summary), ""]
    for section in sections:
        lines += [f"## {section.heading}", "", section.intro, ""]
        for table in section.tables:
            lines += [f"### {table.title}", "", to_markdown(table), ""]
    lines += ["## Plots", "", _PLOT_NOTE, ""]
    lines += [line for plot in plots for line in (f"![{plot.title}]({plot.path.name})", "")]
    lines += ["## Environment", "", "```json", _environment(summary), "```"]
    return "\n".join(lines) + "\n"


def _latex(summary: Summary, sections: list[_Section], plots: list[Plot]) -> str:
    preamble = [r"\documentclass{article}", r"\usepackage[T1]{fontenc}", r"\usepackage[utf8]{inputenc}",
                r"\usepackage[margin=2cm,landscape]{geometry}", r"\usepackage{booktabs}", r"\usepackage{adjustbox}",
                r"\usepackage{graphicx}", r"\begin{document}"]
    lines = [*preamble, rf"\section*{{{latex_text(_title(summary))}}}", r"\begin{itemize}",
             *(rf"\item {latex_text(fact)}" for fact in _facts(summary)), r"\end{itemize}",
             latex_text(_legend(summary)), ""]
    for section in sections:
        lines += [rf"\section{{{latex_text(section.heading)}}}", latex_text(section.intro), ""]
        lines += [block for table in section.tables for block in (to_latex(table), "")]
        lines += [r"\clearpage", ""]
    lines += [r"\section{Plots}", latex_text(_PLOT_NOTE), ""]
    lines += [line for plot in plots for line in (
        r"\begin{figure}[htbp]", r"\centering", rf"\includegraphics[width=0.8\linewidth]{{{plot.path.name}}}",
        rf"\caption{{{latex_text(plot.title)}}}", r"\end{figure}", "")]
    lines += [r"\clearpage", r"\section{Environment}", r"\begin{verbatim}", _environment(summary), r"\end{verbatim}",
              r"\end{document}"]
    return "\n".join(lines) + "\n"


def _html(summary: Summary, sections: list[_Section], plots: list[Plot]) -> str:
    escape = html.escape
    body = [f"<h1>{escape(_title(summary))}</h1>", "<ul>", *(f"<li>{escape(fact)}</li>" for fact in _facts(summary)),
            "</ul>", f"<p>{escape(_legend(summary))}</p>"]
    for section in sections:
        body += [f"<h2>{escape(section.heading)}</h2>", f"<p>{escape(section.intro)}</p>"]
        body += [block for table in section.tables for block in (f"<h3>{escape(table.title)}</h3>", to_html(table))]
    body += ["<h2>Plots</h2>", f"<p>{escape(_PLOT_NOTE)}</p>"]
    body += [f'<figure><img src="{escape(plot.path.name)}" alt="{escape(plot.title)}">'
             f"<figcaption>{escape(plot.title)}</figcaption></figure>" for plot in plots]
    body += ["<h2>Environment</h2>", f"<pre>{escape(_environment(summary))}</pre>"]
    return html_page(_title(summary), body)


def write_report(summary: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write ``report.md``, ``report.tex``, ``report.html`` and the PNGs they show into ``out_dir``; return the paths.

    ``summary`` is a parsed ``summary.json`` (format ``store.SUMMARY_FORMAT``); ``tables.ReportError`` when malformed.
    ``out_dir`` must be new, empty or an earlier report (``files.OutputPathError`` otherwise).
    """
    from cpt_bench.report.plots import write_plots  # matplotlib loads only when a report is written

    ensure_replaceable(out_dir, REPORT_KIND, "--out")
    parsed = Summary(summary)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(parsed, out_dir)
    sections = _sections(parsed)
    paths = []
    for name, render in (("report.md", _markdown), ("report.tex", _latex), ("report.html", _html)):
        paths.append(out_dir / name)
        write_text_atomic(paths[-1], render(parsed, sections, plots))
    return paths + [plot.path for plot in plots]


def write_leaderboard(results_dir: Path) -> list[Path]:
    """Write ``results_dir/LEADERBOARD.md`` and ``LEADERBOARD.html``; ``ReportError`` naming a malformed run,
    ``files.OutputPathError`` when ``check_results_folder`` refuses the folder."""
    check_results_folder(results_dir)
    board = build_board(load_runs(results_dir))
    paths = [results_dir / kind.marker for kind in PAGE_KINDS]
    views = recovery_markdown(recovery_groups(board))
    for path, text in zip(paths, (markdown(board, views), page(board)), strict=True):
        write_text_atomic(path, text)
    return paths


def write_run_report(run_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Write the report of the run folder ``run_dir`` (from its ``summary.json``) into ``out_dir`` (default
    ``RUN/report``); return the paths (see ``write_report``)."""
    return write_report(load_summary(run_dir / SUMMARY_FILE), out_dir or run_dir / "report")
